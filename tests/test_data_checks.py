"""Data checks and the synthetic regression set."""
import codecs
import re

import numpy as np
import pytest

from jaxnet.data import as_float_array, check_same_length, make_regression, train_val_split
from jaxnet.data.checks import read_text, snippet


def test_synthetic_regression_is_seeded_and_shaped():
    a, b, c = make_regression(50, 10, seed=0), make_regression(50, 10, seed=0), make_regression(50, 10, seed=1)
    assert a.x.shape == (50, 10) and a.y.shape == (50, 1) and a.x.dtype == np.float32
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a.x, c.x)


def test_synthetic_noise_level_is_the_stated_one():
    """Residuals from the generating function have the stated standard deviation."""
    clean = make_regression(20000, 10, noise_std=0.0, seed=5)
    noisy = make_regression(20000, 10, noise_std=0.3, seed=5)
    np.testing.assert_array_equal(clean.x, noisy.x)
    assert abs(np.std(noisy.y - clean.y) / 0.3 - 1) < 0.03  # 20k draws: sd of the estimate ~0.5%


def test_split_is_a_seeded_partition():
    x = np.arange(20, dtype=np.float32)[:, None]
    xt, xv = train_val_split(x, val_fraction=0.25, seed=3)
    assert len(xv) == 5 and len(xt) == 15
    assert sorted(np.concatenate([xt, xv])[:, 0].tolist()) == list(range(20))
    np.testing.assert_array_equal(xv, train_val_split(x, val_fraction=0.25, seed=3)[1])


@pytest.mark.parametrize("value, error", [
    (np.array([1, 2, 3]), TypeError),
    (np.array([True, False]), TypeError),
    (np.array(["a", "b"]), TypeError),
    (np.array([1.0, None], dtype=object), TypeError),
    (np.array([1 + 2j]), TypeError),
    (np.array([1.0, np.nan]), ValueError),
    (np.array([[1.0, -np.inf]]), ValueError),
])
def test_as_float_array_rejects(value, error):
    with pytest.raises(error, match="my_array"):
        as_float_array(value, "my_array")


def test_check_same_length():
    assert check_same_length(x=np.zeros((3, 2)), y=np.zeros(3)) == 3
    with pytest.raises(ValueError, match=r"x.shape=\(3, 2\), y.shape=\(4,\)"):
        check_same_length(x=np.zeros((3, 2)), y=np.zeros(4))


def test_snippet_cuts_long_input_and_says_how_long_it_was():
    assert snippet("a\tb") == "'a\\tb'"
    long = snippet("x" * 10_000_000)
    assert long == repr("x" * 80) + "... (10000000 characters)"
    assert snippet(list(range(1000))).endswith("...") and len(snippet(list(range(1000)))) == 83


def test_read_text_drops_a_bom_and_names_file_and_line_of_bad_bytes(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(codecs.BOM_UTF8 + "héllo\nworld\n".encode())
    assert read_text(path) == "héllo\nworld\n"
    path.write_bytes("ok\nd\xe9j\xe0 vu\n".encode("latin-1"))
    where = re.escape(str(path))
    with pytest.raises(ValueError, match=rf"^{where}:2: byte 4 is not valid utf-8; .*encoding='latin-1'"):
        read_text(path)
    assert read_text(path, encoding="latin-1") == "ok\ndéjà vu\n"
    path.write_bytes("one\ntwo\n".encode("utf-16"))
    with pytest.raises(ValueError, match=rf"^{where}:1: .*UTF-16 byte-order mark: pass encoding='utf-16'"):
        read_text(path)
    assert read_text(path, encoding="utf-16") == "one\ntwo\n"
    path.write_bytes(b"text\nwith a \x00 inside\n")
    with pytest.raises(ValueError, match=rf"^{where}:2: NUL character"):
        read_text(path)
    with pytest.raises(ValueError, match="unknown encoding 'klingon'"):
        read_text(path, encoding="klingon")
