"""``rnn-vs-lstm``: word-level language models on Penn Treebank, vanilla RNN against LSTM.

The LSTM is trained in the configurations of Zaremba, Sutskever & Vinyals 2014 ("Recurrent
Neural Network Regularization", Sec. 4.1) with the hyper-parameters of the TensorFlow PTB
tutorial (tensorflow/models ``tutorials/rnn/ptb/ptb_word_lm.py``: ``SmallConfig``,
``MediumConfig``, ``LargeConfig``). The vanilla (Elman) RNNs with tanh and with ReLU use the same
sizes, windows, clipping and schedule, with their own learning rates (below). Every model starts
from the same seed and reads the same windows in the same order.

Published test perplexities of the LSTM (``PUBLISHED``): small 114.5, medium 82.7, large 78.4
(Zaremba et al. 2014, Table 1); the tutorial's code gets 115.91, 82.07 and 78.29.

The report has a table and a plot of validation and test perplexity per epoch for every model;
a model whose training loss stops being finite (the ReLU RNN's activations overflow) is shown as
"diverged" with the step, epoch and value, and the other models go on.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from classicnets.experiments.common import (
    Experiment,
    ExperimentError,
    Job,
    RunOptions,
    SampleRequest,
    TrainedModel,
    load_checkpointed,
    settings_for,
)
from classicnets.experiments.config import Range
from classicnets.models.rnnlm import CELLS, RNNLanguageModel, generate
from classicnets.report.curves import Curve
from classicnets.train.run import RunDir

__all__ = [
    "EXPERIMENT",
    "PRESETS",
    "PUBLISHED",
    "RNNvsLSTMConfig",
    "build_model",
    "lm_settings",
    "run",
    "sample",
]

VARIANTS = CELLS  # "lstm", "rnn_tanh", "rnn_relu"

# Zaremba et al. 2014, Sec. 4.1, as the TF tutorial's SmallConfig / MediumConfig / LargeConfig
# code them (dropout = 1 - keep_prob; epochs = max_max_epoch; epochs_at_full_lr = max_epoch).
PRESETS: dict[str, dict[str, Any]] = {
    "small": {
        "hidden_size": 200,
        "num_layers": 2,
        "num_steps": 20,
        "batch_size": 20,
        "init_scale": 0.1,
        "lr": 1.0,
        "max_grad_norm": 5.0,
        "epochs": 13,
        "epochs_at_full_lr": 4,
        "lr_decay": 0.5,
        "dropout": 0.0,
    },
    "medium": {
        "hidden_size": 650,
        "num_layers": 2,
        "num_steps": 35,
        "batch_size": 20,
        "init_scale": 0.05,
        "lr": 1.0,
        "max_grad_norm": 5.0,
        "epochs": 39,
        "epochs_at_full_lr": 6,
        "lr_decay": 0.8,
        "dropout": 0.5,
    },
    "large": {
        "hidden_size": 1500,
        "num_layers": 2,
        "num_steps": 35,
        "batch_size": 20,
        "init_scale": 0.04,
        "lr": 1.0,
        "max_grad_norm": 10.0,
        "epochs": 55,
        "epochs_at_full_lr": 14,
        "lr_decay": 1 / 1.15,
        "dropout": 0.65,
    },
}

# LSTM perplexities: Zaremba et al. 2014, Table 1 ("non-regularized LSTM" is the small one),
# and the README of the TF tutorial (tutorials/rnn/ptb: its code, one run each; its validation
# figure is on batch 20 x 20-step windows, its test figure on batch 1).
PUBLISHED: dict[str, dict[str, float]] = {
    "small": {
        "valid": 120.7,
        "test": 114.5,
        "tf_tutorial_valid": 121.39,
        "tf_tutorial_test": 115.91,
    },
    "medium": {"valid": 86.2, "test": 82.7, "tf_tutorial_valid": 86.16, "tf_tutorial_test": 82.07},
    "large": {"valid": 82.2, "test": 78.4, "tf_tutorial_valid": 82.62, "tf_tutorial_test": 78.29},
}


@dataclass
class RNNvsLSTMConfig(RunOptions):
    """Configuration of ``rnn-vs-lstm``.

    ``config`` picks Zaremba et al.'s preset; the size and schedule fields left at None take
    the preset's value (``PRESETS``), any other value overrides it (``--set hidden_size=100``).
    """

    config: str = "small"  # small | medium | large (Zaremba et al. 2014 / TF tutorial)
    variants: tuple[str, ...] = VARIANTS  # any of lstm, rnn_tanh, rnn_relu
    # None: the preset's value (small / medium / large).
    hidden_size: int | None = None  # units per layer and embedding size: 200 / 650 / 1500
    num_layers: int | None = None  # 2 / 2 / 2
    num_steps: int | None = None  # back-propagation window: 20 / 35 / 35
    batch_size: int | None = None  # 20 / 20 / 20
    init_scale: float | None = None  # uniform init range: 0.1 / 0.05 / 0.04
    lr: float | None = None  # the LSTM's SGD learning rate: 1.0 / 1.0 / 1.0
    max_grad_norm: float | None = None  # global-norm clipping: 5 / 5 / 10
    epochs: int | None = None  # 13 / 39 / 55
    epochs_at_full_lr: int | None = None  # epochs before decay: 4 / 6 / 14
    lr_decay: float | None = None  # factor per epoch after that: 0.5 / 0.8 / 1/1.15
    dropout: float | None = None  # non-recurrent dropout: 0 / 0.5 / 0.65
    # The vanilla RNNs' learning rates: the best of {0.1, 0.25, 0.5, 1.0} on a one-epoch run of
    # the small sizes over the first 100k training tokens (docs/language-models.md has the
    # sweep). The LSTM's rate of 1.0 makes the tanh RNN's perplexity climb past the vocabulary
    # size; the ReLU RNN overflows at most rates, which is what the comparison shows.
    lr_rnn_tanh: float = 0.25
    lr_rnn_relu: float = 0.25
    tie_weights: bool = False  # share embedding and output weights (not in Zaremba et al.)
    eval_batch_size: int = 1  # 1: every token with its full left context (the TF test protocol)
    eval_num_steps: int = 35  # evaluation window (no effect on the result beyond rounding)
    eval_limit: int | None = None  # evaluate on the first N tokens of valid and test only
    log_every: int = 100  # training-perplexity record every this many steps
    checkpoint_every: int = 1000  # steps between checkpoints, besides every epoch end

    @classmethod
    def quick(cls) -> RNNvsLSTMConfig:
        """Seconds on a 2-core CPU: 16 units, 2 epochs over 6,000 training tokens."""
        return cls(
            hidden_size=16,
            batch_size=10,
            num_steps=10,
            epochs=2,
            epochs_at_full_lr=1,
            train_limit=6000,
            eval_limit=2000,
            eval_batch_size=10,
            log_every=20,
            checkpoint_every=25,
        )

    def resolved(self) -> dict[str, Any]:
        """The preset's values with this config's overrides (fields that are not None)."""
        values = dict(PRESETS[self.config])
        for key in values:
            if getattr(self, key) is not None:
                values[key] = getattr(self, key)
        return values

    def learning_rate(self, variant: str) -> float:
        if variant == "lstm":
            return float(self.resolved()["lr"])
        return self.lr_rnn_tanh if variant == "rnn_tanh" else self.lr_rnn_relu

    VARIANTS: ClassVar[tuple[str, ...]] = VARIANTS  # what config.check_choices admits
    FIELD_CHOICES: ClassVar[dict[str, tuple]] = {"config": tuple(PRESETS)}
    FIELD_RANGES: ClassVar[dict[str, Range]] = {"train_limit": Range(2), "eval_limit": Range(2)}


def build_model(
    config: RNNvsLSTMConfig, variant: str, vocab_size: int = 10_000
) -> RNNLanguageModel:
    """The model of ``variant`` ("lstm", "rnn_tanh", "rnn_relu") in the config's sizes."""
    p = config.resolved()
    return RNNLanguageModel(
        vocab_size=vocab_size,
        hidden_size=p["hidden_size"],
        num_layers=p["num_layers"],
        cell=variant,
        dropout=p["dropout"],
        tie_weights=config.tie_weights,
        init_scale=p["init_scale"],
    )


