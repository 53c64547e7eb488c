"""Text data: vocabularies, the Penn Treebank loader on its shipped sample, the default corpus's
split, and (batch, time) windows."""
import pathlib
import re

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxnet.data import text

PTB_SAMPLE = pathlib.Path(__file__).parent / "data" / "ptb"


# --- vocabularies -----------------------------------------------------------------------------------

def test_vocab_puts_specials_first_then_most_frequent_and_maps_unknowns_to_unk():
    v = text.char_vocab("abbccc")
    assert v.tokens == ("<unk>", "<eos>", "c", "b", "a")
    assert (v.unk_id, v.eos_id) == (0, 1)
    np.testing.assert_array_equal(v.encode("cabz"), [2, 4, 3, 0])
    assert v.decode(v.encode("abc")) == "abc"
    assert v.decode(np.array([[2, 3], [4, 4]])) == ["cb", "aa"]


def test_word_vocab_ends_lines_with_eos_and_honours_min_count_and_max_size():
    lines = ["the cat sat", "the dog"]
    assert text.word_tokens(lines) == ["the", "cat", "sat", "<eos>", "the", "dog", "<eos>"]
    v = text.word_vocab(lines)
    assert v.tokens[:3] == ("<unk>", "<eos>", "the") and len(v) == 6
    assert text.word_vocab(lines, min_count=2).tokens == ("<unk>", "<eos>", "the")
    assert len(text.word_vocab(lines, max_size=4)) == 4
    assert v.decode(v.encode(["the", "cow"])) == "the <unk>"


def test_vocab_rejects_missing_specials_and_duplicates():
    with pytest.raises(ValueError, match="starts with"):
        text.Vocab(("a", "b"))
    with pytest.raises(ValueError, match="distinct"):
        text.Vocab(("<unk>", "<eos>", "a", "a"))


# --- Penn Treebank -----------------------------------------------------------------------------------

def test_ptb_loader_reads_the_sample_at_word_level():
    corpus = text.load_ptb(PTB_SAMPLE)
    lines = {s: text.read_lines(PTB_SAMPLE / f) for s, f in text.PTB_FILES.items()}
    # One <eos> per sentence, every word kept: the stream is words + lines long.
    for split, ids in (("train", corpus.train), ("valid", corpus.val), ("test", corpus.test)):
        assert len(ids) == sum(len(l.split()) + 1 for l in lines[split])
        assert np.sum(ids == corpus.vocab.eos_id) == len(lines[split])
        assert ids.dtype == np.int32
    # The file's own <unk> is the vocabulary's <unk>, not a separate word.
    assert corpus.vocab.tokens.count("<unk>") == 1
    assert np.sum(corpus.train == 0) == sum(l.split().count("<unk>") for l in lines["train"])
    # The vocabulary comes from the training file: words seen only in valid/test become <unk>.
    assert "consumers" not in corpus.vocab.tokens
    assert corpus.vocab.decode(corpus.val[:4]) == "<unk> <unk> <unk> to"
    assert corpus.vocab.decode(corpus.train[24:30]) == "<eos> pierre <unk> N years old"


def test_ptb_loader_char_level_and_missing_files(tmp_path):
    corpus = text.load_ptb(PTB_SAMPLE, level="char")
    assert corpus.vocab.level == "char" and "\n" in corpus.vocab.tokens
    assert corpus.vocab.decode(corpus.train[:8]) == " aer ban"
    with pytest.raises(FileNotFoundError, match="ptb.train.txt"):
        text.load_ptb(tmp_path)
    with pytest.raises(ValueError, match="level"):
        text.load_ptb(PTB_SAMPLE, level="byte")


def test_ptb_loader_drops_a_bom_and_names_bad_files(tmp_path):
    for fname in text.PTB_FILES.values():
        (tmp_path / fname).write_text("\ufeffthe cat\nsat\n", encoding="utf-8")
    corpus = text.load_ptb(tmp_path)
    assert corpus.vocab.decode(corpus.train) == "the cat <eos> sat <eos>"  # not '\ufeffthe'
    assert "\ufeff" not in text.load_ptb(tmp_path, level="char").vocab.tokens
    valid = tmp_path / "ptb.valid.txt"
    valid.write_bytes("a b\nc\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(valid))}:2: byte 5 is not valid utf-8"):
        text.load_ptb(tmp_path)
    assert text.load_ptb(tmp_path, encoding="latin-1").val.shape == (5,)
    valid.write_text("\n \n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(valid))}: no words"):
        text.load_ptb(tmp_path)


# --- the default corpus ------------------------------------------------------------------------------

def test_pydoc_corpus_is_a_deterministic_90_10_split_of_the_sorted_topics():
    full = text.pydoc_text()
    assert len(full) > 100_000
    a, b = text.pydoc_corpus(), text.pydoc_corpus()
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.val, b.val)
    assert len(a.train) + len(a.val) == len(full)
    assert len(a.val) == round(0.1 * len(full))
    # The held-out part is the tail of the text, unshuffled.
    head, tail = text.split_text(full, 0.1)
    assert head + tail == full and a.vocab.decode(a.val[:200]) == tail[:200].translate(
        {ord(c): "<unk>" for c in set(tail[:200]) - set(a.vocab.tokens)})
    with pytest.raises(ValueError):
        text.split_text(full, 1.0)


# --- windows -----------------------------------------------------------------------------------------

def test_random_windows_are_shifted_substrings_drawn_on_device_and_reproducible():
    tokens = np.arange(1000, dtype=np.int32)  # a window of arange is consecutive integers
    draw = jax.jit(text.random_windows, static_argnums=(2, 3))
    x, y = draw(jax.random.key(0), tokens, 16, 32)
    assert x.shape == y.shape == (16, 32)
    np.testing.assert_array_equal(np.diff(np.asarray(x), axis=1), 1)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x) + 1)
    assert int(y.max()) <= 999 and int(x.min()) >= 0
    x2, _ = draw(jax.random.key(0), tokens, 16, 32)
    np.testing.assert_array_equal(x, x2)
    assert len(np.unique(np.asarray(x)[:, 0])) > 8  # starts vary
    with pytest.raises(ValueError, match="no window"):
        text.random_windows(jax.random.key(0), tokens[:32], 2, 32)


@given(n=st.integers(2, 300), block=st.integers(1, 40), stride_frac=st.floats(0.01, 1.0))
def test_stream_windows_score_every_target_once_with_enough_context(n, block, stride_frac):
    stride = max(1, int(round(block * stride_frac)))
    tokens = np.arange(n)
    x, y, score = text.stream_windows(tokens, block, stride)
    np.testing.assert_array_equal(np.sort(y[score]), np.arange(1, n))  # every target exactly once
    cols = np.nonzero(score)[1]
    first_row = np.nonzero(score)[0] == 0
    # Outside the first window each scored target sees at least block - stride tokens before it.
    assert np.all(cols[~first_row] >= block - stride)
    np.testing.assert_array_equal(x[score] + 1, y[score])


def test_batchify_cuts_contiguous_rows():
    rows = text.batchify(np.arange(10), 3)
    np.testing.assert_array_equal(rows, [[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    with pytest.raises(ValueError):
        text.batchify(np.arange(2), 3)
