"""Text for language models: vocabularies, corpora, deterministic splits, (batch, time) windows.

    corpus = pydoc_corpus()                         # offline: Python's own pydoc topics, 90/10 split
    corpus.train, corpus.val                        # int32 token streams [N]
    corpus.vocab.decode(corpus.val[:80])
    x, y = random_windows(key, train_tokens, batch_size=32, block_size=128)   # [32, 128] each, y = x shifted

    ptb = load_ptb("data/ptb")                      # word level: ptb.{train,valid,test}.txt

Vocabularies put the specials first: ``<unk>`` is id 0, ``<eos>`` id 1. Anything not in the
vocabulary encodes as ``<unk>``. A word corpus marks each line's end with ``<eos>`` (Mikolov's PTB
convention: the model predicts the end of every sentence).
"""
from __future__ import annotations

import collections
import dataclasses
import pathlib
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet.arguments import check_fraction
from jaxnet.data.checks import read_text

UNK, EOS = "<unk>", "<eos>"
SPECIALS = (UNK, EOS)
PTB_FILES = {"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "ptb.test.txt"}


@dataclasses.dataclass(frozen=True)
class Vocab:
    """An ordered token list: id ``i`` is ``tokens[i]``; ``<unk>`` is 0 and ``<eos>`` is 1.

    Attributes:
      tokens: the tokens, specials first.
      level: "char" (tokens are characters, decoded by joining) or "word" (joined by spaces).
    """

    tokens: tuple[str, ...]
    level: str = "char"

    def __post_init__(self):
        if self.tokens[:2] != SPECIALS:
            raise ValueError(f"a Vocab starts with {SPECIALS}, got {self.tokens[:2]}")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("a Vocab's tokens must be distinct")
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(self.tokens)})

    @classmethod
    def build(cls, tokens: Iterable[str], *, level: str, max_size: int | None = None,
              min_count: int = 1) -> "Vocab":
        """The vocabulary of ``tokens``: most frequent first (ties by first appearance), specials
        in front; at most ``max_size`` tokens in all, each seen at least ``min_count`` times."""
        counts = collections.Counter(t for t in tokens if t not in SPECIALS)
        ranked = [t for t, c in counts.most_common() if c >= min_count]  # stable: ties keep order seen
        if max_size is not None:
            ranked = ranked[: max(max_size - len(SPECIALS), 0)]
        return cls(SPECIALS + tuple(ranked), level)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def unk_id(self) -> int:
        return 0

    @property
    def eos_id(self) -> int:
        return 1

    def encode(self, tokens: Iterable[str]) -> np.ndarray:
        """``[N] int32`` ids; unknown tokens become ``<unk>``."""
        index = self._index
        return np.fromiter((index.get(t, 0) for t in tokens), dtype=np.int32)

    def decode(self, ids) -> str | list[str]:
        """Text of ``ids: [N]`` (or a list of texts for ``[B, N]``)."""
        ids = np.asarray(ids)
        if ids.ndim == 2:
            return [self.decode(row) for row in ids]
        words = [self.tokens[i] for i in ids.tolist()]
        return "".join(words) if self.level == "char" else " ".join(words)


def char_vocab(text: str) -> Vocab:
    """Character vocabulary of ``text`` (its distinct characters, most frequent first)."""
    return Vocab.build(text, level="char")


def word_tokens(lines: Iterable[str], eos: bool = True) -> list[str]:
    """Whitespace-split words of each line, each line followed by ``<eos>`` (PTB convention)."""
    out: list[str] = []
    for line in lines:
        out.extend(line.split())
        if eos:
            out.append(EOS)
    return out