def lm_settings(config: RNNvsLSTMConfig, variant: str):
    """The ``LMTrainSettings`` of ``variant``."""
    from classicnets.train.language_model import LMTrainSettings

    p = config.resolved()  # the preset's values where the config leaves them None
    preset = {name: p[name] for name in ("epochs", "batch_size", "num_steps", "lr_decay",
                                         "epochs_at_full_lr")}  # fmt: skip
    lr, clip = config.learning_rate(variant), p["max_grad_norm"]
    return settings_for(LMTrainSettings, config, **preset, lr=lr, clip_grad_norm=clip)


def _vocabulary_path(run_dir: RunDir):
    return run_dir.path / "vocabulary.txt"


def run(config: RNNvsLSTMConfig, job: Job) -> dict:
    """Train every variant and write the plots; return the summary."""
    run_dir, device, resume = job.run_dir, job.device, job.resume
    from classicnets.data.ptb import load_ptb
    from classicnets.files import atomic_write_text
    from classicnets.train.language_model import train_language_model

    corpus = load_ptb(config.data_dir, config.download)
    train = corpus.train[: config.train_limit]
    valid, test = corpus.valid[: config.eval_limit], corpus.test[: config.eval_limit]
    if run_dir.writer:  # sampling and exporters need the words, not the data files
        atomic_write_text(_vocabulary_path(run_dir), "\n".join(corpus.vocabulary.words) + "\n")

    def train_one(variant: str) -> dict:
        model = build_model(config, variant, len(corpus.vocabulary)).to(device)
        settings = lm_settings(config, variant)
        result = train_language_model(
            model, train, settings, run_dir, variant, valid, test, resume=resume
        )
        return {
            **result,
            "lr": settings.lr,
            "parameters": sum(p.numel() for p in model.parameters()),
        }

    results = job.train_variants(config.variants, config.seed, train_one)
    return _summary(config, run_dir, results, device, len(train))


