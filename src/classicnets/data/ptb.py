"""Penn Treebank (Mikolov's preprocessed word-level version) as token-id streams.

The three files ``ptb.{train,valid,test}.txt`` hold one sentence per line, already lower-cased,
with numbers mapped to ``N`` and rare words to ``<unk>``. As in pytorch/examples
(``word_language_model/data.py``) and the TensorFlow tutorial (``ptb/reader.py``), each line
becomes its words followed by one end-of-sentence token ``<eos>``, and a split is the
concatenation of its lines: one long stream of ids. Token counts with ``<eos>``: train 929,589,
valid 73,760, test 82,430. The vocabulary is built from the training split: 10,000 types,
``<eos>`` included (shared/data/README.md); valid and test hold no other word, and one that does
is an error naming the word, the file and the line.

Language models train on ``batchify``'d streams cut into truncated back-propagation windows
(``bptt_windows``); evaluation uses ``evaluation_rows``, which makes every token but the first
a target exactly once whatever the batch size (see ``train.language_model``).

Files are found and verified as for MNIST (``sources.fetch``: explicit directory,
``$CLASSICNETS_DATA``, ``~/.cache/classicnets``, checksummed download).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from classicnets.choices import check_choice
from classicnets.data.sources import DataError, fetch

__all__ = [
    "EOS",
    "FILES",
    "SPLITS",
    "UNK",
    "Corpus",
    "Vocabulary",
    "batchify",
    "bptt_windows",
    "encode_file",
    "evaluation_rows",
    "load_ptb",
    "num_windows",
    "read_lines",
    "render_text",
    "window",
]

EOS = "<eos>"  # appended to every line
UNK = "<unk>"  # already in the files: Mikolov's stand-in for rare words
SPLITS = ("train", "valid", "test")
FILES = {split: f"ptb.{split}.txt" for split in SPLITS}


class Vocabulary:
    """Word <-> id mapping.

    ``Vocabulary.from_file`` orders the words as the TensorFlow tutorial's ``_build_vocab``
    does: by decreasing count in the training text, ties alphabetically, so id 0 is the most
    frequent word. The order has no effect on what a model can learn; it only fixes the ids.

    Args:
        words: the words, in id order; they must be distinct.

    >>> v = Vocabulary(["<eos>", "the", "cat"])
    >>> v.encode(["the", "cat", "<eos>"]), v.decode([2, 1]), len(v)
    ([1, 2, 0], ['cat', 'the'], 3)
    """

    def __init__(self, words: Sequence[str]) -> None:
        self.words: list[str] = list(words)
        self.ids: dict[str, int] = {w: i for i, w in enumerate(self.words)}
        if len(self.ids) != len(self.words):
            duplicates = sorted(w for w, n in Counter(self.words).items() if n > 1)
            raise ValueError(f"vocabulary words must be distinct; repeated: {duplicates[:5]}")

    @classmethod
    def from_counts(cls, counts: Counter) -> Vocabulary:
        """Words by decreasing count, ties broken alphabetically (TF tutorial's order)."""
        return cls([w for w, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))])

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Vocabulary:
        """Every word of ``path`` plus ``<eos>`` (one per line), ordered by ``from_counts``."""
        counts: Counter = Counter()
        for words in read_lines(path):
            counts.update(words)
        return cls.from_counts(counts)

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: object) -> bool:
        return word in self.ids

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words: {' '.join(self.words[:5])} ...)"

    @property
    def eos_id(self) -> int:
        """The id of ``<eos>``."""
        return self.ids[EOS]

    def id(self, word: str) -> int:
        """The id of ``word``; ``KeyError`` naming it when it is not in the vocabulary."""
        try:
            return self.ids[word]
        except KeyError:
            raise KeyError(f"{word!r} is not in the vocabulary ({len(self)} words)") from None

    def word(self, index: int) -> str:
        """The word with id ``index``."""
        return self.words[index]

    def encode(self, words: Iterable[str]) -> list[int]:
        """Ids of ``words`` (``KeyError`` naming the first unknown one)."""
        return [self.id(w) for w in words]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words of ``ids`` (ints or a 1-d tensor)."""
        return [self.words[int(i)] for i in ids]


@dataclass(frozen=True)
class Corpus:
    """The three splits as 1-d int64 id tensors, and the vocabulary (from ``train``)."""

    vocabulary: Vocabulary
    train: Tensor
    valid: Tensor
    test: Tensor

    def split(self, name: str) -> Tensor:
        """The ids of split ``name`` ("train", "valid" or "test")."""
        return getattr(self, check_choice("split", name, SPLITS))


def read_lines(path: str | os.PathLike[str]) -> Iterator[list[str]]:
    """The words of each line of ``path``, each followed by ``<eos>``.

    A line is split on whitespace, so the leading space of Mikolov's lines does not make an
    empty word. A last line without a newline still gets its ``<eos>`` (as pytorch/examples).
    """
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield line.split() + [EOS]


def render_text(words: Iterable[str]) -> str:
    """Words as PTB text, the inverse of ``read_lines``: separated by spaces, each ``<eos>``
    ending a line (a last line without one is kept, without a newline).

    >>> render_text(["the", "cat", "<eos>", "sat"])
    'the cat\\nsat'
    """
    lines, current = [], []
    for word in words:
        if word == EOS:
            lines.append(" ".join(current))
            current = []
        else:
            current.append(word)
    if current:
        lines.append(" ".join(current))
    return "\n".join(lines)


def encode_file(path: str | os.PathLike[str], vocabulary: Vocabulary) -> np.ndarray:
    """The id stream of ``path`` (int64), ``<eos>`` after each line.

    Raises:
        DataError: a word outside ``vocabulary``, naming the word, the file and the line.
    """
    ids = vocabulary.ids
    out: list[int] = []
    for lineno, words in enumerate(read_lines(path), start=1):
        try:
            out.extend([ids[w] for w in words])
        except KeyError:
            bad = next(w for w in words if w not in ids)
            raise DataError(
                f"{path}:{lineno}: word {bad!r} is not in the training vocabulary "
                f"({len(vocabulary)} words); the Penn Treebank files map rare words to {UNK}, "
                f"so this file is not the official one"
            ) from None
    return np.asarray(out, dtype=np.int64)


# Parsed corpora of this process, keyed by what changes when a file is replaced:
# (real path, size, mtime_ns) of the three files. load_ptb hands out fresh tensors each time.
_CACHE: dict[tuple, tuple[Vocabulary, dict[str, np.ndarray]]] = {}


def load_ptb(data_dir: str | os.PathLike[str] | None = None, download: bool = True) -> Corpus:
    """Penn Treebank's three splits as id streams, with the training vocabulary.

    Args:
        data_dir: the data root (the files are in ``<root>/ptb/``); None resolves it as
            ``sources.resolve_root`` does (``$CLASSICNETS_DATA``, then ``~/.cache/classicnets``).
        download: download missing files (sha256-verified) into the data root.

    Returns:
        A ``Corpus``: ``train``/``valid``/``test`` int64 tensors of 929,589 / 73,760 / 82,430
        ids on the official files, and a 10,000-word ``Vocabulary``.

    Raises:
        DataError: a file is missing (and not downloaded), corrupt, or holds a word outside the
            training vocabulary (valid and test).
    """
    folder = fetch("ptb", data_dir, download)
    paths = {split: Path(folder) / FILES[split] for split in SPLITS}
    key = tuple(
        (os.path.realpath(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths.values()
    )
    if key not in _CACHE:
        vocabulary = Vocabulary.from_file(paths["train"])
        arrays = {split: encode_file(paths[split], vocabulary) for split in SPLITS}
        _CACHE.clear()  # one corpus is enough to keep
        _CACHE[key] = (vocabulary, arrays)
    vocabulary, arrays = _CACHE[key]
    return Corpus(vocabulary, *(torch.from_numpy(arrays[s].copy()) for s in SPLITS))


def batchify(ids: Tensor, batch_size: int) -> Tensor:
    """Cut a 1-d stream into ``batch_size`` rows: ``[batch_size, len(ids) // batch_size]``.

    Row ``r`` continues where row ``r - 1`` stops, so each row is a long stretch of running text
    and a model's hidden state can be carried from one window of a row to the next. The last
    ``len(ids) % batch_size`` tokens do not fill a row and are dropped (as pytorch/examples and
    the TF tutorial do; training loses at most ``batch_size - 1`` tokens per epoch)::

        ids = a b c d e f g h i j k l m n o p q r s t u v w x y z,  batch_size = 4

        a b c d e f      <- row 0
        g h i j k l      <- row 1           shape [4, 6]
        m n o p q r      <- row 2           y z are dropped
        s t u v w x      <- row 3

    pytorch/examples lays the same rows out as columns (``[steps, batch]``); rows here are batch
    first, as ``nn.LSTM(batch_first=True)`` takes them.

    Args:
        ids: 1-d id stream.
        batch_size: number of rows (>= 1, at most ``len(ids)``).

    >>> batchify(torch.arange(10), 3)
    tensor([[0, 1, 2],
            [3, 4, 5],
            [6, 7, 8]])
    """
    if ids.ndim != 1:
        raise ValueError(f"batchify expects a 1-d stream, got shape {tuple(ids.shape)}")
    if not 1 <= batch_size <= len(ids):
        raise ValueError(f"batch_size must be in [1, {len(ids)}], got {batch_size}")
    steps = len(ids) // batch_size
    return ids[: batch_size * steps].reshape(batch_size, steps)  # [B, L]


def num_windows(length: int, num_steps: int) -> int:
    """Windows ``bptt_windows`` makes of rows of ``length`` tokens: ``ceil((length - 1) / n)``."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return max(0, -(-(length - 1) // num_steps))


def window(data: Tensor, index: int, num_steps: int) -> tuple[Tensor, Tensor]:
    """Window ``index`` of ``bptt_windows(data, num_steps)``: ``(inputs, targets)``, both
    ``[batch, n]`` with ``n = min(num_steps, length - 1 - index * num_steps)``.

    The targets are the inputs shifted by one token: ``targets[:, t]`` is the token after
    ``inputs[:, t]`` in the same row.
    """
    start = index * num_steps
    n = min(num_steps, data.shape[1] - 1 - start)
    if index < 0 or n < 1:
        raise IndexError(f"window {index} is out of range for rows of {data.shape[1]} tokens")
    return data[:, start : start + n], data[:, start + 1 : start + 1 + n]  # [B, n], [B, n]


def bptt_windows(data: Tensor, num_steps: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Truncated back-propagation windows over batchified rows, in order.

    With rows of ``L`` tokens the windows start at columns ``0, n, 2n, ...`` below ``L - 1``;
    each predicts the next ``n`` tokens of every row, and the last may be shorter, so the
    targets cover ``data[:, 1:]`` exactly once (pytorch/examples' ``get_batch``; the TF
    tutorial drops that last short window)::

        row      a b c d e f g      (L = 7, num_steps = 4: two windows, the last of 2 steps)
        inputs   a b c d | e f
        targets  b c d e | f g

    Args:
        data: ``[batch, L]`` from ``batchify``.
        num_steps: the window length (back-propagation through this many steps).
        start: index of the first window (to resume inside an epoch).

    Yields:
        ``(inputs, targets)``, two ``[batch, n]`` views of ``data``.
    """
    for index in range(start, num_windows(data.shape[1], num_steps)):
        yield window(data, index, num_steps)


def evaluation_rows(ids: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """Rows that make every token of ``ids`` but the first a target exactly once.

    A split of ``N`` tokens has ``N - 1`` (input, target) pairs. They are cut into
    ``batch_size`` rows of ``L = (N - 1) // batch_size`` pairs, consecutive rows sharing one
    token (the last target of a row is the first input of the next), and the ``R = (N - 1) %
    batch_size`` pairs left over form a tail that continues the last row::

        ids = a b c d e f g h i j k l m n,  batch_size = 3:  13 pairs, L = 4, R = 1

        rows [3, L + 1]     inputs          targets
          a b c d e         a b c d    ->   b c d e
          e f g h i         e f g h    ->   f g h i
          i j k l m         i j k l    ->   j k l m
        tail [R + 1]
          m n               m          ->   n          (after the last row, same hidden state)

    With ``batch_size = 1`` this is the whole stream, the protocol of the TF tutorial's test
    (batch 1): each token is predicted from all the tokens before it. With more rows, rows
    ``1 ..`` start from a fresh hidden state, so ``batch_size - 1`` tokens lose their left
    context; none is skipped or counted twice.

    Args:
        ids: 1-d stream of at least 2 tokens.
        batch_size: number of rows, in ``[1, len(ids) - 1]``.

    Returns:
        ``(rows, tail)``: ``[batch_size, L + 1]`` (a view) and the 1-d tail of ``R + 1`` tokens
        (``R = 0``: a single token, nothing to predict).
    """
    if ids.ndim != 1:
        raise ValueError(f"evaluation_rows expects a 1-d stream, got shape {tuple(ids.shape)}")
    pairs = len(ids) - 1
    if not 1 <= batch_size <= pairs:
        raise ValueError(
            f"batch_size must be in [1, {pairs}] for a stream of {len(ids)} tokens, "
            f"got {batch_size}"
        )
    length = pairs // batch_size
    rows = ids.unfold(0, length + 1, length)[:batch_size]  # [B, L + 1], rows overlap by one
    tail = ids[batch_size * length :]  # [R + 1]
    return rows, tail
