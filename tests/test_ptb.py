"""classicnets.data.ptb: the corpus against the published counts, batching and BPTT windows."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from classicnets.data.ptb import (
    EOS,
    Vocabulary,
    batchify,
    bptt_windows,
    encode_file,
    evaluation_rows,
    load_ptb,
    num_windows,
    window,
)
from classicnets.data.sources import DataError


@pytest.fixture(scope="module")
def ptb_root() -> Path:
    for candidate in (
        os.environ.get("CLASSICNETS_DATA"),
        Path(__file__).parents[2] / "shared/data",
    ):
        if candidate and (Path(candidate) / "ptb").is_dir():
            return Path(candidate)
    if os.environ.get("CLASSICNETS_REQUIRE_DATA") == "1":
        pytest.fail("PTB not found (set CLASSICNETS_DATA to the data root)")
    pytest.skip("PTB not found (set CLASSICNETS_DATA to the data root)")


@pytest.fixture(scope="module")
def corpus(ptb_root):
    return load_ptb(ptb_root, download=False)


def test_vocabulary_and_token_counts_match_the_published_ones(corpus, ptb_root):
    # shared/data/README.md: 10,000 types with <eos>; 929,589 / 73,760 / 82,430 tokens with one
    # <eos> per line (42,068 / 3,370 / 3,761 lines).
    vocab = corpus.vocabulary
    assert len(vocab) == 10_000 and EOS in vocab and "<unk>" in vocab
    assert [len(corpus.train), len(corpus.valid), len(corpus.test)] == [929_589, 73_760, 82_430]
    eos = vocab.eos_id
    counts = [int((s == eos).sum()) for s in (corpus.train, corpus.valid, corpus.test)]
    assert counts == [42_068, 3_370, 3_761]
    for s in (corpus.train, corpus.valid, corpus.test):
        assert s.dtype == torch.int64 and int(s.min()) >= 0 and int(s.max()) < 10_000
    # The first line, read independently of the module.
    first = (ptb_root / "ptb" / "ptb.test.txt").read_text().split("\n")[0].split()
    assert vocab.decode(corpus.test[: len(first) + 1]) == [*first, EOS]
    # TF tutorial order: decreasing count, ties alphabetical.
    counter = Counter(corpus.train.tolist())
    frequencies = [counter[i] for i in range(len(vocab))]
    assert frequencies == sorted(frequencies, reverse=True)
    assert vocab.words[:3] == ["the", "<unk>", EOS]


def test_load_returns_fresh_tensors(corpus, ptb_root):
    mine = load_ptb(ptb_root, download=False)  # parsed once per process, copied per call
    mine.valid[0] += 1
    assert int(load_ptb(ptb_root, download=False).valid[0]) == int(corpus.valid[0])


def test_word_outside_the_vocabulary_names_word_file_and_line(corpus, ptb_root, tmp_path):
    lines = (ptb_root / "ptb" / "ptb.valid.txt").read_text().split("\n")
    lines[2] = lines[2] + " zyxwvut"
    bad = tmp_path / "ptb.valid.txt"
    bad.write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"ptb\.valid\.txt:3: word 'zyxwvut' is not in the"):
        encode_file(bad, corpus.vocabulary)


def test_vocabulary_round_trip_and_errors():
    v = Vocabulary(["<eos>", "a", "b"])
    assert v.decode(v.encode(["b", "a", "<eos>"])) == ["b", "a", "<eos>"]
    with pytest.raises(KeyError, match="'c' is not in the vocabulary"):
        v.id("c")
    with pytest.raises(ValueError, match="distinct"):
        Vocabulary(["a", "a"])


def test_batchify_shapes_and_content():
    ids = torch.arange(26)
    data = batchify(ids, 4)
    assert data.shape == (4, 6)
    assert data.tolist() == [list(range(r * 6, r * 6 + 6)) for r in range(4)]  # 24, 25 dropped
    assert batchify(ids, 1).shape == (1, 26) and batchify(ids, 26).shape == (26, 1)
    with pytest.raises(ValueError, match="batch_size"):
        batchify(ids, 27)
    with pytest.raises(ValueError, match="1-d"):
        batchify(data, 2)


@pytest.mark.parametrize(("length", "batch", "steps"), [(26, 4, 2), (103, 5, 7), (50, 3, 100)])
def test_windows_cover_every_target_exactly_once(length, batch, steps):
    data = batchify(torch.arange(length), batch)  # a row's next token is its value + 1
    windows = list(bptt_windows(data, steps))
    assert len(windows) == num_windows(data.shape[1], steps)
    targets = torch.cat([t for _, t in windows], dim=1)
    assert torch.equal(targets, data[:, 1:])  # each target once, in order
    for (x, y), k in zip(windows, range(len(windows))):
        assert torch.equal(y, x + 1) and x.shape[1] <= steps
        assert torch.equal(x, window(data, k, steps)[0])
    assert [x.shape[1] for x, _ in windows[:-1]] == [steps] * (len(windows) - 1)
    assert list(bptt_windows(data, steps, start=len(windows) - 1))[0][0].equal(windows[-1][0])
    with pytest.raises(IndexError):
        window(data, len(windows), steps)


def test_windows_of_the_training_split(corpus):
    data = batchify(corpus.train, 20)  # Zaremba small: batch 20, 20 steps
    assert data.shape == (20, 46_479)
    assert num_windows(data.shape[1], 20) == 2324  # the last window has 18 steps
    assert window(data, 2323, 20)[1].shape == (20, 18)


@pytest.mark.parametrize("length", [2, 3, 14, 31, 100])
def test_evaluation_rows_predict_every_token_but_the_first_once(length):
    ids = torch.arange(length)
    for batch in range(1, length):
        rows, tail = evaluation_rows(ids, batch)
        assert rows.shape[0] == batch and len(tail) - 1 == (length - 1) % batch
        targets = torch.cat([rows[:, 1:].reshape(-1), tail[1:]])
        assert torch.equal(targets, torch.arange(1, length))  # each once, in stream order
        assert torch.equal(rows[:, 1:], rows[:, :-1] + 1) and torch.equal(tail[1:], tail[:-1] + 1)
        assert int(tail[0]) == int(rows[-1, -1])  # the tail continues the last row
    with pytest.raises(ValueError, match="batch_size"):
        evaluation_rows(ids, length)