def word_vocab(lines: Iterable[str], *, max_size: int | None = None, min_count: int = 1) -> Vocab:
    """Word vocabulary of ``lines`` (with ``<eos>``); rarer words than ``min_count`` become ``<unk>``."""
    return Vocab.build(word_tokens(lines), level="word", max_size=max_size, min_count=min_count)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Token streams of a corpus and its vocabulary.

    Attributes:
      vocab: built from the training split only.
      train, val: ``[N] int32`` streams; ``test`` too where the corpus has one (else None).
      name: where it came from.
    """

    vocab: Vocab
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray | None = None
    name: str = ""


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """``(head, tail)``: the last ``val_fraction`` of the characters held out, no shuffling."""
    val_fraction = check_fraction(val_fraction, "val_fraction")
    cut = len(text) - int(round(len(text) * val_fraction))
    return text[:cut], text[cut:]


def pydoc_text() -> str:
    """The English text of Python's ``pydoc_data.topics`` (about 465k characters), topics
    sorted by name and concatenated: a real corpus that every CPython ships."""
    from pydoc_data.topics import topics

    return "".join(topics[name] for name in sorted(topics))


def char_corpus(text: str, val_fraction: float = 0.1, name: str = "") -> Corpus:
    """A character corpus: the last ``val_fraction`` held out, the vocabulary from the rest."""
    train_text, val_text = split_text(text, val_fraction)
    vocab = char_vocab(train_text)
    return Corpus(vocab, vocab.encode(train_text), vocab.encode(val_text), None, name)


def pydoc_corpus(val_fraction: float = 0.1) -> Corpus:
    """The default offline corpus at character level (see ``pydoc_text``), last 10% held out."""
    return char_corpus(pydoc_text(), val_fraction, name="pydoc_data.topics")


def read_lines(path, encoding: str = "utf-8") -> list[str]:
    """The lines of a text file decoded with ``encoding``, a leading byte-order mark dropped.

    Raises:
      ValueError: naming the file and line of bytes that are not valid in ``encoding`` (or of a
        NUL character: a binary file).
    """
    return read_text(path, encoding).splitlines()


def load_ptb(data_dir, *, level: str = "word", encoding: str = "utf-8") -> Corpus:
    """Penn Treebank language-modelling files (Mikolov's ``ptb.{train,valid,test}.txt``).

    One sentence a line, lower case, numbers as ``N``, rare words already ``<unk>`` (10k word
    vocabulary). ``level="word"``: words with ``<eos>`` after each line; ``level="char"``:
    characters, each line ending in ``\\n``. The vocabulary comes from the training file. Files
    are decoded with ``encoding``; a byte-order mark is not part of the first word.

    Raises:
      FileNotFoundError: naming the missing file.
      ValueError: for an unknown ``level``, a file with no words (naming it), or one that does not
        decode (naming the file and line).
    """
    if level not in ("word", "char"):
        raise ValueError(f"level must be 'word' or 'char', got {level!r}")
    data_dir = pathlib.Path(data_dir)
    splits = {}
    for split, fname in PTB_FILES.items():
        path = data_dir / fname
        if not path.is_file():
            raise FileNotFoundError(f"Penn Treebank file {path} not found (need {', '.join(PTB_FILES.values())} "
                                    f"in {data_dir})")
        splits[split] = read_lines(path, encoding)
        if not any(line.strip() for line in splits[split]):
            raise ValueError(f"{path}: no words (an empty Penn Treebank file)")
    if level == "word":
        vocab = word_vocab(splits["train"])
        enc = {k: vocab.encode(word_tokens(v)) for k, v in splits.items()}
    else:
        vocab = char_vocab("\n".join(splits["train"]) + "\n")
        enc = {k: vocab.encode("\n".join(v) + "\n") for k, v in splits.items()}
    return Corpus(vocab, enc["train"], enc["valid"], enc["test"], name=f"ptb ({level})")


# --- windows ------------------------------------------------------------------------------------

def random_windows(key: jax.Array, tokens: jax.Array, batch_size: int, block_size: int):
    """``(x, y)``, each ``[batch_size, block_size] int32``: windows at uniform random starts of
    ``tokens: [N]`` and the same windows one token later (the next-token targets).

    Jittable (``batch_size`` and ``block_size`` static): the gather runs where ``tokens`` lives,
    so a device-resident stream never crosses to the host.
    """
    n = tokens.shape[0]
    if n < block_size + 1:
        raise ValueError(f"a stream of {n} tokens has no window of {block_size} + 1 tokens")
    starts = jax.random.randint(key, (batch_size, 1), 0, n - block_size)  # (B, 1)
    idx = starts + jnp.arange(block_size + 1)[None, :]  # (B, T + 1)
    w = jnp.take(tokens, idx, axis=0)
    return w[:, :-1], w[:, 1:]


def stream_windows(tokens, block_size: int, stride: int | None = None):
    """Every window of ``tokens: [N]`` for evaluation: ``(x, y, score)``, each ``[W, block_size]``.

    Windows start every ``stride`` tokens (default ``block_size``: no overlap). ``score`` marks the
    targets each window is responsible for, so every target of ``tokens[1:]`` is scored exactly
    once: with ``stride < block_size`` a window scores only its last ``stride`` positions (each
    with at least ``block_size - stride`` tokens of context), the first window all of its own.
    The last window is padded (``score`` False there) so none is dropped.
    """
    tokens = np.asarray(tokens)
    stride = block_size if stride is None else stride
    if not 0 < stride <= block_size:
        raise ValueError(f"need 0 < stride <= block_size, got stride={stride}, block_size={block_size}")
    n_targets = len(tokens) - 1
    if n_targets < 1:
        raise ValueError("a stream needs at least 2 tokens")
    starts = [0]
    while starts[-1] + block_size < n_targets:
        starts.append(starts[-1] + stride)
    x = np.zeros((len(starts), block_size), np.int32)
    y = np.zeros_like(x)
    score = np.zeros(x.shape, bool)
    scored_until = 0  # targets [0, scored_until) are already scored (target j is tokens[j + 1])
    for i, s in enumerate(starts):
        seg = tokens[s: s + block_size + 1]
        m = len(seg) - 1
        x[i, :m], y[i, :m] = seg[:-1], seg[1:]
        first = max(scored_until - s, 0)
        score[i, first:m] = True
        scored_until = s + m
    return x, y, score


def batchify(tokens, batch_size: int) -> np.ndarray:
    """``[batch_size, N // batch_size]``: the stream cut into ``batch_size`` contiguous rows (the
    classic truncated-BPTT layout; the remainder is dropped)."""
    tokens = np.asarray(tokens)
    per_row = len(tokens) // batch_size
    if per_row < 1:
        raise ValueError(f"{len(tokens)} tokens cannot fill {batch_size} rows")
    return tokens[: per_row * batch_size].reshape(batch_size, per_row)


__all__ = ["Corpus", "EOS", "PTB_FILES", "SPECIALS", "UNK", "Vocab", "batchify", "char_corpus", "char_vocab",
           "load_ptb", "pydoc_corpus", "pydoc_text", "random_windows", "read_lines", "split_text",
           "stream_windows", "word_tokens", "word_vocab"]