def epoch_curves(run_dir: RunDir) -> dict[str, dict[str, dict[int, float]]]:
    """``{variant: {split: {epoch: perplexity}}}`` for the train_epoch, valid and test records."""
    curves: dict[str, dict[str, dict[int, float]]] = {}
    for r in run_dir.read_metrics():
        split = r.get("split")
        if split in ("train_epoch", "valid", "test"):
            name = "train" if split == "train_epoch" else split
            value = float(r["perplexity"])  # "inf" strings included
            curves.setdefault(r["variant"], {}).setdefault(name, {})[int(r["epoch"])] = value
    return curves


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if math.isfinite(value) else str(value)


def perplexity_table(run_dir: RunDir, variants) -> list[str]:
    """Lines of a text table: one row per epoch, validation / test perplexity per variant."""
    curves = epoch_curves(run_dir)
    epochs = sorted({e for c in curves.values() for e in c.get("valid", {})})
    header = "epoch  " + "  ".join(f"{v + ' valid/test':>22}" for v in variants)
    lines = [header]
    for e in epochs:
        cells = []
        for v in variants:
            c = curves.get(v, {})
            cells.append(
                f"{_fmt(c.get('valid', {}).get(e)) + ' / ' + _fmt(c.get('test', {}).get(e)):>22}"
            )
        lines.append(f"{e:>5}  " + "  ".join(cells))
    return lines


