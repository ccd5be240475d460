"""The RNN language model and its training loop: exact perplexity against a token-by-token
brute force, initialization, tied weights, divergence of the ReLU RNN, exact resume."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from classicnets.data.ptb import load_ptb
from classicnets.models.rnnlm import RNNLanguageModel
from classicnets.train.checkpoint import list_checkpoints
from classicnets.train.language_model import (
    LMTrainSettings,
    evaluate_perplexity,
    train_language_model,
)
from classicnets.train.run import RunDir
from tolerances import gamma, network, two_orders


@pytest.fixture(scope="module")
def corpus():
    for candidate in (
        os.environ.get("CLASSICNETS_DATA"),
        Path(__file__).parents[2] / "shared/data",
    ):
        if candidate and (Path(candidate) / "ptb").is_dir():
            return load_ptb(candidate, download=False)
    if os.environ.get("CLASSICNETS_REQUIRE_DATA") == "1":
        pytest.fail("PTB not found (set CLASSICNETS_DATA to the data root)")
    pytest.skip("PTB not found (set CLASSICNETS_DATA to the data root)")


def brute_force_nll(model: RNNLanguageModel, ids: torch.Tensor, batch_size: int):
    """Sum of -log p(token | its row's previous tokens), one token at a time, in float64.

    Written from the definition, not from ``evaluation_rows``: the ``N - 1`` (input, target)
    pairs of the stream are dealt into ``batch_size`` consecutive rows of ``(N - 1) // B``
    pairs, the last row also taking the ``(N - 1) % B`` pairs left over; each row is read from
    the zero state, feeding one token and carrying the hidden state.
    """
    pairs = len(ids) - 1
    length = pairs // batch_size
    starts = [r * length for r in range(batch_size)]
    ends = starts[1:] + [pairs]
    total, count = 0.0, 0
    with torch.no_grad():
        for start, end in zip(starts, ends):
            hidden = model.init_hidden(1)
            for p in range(start, end):
                logits, hidden = model(ids[p].view(1, 1), hidden)  # [1, 1, V]
                log_probs = torch.log_softmax(logits[0, 0].double(), dim=0)
                total -= log_probs[ids[p + 1]].item()
                count += 1
    return total, count


@pytest.mark.parametrize("cell", ["lstm", "rnn_tanh"])
@pytest.mark.parametrize("batch_size", [1, 10])
def test_perplexity_equals_token_by_token_brute_force(corpus, cell, batch_size):
    # 304 tokens: 303 predicted tokens, so with 10 rows of 30 pairs 3 are left over (the tail).
    ids = corpus.valid[:304]
    torch.manual_seed(0)
    model = RNNLanguageModel(10_000, 16, num_layers=2, cell=cell, init_scale=0.3).double().eval()
    ppl, total, count = evaluate_perplexity(model, ids, batch_size=batch_size, num_steps=7)
    reference_total, reference_count = brute_force_nll(model, ids, batch_size)
    assert count == reference_count == len(ids) - 1
    # float64 throughout; windows of 7 and single steps differ only by rounding (~1e-16 each)
    assert total == pytest.approx(reference_total, rel=1e-12)
    assert ppl == pytest.approx(math.exp(reference_total / reference_count), rel=1e-12)
    # float32 evaluation of the same weights: per-token NLLs in float32, summed in float64
    ppl32, _, count32 = evaluate_perplexity(model.float(), ids, batch_size, num_steps=35)
    # The log-softmax sums 10,000 positive exponentials (relative error gamma_10000, which is
    # the NLL's absolute error), after two LSTM layers and the decoder (fan-in 16) seen as a
    # network of 3 layers per step; ppl = exp(mean NLL) turns absolute into relative error.
    rel = gamma(10_001) + network(3, 16 + 16)
    assert count32 == count and ppl32 == pytest.approx(ppl, rel=rel)


def test_perplexity_does_not_depend_on_the_window_length(corpus):
    torch.manual_seed(1)
    model = RNNLanguageModel(10_000, 16, num_layers=2).double()
    results = {n: evaluate_perplexity(model, corpus.test[:500], 4, n) for n in (1, 13, 1000)}
    assert {r[2] for r in results.values()} == {499}
    assert results[1][1] == pytest.approx(results[1000][1], rel=1e-13)
    assert results[13][1] == pytest.approx(results[1000][1], rel=1e-13)
    assert model.training  # the previous mode is restored


def test_uniform_initialization_range():
    torch.manual_seed(0)
    model = RNNLanguageModel(10_000, 200, num_layers=2, init_scale=0.05)
    for name, p in model.named_parameters():
        assert p.abs().max() <= 0.05, name
    w = model.embedding.weight  # 2,000,000 U(-0.05, 0.05) draws
    assert w.max() > 0.0499 and w.min() < -0.0499 and abs(w.mean().item()) < 1e-4
    assert w.std().item() == pytest.approx(0.05 / math.sqrt(3), rel=1e-2)


def test_tied_weights_share_one_matrix_and_round_trip(tmp_path):
    from classicnets.train.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    tied = RNNLanguageModel(50, 8, num_layers=1, tie_weights=True)
    untied = RNNLanguageModel(50, 8, num_layers=1)
    assert tied.decoder.weight is tied.embedding.weight
    count = sum(p.numel() for p in tied.parameters())
    assert count == sum(p.numel() for p in untied.parameters()) - 50 * 8
    # The shared matrix gets the gradient of both uses.
    tokens = torch.randint(0, 50, (2, 5))
    logits, _ = tied(tokens)
    logits.sum().backward()
    rows = torch.zeros(50, dtype=torch.bool)
    rows[tokens.unique()] = True
    grad = tied.embedding.weight.grad
    assert grad[~rows].abs().sum() > 0  # only the output layer reaches unused words
    path = save_checkpoint(tmp_path, "tied-step00000000", dict(tied.state_dict()), {})
    clone = RNNLanguageModel(50, 8, num_layers=1, tie_weights=True)
    clone.load_state_dict(load_checkpoint(path)[0])
    assert clone.decoder.weight is clone.embedding.weight
    assert torch.equal(clone(tokens)[0], tied(tokens)[0])
    with pytest.raises(ValueError, match="tie_weights needs"):
        RNNLanguageModel(50, 8, tie_weights=True, embedding_size=4)


def test_dropout_only_in_training_and_hidden_carries():
    torch.manual_seed(0)
    model = RNNLanguageModel(30, 8, num_layers=2, dropout=0.5)
    tokens = torch.randint(0, 30, (3, 6))
    model.eval()
    whole, hidden = model(tokens)
    first, h = model(tokens[:, :4])
    second, h = model(tokens[:, 4:], h)
    # The same cells on shorter windows: the matrix products may be blocked differently. Each
    # pre-activation sums 8 + 8 products of |w| <= 1/sqrt(8) (PyTorch's init) and |h|, |x| <= 1
    # after tanh (embeddings N(0, 1), below 4 here): two_orders(17, 17 * 4 / 8**0.5) per step, not
    # amplified by tanh (Lipschitz 1), added over 6 steps and 2 layers.
    tol = 12 * two_orders(17, 17 * 4 / 8**0.5)
    assert torch.allclose(torch.cat([first, second], dim=1), whole, atol=tol, rtol=0)
    assert all(torch.allclose(a, b, atol=tol, rtol=0) for a, b in zip(h, hidden))
    model.train()
    assert not torch.equal(model(tokens)[0], model(tokens)[0])


def _settings(**kw) -> LMTrainSettings:
    base = {
        "epochs": 3,
        "batch_size": 10,
        "num_steps": 10,
        "epochs_at_full_lr": 1,
        "lr_decay": 0.5,
        "eval_batch_size": 5,
        "log_every": 7,
        "checkpoint_every": 11,
        "progress": False,
    }
    return LMTrainSettings(**{**base, **kw})


def test_training_logs_schedule_perplexities_and_resumes_bit_identically(corpus, tmp_path):
    train, valid = corpus.train[:2000], corpus.valid[:300]  # 20 windows per epoch

    def fit(folder, **kw):
        torch.manual_seed(0)
        model = RNNLanguageModel(10_000, 16, num_layers=2, dropout=0.2)
        result = train_language_model(
            model, train, _settings(**kw), RunDir(folder), "lstm", valid, valid, resume=True
        )
        return model, result

    model, result = fit(tmp_path / "full")
    assert result["status"] == "complete" and result["step"] == 60 and result["epoch"] == 3
    records = RunDir(tmp_path / "full").read_metrics()
    valid_records = [r for r in records if r["split"] == "valid"]
    assert [r["epoch"] for r in valid_records] == [1, 2, 3]
    assert all(r["tokens"] == 299 for r in valid_records)
    assert result["valid_perplexity"] == valid_records[-1]["perplexity"]
    assert math.exp(valid_records[-1]["loss"]) == pytest.approx(result["valid_perplexity"])
    # Zaremba decay: lr * 0.5 ** max(epoch + 1 - 1, 0) for 0-based epochs -> 1, 0.5, 0.25
    lrs = {r["epoch"]: r["lr"] for r in records if r["split"] == "train_epoch"}
    assert lrs == {1: 1.0, 2: 0.5, 3: 0.25}
    assert all(r["grad_norm"] > 0 for r in records if r["split"] == "train")
    # The per-epoch training perplexity is the exact one of the epoch's 20 windows.
    assert {r["tokens"] for r in records if r["split"] == "train_epoch"} == {10 * 199}

    # Stopped at step 30 (inside epoch 2, not on a log or checkpoint step), the newest
    # checkpoint deleted as if killed: the resumed run restarts at step 22 with the hidden
    # state carried into window 2 of epoch 2, rewrites the record of step 28 and must end
    # bit-identical.
    stopped = tmp_path / "stopped"
    _, partial = fit(stopped, stop_after=30)
    assert partial["status"] == "stopped" and partial["step"] == 30
    step, path = list_checkpoints(stopped / "checkpoints", "lstm")[-1]
    assert step == 30
    path.unlink()
    path.with_suffix(".safetensors").unlink()
    resumed, again = fit(stopped)
    assert again["status"] == "complete" and again["step"] == 60
    for key, value in model.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert RunDir(stopped).read_metrics() == records
    assert again["valid_perplexity"] == result["valid_perplexity"]


def test_relu_rnn_divergence_is_reported_not_raised(corpus, tmp_path):
    torch.manual_seed(0)
    # Large weights and no clipping: the ReLU activations overflow within a few steps.
    model = RNNLanguageModel(10_000, 16, num_layers=2, cell="rnn_relu", init_scale=1.0)
    settings = _settings(clip_grad_norm=None, checkpoint_every=1)
    run = RunDir(tmp_path)
    result = train_language_model(
        model, corpus.train[:2000], settings, run, "rnn_relu", corpus.valid[:300]
    )
    assert result["status"] == "diverged"
    d = result["diverged"]
    assert d["epoch"] == 1 and d["step"] >= 1 and not math.isfinite(d["loss"])
    records = [r for r in run.read_metrics() if r["split"] == "diverged"]
    assert len(records) == 1 and records[0]["step"] == d["step"]
    # Checkpoints stop before the divergence and hold finite weights only.
    steps = [s for s, _ in list_checkpoints(run.checkpoints, "rnn_relu")]
    assert steps and max(steps) < d["step"]
    for _, path in list_checkpoints(run.checkpoints, "rnn_relu"):
        tensors = load_file(path.with_suffix(".safetensors"))
        assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("model."))
    # Resuming does not train it again: the divergence is on record.
    before = run.metrics_path.read_text()
    torch.manual_seed(0)
    again = train_language_model(
        RNNLanguageModel(10_000, 16, 2, cell="rnn_relu", init_scale=1.0),
        corpus.train[:2000],
        settings,
        run,
        "rnn_relu",
        corpus.valid[:300],
        resume=True,
    )
    assert again["status"] == "diverged"
    assert again["diverged"]["step"] == d["step"] and again["diverged"]["epoch"] == 1
    assert not math.isfinite(again["diverged"]["loss"])
    assert run.metrics_path.read_text() == before


def test_generate_counts_words_not_ends_and_cools_to_greedy_decoding():
    from classicnets.models.rnnlm import generate

    torch.manual_seed(0)
    model = RNNLanguageModel(vocab_size=12, hidden_size=8, num_layers=2, init_scale=2.0)
    ids = generate(model, [0, 3], num_tokens=15, end_token=0, seed=4)
    assert sum(i != 0 for i in ids) == 15 and all(0 <= i < 12 for i in ids)
    assert generate(model, [0, 3], 15, 0, seed=4) == ids  # its own seeded generator
    # The independent reference: argmax decoding. At temperature 1e-4, softmax puts all but
    # about exp(-gap / 1e-4) of the mass on the argmax; the smallest gap between the two top
    # logits here is 0.027 (float32 rounding moves it by ~1e-6), so the rest is below 1e-100.
    greedy, tokens, hidden = [], torch.tensor([[0, 3]]), None
    with torch.no_grad():
        while sum(i != 0 for i in greedy) < 6:
            logits, hidden = model(tokens, hidden)
            greedy.append(int(logits[0, -1].argmax()))
            tokens = torch.tensor([[greedy[-1]]])
    assert generate(model, [0, 3], 6, 0, temperature=1e-4) == greedy
    with pytest.raises(ValueError, match="temperature must be > 0"):
        generate(model, [0], 3, 0, temperature=0.0)