def _summary(config, run_dir, results, device, train_tokens) -> dict[str, Any]:
    p = config.resolved()
    finished = all(
        results.get(v, {}).get("status") in ("complete", "diverged") for v in config.variants
    )
    curves = epoch_curves(run_dir)
    variants = {}
    for variant, r in results.items():
        valid = curves.get(variant, {}).get("valid", {})
        test = curves.get(variant, {}).get("test", {})
        best = min(valid, key=lambda e: valid[e]) if valid else None
        row = {
            "status": r["status"],
            "epochs": r["epoch"],
            "steps": r["step"],
            "lr": r["lr"],
            "valid_perplexity": r.get("valid_perplexity"),
            "test_perplexity": r.get("test_perplexity"),
            "best_valid_perplexity": valid[best] if best is not None else None,
            "test_at_best_valid": test.get(best) if best is not None else None,
            "train_perplexity": r.get("train_perplexity"),
            "parameters": r["parameters"],
            "train_time_s": r.get("train_time_s"),
            "tokens_per_s": r.get("tokens_per_s"),
        }
        if r.get("diverged"):
            d = r["diverged"]
            row["diverged_at"] = (
                f"step {d['step']} (epoch {d['epoch']}): training loss {d['loss']}"
                + (f", gradient norm {d['grad_norm']}" if d.get("grad_norm") is not None else "")
            )
        variants[variant] = row
    published = PUBLISHED[config.config]
    notes = [
        f"Penn Treebank, {train_tokens:,} training tokens; config {config.config}: "
        f"{p['num_layers']} layers of {p['hidden_size']} units, {p['num_steps']}-step windows, "
        f"batch {p['batch_size']}, init U(-{p['init_scale']}, {p['init_scale']}), dropout "
        f"{p['dropout']}, clip {p['max_grad_norm']}, {p['epochs']} epochs, lr x{p['lr_decay']:.4g} "
        f"per epoch after {p['epochs_at_full_lr']}; device {device}.",
        f"Published LSTM ({config.config}): valid {published['valid']}, test {published['test']} "
        f"(Zaremba et al. 2014, Table 1); TF tutorial valid {published['tf_tutorial_valid']}, "
        f"test {published['tf_tutorial_test']}.",
        "Perplexity = exp(total NLL / predicted tokens) over every token of the split but the "
        f"first; evaluation batch {config.eval_batch_size}.",
    ]
    for variant, row in variants.items():
        if "diverged_at" in row:
            notes.append(f"{variant} diverged at {row['diverged_at']}; training stopped there.")
    notes += ["Validation / test perplexity per epoch:", *perplexity_table(run_dir, list(results))]
    return {
        "title": f"rnn-vs-lstm ({config.config}): vanilla RNN (tanh, ReLU) against LSTM on PTB",
        "status": "complete" if finished else "stopped",
        "variants": variants,
        "perplexity_per_epoch": {
            v: {s: [c[s][e] for e in sorted(c[s])] for s in ("valid", "test") if s in c}
            for v, c in curves.items()
        },
        "notes": notes,
    }


PLOTS = tuple(
    Curve("perplexity.png", split, "perplexity", "perplexity", f"{name} perplexity", logy=True,
          x="epoch")
    for split, name in (("train_epoch", "training"), ("valid", "validation"), ("test", "test"))
)  # fmt: skip


def _read_vocabulary(config: RNNvsLSTMConfig, run_dir: RunDir):
    from classicnets.data.ptb import Vocabulary, load_ptb

    path = _vocabulary_path(run_dir)
    if path.is_file():
        return Vocabulary(path.read_text(encoding="utf-8").split("\n")[:-1])
    return load_ptb(config.data_dir, config.download).vocabulary


def load_models(
    config: RNNvsLSTMConfig, run_dir: RunDir, device: str = "cpu", variants=None
) -> dict[str, TrainedModel]:
    """Each variant's newest checkpoint as a ``TrainedModel`` (eval mode)."""
    p = config.resolved()
    vocabulary = functools.cache(lambda: _read_vocabulary(config, run_dir))  # when one is found

    def info(variant: str, model) -> dict[str, Any]:
        return {
            "kind": "language_model",
            "input_shape": [p["num_steps"]],
            "input_dtype": "int64",
            "preprocessing": (
                "word ids in the vocabulary's order, '<eos>' after each sentence; "
                "forward(tokens [B, T], hidden) -> (logits [B, T, V], hidden)"
            ),
            "vocabulary": list(vocabulary().words),
            "num_layers": p["num_layers"],
            "hidden_size": p["hidden_size"],
            "cell": variant,
            "tie_weights": config.tie_weights,
        }

    def build(variant: str) -> RNNLanguageModel:
        return build_model(config, variant, len(vocabulary()))

    return load_checkpointed(build, run_dir, variants or config.variants, device, info)


def evaluate_trained(config: RNNvsLSTMConfig, run_dir: RunDir, device: str = "cpu") -> dict:
    """Validation and test perplexity of each variant's newest checkpoint."""
    from classicnets.data.ptb import load_ptb
    from classicnets.train.language_model import evaluate_perplexity

    corpus = load_ptb(config.data_dir, config.download)
    out = {}
    for variant, trained in load_models(config, run_dir, device).items():
        metrics: dict[str, Any] = {"step": trained.step, "checkpoint": trained.checkpoint}
        for split in ("valid", "test"):
            ids = corpus.split(split)[: config.eval_limit]
            ppl, total, count = evaluate_perplexity(
                trained.model, ids, config.eval_batch_size, config.eval_num_steps
            )
            metrics.update({f"{split}_perplexity": ppl, f"{split}_tokens": count})
        metrics["loss"] = math.log(metrics["test_perplexity"])
        out[variant] = metrics
    return out


def sample(
    config: RNNvsLSTMConfig,
    run_dir: RunDir,
    device: str = "cpu",
    request: SampleRequest | None = None,
) -> str:
    """``request.n`` words from the run's LSTM (or ``request.variant``), continuing
    ``request.prompt``; returns the text (prompt included), one sentence per line."""
    request = request or SampleRequest()
    if request.variant is not None and request.variant not in config.variants:
        raise ExperimentError(
            f"--variant {request.variant!r} is not a model of this run; its models: "
            f"{', '.join(config.variants)}"
        )
    order = (
        [request.variant] if request.variant else sorted(config.variants, key=lambda v: v != "lstm")
    )
    models = {}
    for variant in order:  # the first one with a checkpoint
        models = load_models(config, run_dir, device, variants=[variant])
        if models:
            break
    if not models:
        raise ExperimentError(
            f"{run_dir.checkpoints}: no checkpoint of {', '.join(order)} to sample from "
            f"(has the run started?)"
        )
    trained = next(iter(models.values()))
    from classicnets.data.ptb import EOS, Vocabulary, render_text

    vocabulary = Vocabulary(trained.info["vocabulary"])
    prompt = (request.prompt or "").split()
    unknown = [w for w in prompt if w not in vocabulary]
    if unknown:
        raise ExperimentError(
            f"prompt word {unknown[0]!r} is not in the vocabulary ({len(vocabulary)} words; "
            f"Penn Treebank is lower-case, numbers are 'N', rare words '<unk>')"
        )
    context = vocabulary.encode([EOS, *prompt])  # a sentence starts after an <eos>
    ids = generate(trained.model, context, request.n, vocabulary.eos_id, request.temperature,
                   request.seed)  # fmt: skip
    return render_text(prompt + vocabulary.decode(ids))


DESCRIPTION = "vanilla RNN (tanh, ReLU) vs LSTM language models on Penn Treebank (Zaremba 2014)"
EXPERIMENT = Experiment(
    "rnn-vs-lstm", DESCRIPTION, RNNvsLSTMConfig, run, evaluate_trained, load_models, sample, PLOTS
)
