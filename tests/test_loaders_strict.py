"""Strict loaders (issue 20, point 2, and the loaders' part of point 8's fuzz test): every case an
adversarial user found, then Hypothesis-made bad files. Each error must be a ValueError (or the
documented KeyError / FileNotFoundError) that names the file, and the line or member where there
is one, in a short message."""
import io
import math
import pathlib
import re
import tempfile
import time
import zipfile

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from jaxnet.data import images as I
from jaxnet.data import ratings as R

DATA = pathlib.Path(__file__).parent / "data"
SHORT = 300  # characters: an error message echoes at most ~80 of the input


def write(path: pathlib.Path, content) -> pathlib.Path:
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def raises_naming(exc, path, where: str = ""):
    """``pytest.raises`` for an error whose message starts with ``path`` and then ``where``."""
    return pytest.raises(exc, match="^" + re.escape(str(path)) + where)


# --- load_movielens ----------------------------------------------------------------------------------

@pytest.mark.parametrize("row, what", [
    ("99999999999999999999\t1\t3\t5", "user id"),   # used to wrap to -2**63
    ("1.7\t1\t3\t5", "user id"),                    # used to be user 1
    ("-5\t1\t3\t5", "user id"),                     # used to give num_users = -4
    ("1\t9223372036854775807\t3\t5", "item id"),    # num_items = max id + 1 must fit int64
    ("1\t1\tnan\t5", "rating"),                     # used to load with a RuntimeWarning
    ("1\t1\tinf\t5", "rating"),
    ("1\t1\t1e39\t5", "rating"),                    # inf once cast to float32
    ("1\t1\t3\t1e30", "timestamp"),                 # used to wrap with a RuntimeWarning
    ("1\t1\t3\t5.5", "timestamp"),
])
def test_movielens_refuses_values_it_cannot_hold_naming_file_and_line(tmp_path, row, what):
    path = write(tmp_path / "u.data", f"1\t2\t3\t4\n\n{row}\n7\t8\t9\t10\n")  # line 2 blank: bad row is line 3
    with raises_naming(ValueError, path, f":3: {what} must be"):
        R.load_movielens(path)


def test_movielens_names_the_first_row_with_a_wrong_field_count(tmp_path):
    path = write(tmp_path / "r.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n1,2,3\n")
    with raises_naming(ValueError, path, ":3: expected 4 fields"):
        R.load_movielens(path)


@pytest.mark.parametrize("content", ["", "\n  \n", "userId,movieId,rating,timestamp\n",
                                     "userId,movieId,rating,timestamp\n\n"])
def test_movielens_without_ratings_is_an_error_naming_the_file(tmp_path, content):
    path = write(tmp_path / "ratings.csv", content)  # header-only used to give 0 ratings
    with raises_naming(ValueError, path, ": .*no ratings"):
        R.load_movielens(path)


@pytest.mark.parametrize("content", [
    "1\t2\t3\t4 café\n".encode("latin-1"),
    "userId,movieId,rating,timestamp\n1,2,3,4\n".encode("utf-16"),
    bytes(range(256)),
    b"1\t2\t3\x00\t4\n",  # decodes, but a NUL is a binary file
])
def test_movielens_undecodable_input_names_the_file(tmp_path, content):
    path = write(tmp_path / "u.data", content)  # used to be a UnicodeDecodeError without the name
    with raises_naming(ValueError, path, r":\d+: "):
        R.load_movielens(path)


def test_movielens_reads_other_encodings_when_told_and_drops_a_bom(tmp_path):
    text = (DATA / "ratings.csv").read_text()
    want = R.load_movielens(DATA / "ratings.csv")
    for name, data, encoding in [("bom.csv", "\ufeff" + text, "utf-8"),  # used to fail the header check
                                 ("utf16.csv", text.encode("utf-16"), "utf-16")]:
        got = R.load_movielens(write(tmp_path / name, data), encoding=encoding)
        for field in ("user", "item", "rating", "timestamp"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field))


def test_movielens_error_for_a_10_mb_line_is_short(tmp_path):
    path = write(tmp_path / "u.data", "1\t2\t3\t4\n1\t1\t3\t" + "9" * 10_000_000 + "x\n")
    with raises_naming(ValueError, path, ":2: timestamp") as info:
        R.load_movielens(path)
    assert len(str(info.value)) < SHORT  # used to be 10 million characters


def test_movielens_extra_columns_take_the_row_by_row_parser_to_the_same_values(tmp_path):
    """A header with a fifth column sends the file through the Python parser; NumPy's parses the
    4-column file. Both give the same arrays and dtypes, and both hold every row to the header."""
    rows = (DATA / "ratings.csv").read_text().splitlines()
    wide = write(tmp_path / "wide.csv", "\n".join(r + (",tag" if i else ",tags") for i, r in enumerate(rows)))
    got, want = R.load_movielens(wide), R.load_movielens(DATA / "ratings.csv")
    for field in ("user", "item", "rating", "timestamp"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
        assert getattr(got, field).dtype == getattr(want, field).dtype
    assert (got.num_users, got.num_items) == (want.num_users, want.num_items)
    # A ratings.dat-style '::' file too, and fields NumPy refuses but Python's int accepts.
    dat = write(tmp_path / "ratings.dat", "\n".join(r.replace(",", "::") for r in rows[1:]).replace("1704", "1_704"))
    np.testing.assert_array_equal(R.load_movielens(dat).item, want.item)
    short = write(tmp_path / "short.csv", f"{rows[0]},tags\n1,2,3,4,x\n1,2,3,4\n")
    with raises_naming(ValueError, short, ":3: expected 5 fields"):
        R.load_movielens(short)  # used to read the row's first 4 fields silently


def test_pairs_refuse_ids_beyond_int32():
    data = R.Ratings(np.array([2**31]), np.array([0]), np.ones(1, np.float32), np.zeros(1, np.int64), 2**31 + 1, 1)
    with pytest.raises(ValueError, match="int32.*reindex"):
        data.pairs  # used to wrap to -2**31
    np.testing.assert_array_equal(R.reindex(data)[0].pairs, [[0, 0]])


# --- load_npz ----------------------------------------------------------------------------------------

def npz(path, y, x=None, compressed=False):
    x = np.zeros((len(y), 2, 2), np.uint8) if x is None else x
    (np.savez_compressed if compressed else np.savez)(path, x=x, y=np.asarray(y))
    return path


def test_npz_negative_labels_need_renumber_labels(tmp_path):
    path = npz(tmp_path / "neg.npz", [-1, 10, 2, 10])
    with raises_naming(ValueError, path, r": labels are class indices and must be >= 0, got y\[0\] = -1"):
        I.load_npz(path)  # used to become classes ('-1', '0', '1') silently
    data = I.load_npz(path, renumber_labels=True)
    assert data.class_names == ("-1", "2", "10")  # increasing values, not string order
    np.testing.assert_array_equal(data.y, [0, 2, 1, 2])
    assert I.load_images(path, renumber_labels=True).class_names == ("-1", "2", "10")


def test_npz_float_labels_must_hold_integers(tmp_path):
    for bad in ([0.0, 0.5, 1.0], [0.0, np.nan, 1.0]):
        path = npz(tmp_path / "bad.npz", bad)
        with raises_naming(ValueError, path, r": labels must be integers, got y\[1\]"):
            I.load_npz(path)  # used to become class names '0.5', 'nan'
    data = I.load_npz(npz(tmp_path / "f.npz", [2.0, 0.0, 2.0]))
    assert data.class_names == ("0", "1", "2")  # as integer labels, not '0.0', '2.0'
    np.testing.assert_array_equal(data.y, [2, 0, 2])


def test_npz_refuses_non_finite_pixels_and_non_archives(tmp_path):
    x = np.zeros((2, 2, 2), np.float32)
    x[1, 0, 1] = np.inf
    path = npz(tmp_path / "inf.npz", [0, 1], x=x)
    with raises_naming(ValueError, path, r": 1 pixel\(s\) not finite in float32, first x\[1, 0, 1, 0\]"):
        I.load_npz(path)
    with raises_naming(ValueError, tmp_path / "junk.npz", ": not an .npz"):
        I.load_npz(write(tmp_path / "junk.npz", b"PK\x03\x04 not really"))


def test_npz_refuses_an_archive_that_would_expand_past_max_bytes(tmp_path):
    path = npz(tmp_path / "zeros.npz", np.zeros(64, np.int64), x=np.zeros((64, 256, 256), np.uint8), compressed=True)
    assert path.stat().st_size < 100_000  # 4 MiB of zeros
    # 64 * 256 * 256 + 64 * 8 bytes of data, 128 of npy header per member
    with raises_naming(ValueError, path, r": x and y would expand to 4195072 bytes, over max_bytes=1000000"):
        I.load_npz(path, max_bytes=1_000_000)
    assert I.load_npz(path, max_bytes=2**23).x.shape == (64, 256, 256, 1)  # the caller can raise it


def test_npz_size_comes_from_the_headers_before_any_array_is_read(tmp_path, monkeypatch):
    """An npy header claiming a terabyte over a few bytes of data: refused by the default limit
    without reading (allocating) the array."""
    path = tmp_path / "liar.npz"
    with zipfile.ZipFile(path, "w") as zf:
        for name, shape in (("x", (10**6, 10**3, 10**3)), ("y", (10**6,))):
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
            zf.writestr(f"{name}.npy", header.getvalue() + b"\0" * 16)

    def read_array(*args, **kwargs):
        raise AssertionError("an array was read before the size check")

    monkeypatch.setattr(np.lib.format, "read_array", read_array)
    with raises_naming(ValueError, path, r": x and y would expand to 1000001000000 bytes, over max_bytes=2147483648"):
        I.load_npz(path)


# --- load_folder -------------------------------------------------------------------------------------

def folder(root: pathlib.Path, images: dict) -> pathlib.Path:
    """``images``: {"class/file.ext": array} saved with Pillow."""
    from PIL import Image

    for name, array in images.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(root / name)
    return root


def test_folder_scales_16_bit_images_by_65535(tmp_path):
    root = folder(tmp_path / "f", {"a/0.png": np.full((3, 2), 1000, np.uint16),
                                   "b/0.png": np.full((3, 2), 65535, np.uint16),
                                   "b/1.png": np.full((3, 2), 51, np.uint8)})
    data = I.load_folder(root)  # used to be 1.0 everywhere (clipped to 8 bits, then / 255)
    assert data.x.shape == (3, 3, 2, 1)
    np.testing.assert_allclose(data.x[:, 0, 0, 0], [1000 / 65535, 1.0, 0.2], rtol=1e-6)
    rgb = I.load_folder(root, grayscale=False)
    assert rgb.x.shape == (3, 3, 2, 3)
    np.testing.assert_allclose(rgb.x[0], 1000 / 65535, rtol=1e-6)


def test_folder_takes_float_images_as_they_are_and_refuses_them_outside_0_1(tmp_path):
    root = folder(tmp_path / "f", {"a/0.tif": np.full((2, 2), 0.25, np.float32)})
    np.testing.assert_array_equal(I.load_folder(root).x, 0.25)
    folder(root, {"a/1.tif": np.full((2, 2), 5.0, np.float32)})
    with raises_naming(ValueError, root / "a" / "1.tif", r": float pixels span \[5.0, 5.0\]"):
        I.load_folder(root)  # used to be 5 / 255 = 0.0196


def test_folder_reports_empty_class_folders(tmp_path):
    root = folder(tmp_path / "f", {"cat/0.png": np.zeros((2, 2), np.uint8)})
    (root / "dog").mkdir()
    (root / "dog" / "readme.txt").write_text("no images here")
    with raises_naming(ValueError, root, r": 1 class folder\(s\) with no image files: \['dog'\]"):
        I.load_folder(root)  # used to be a class 'dog' with no examples


def test_folder_names_a_truncated_image(tmp_path):
    root = folder(tmp_path / "f", {"a/0.png": (np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)})
    png = root / "a" / "0.png"
    png.write_bytes(png.read_bytes()[:-200])
    with raises_naming(ValueError, png, ": cannot read the image"):
        I.load_folder(root)  # used to be OSError('image file is truncated')


# --- fuzz: Hypothesis-made files ---------------------------------------------------------------------

FIELD = st.one_of(
    st.integers(-2**64, 2**64).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(alphabet=" 0123456789.-+eE_nafx#", max_size=6),
)
SEPARATORS = {"tab": ("\t", None), "dat": ("::", None), "csv": (",", "userId,movieId,rating,timestamp")}
INT64 = 2**63


def parse_field(what: str, text: str):
    """The loader's rule for one field, written out: the value, or None where it is invalid."""
    try:
        value = float(text) if what == "rating" else int(text)
    except ValueError:
        return None
    ok = {"user": 0 <= value < INT64 - 1, "item": 0 <= value < INT64 - 1, "timestamp": -INT64 <= value < INT64,
          "rating": math.isfinite(value) and abs(value) <= float(np.finfo(np.float32).max)}[what]
    return value if ok else None


@given(kind=st.sampled_from(sorted(SEPARATORS)), blank_first=st.booleans(),
       rows=st.lists(st.lists(FIELD, min_size=3, max_size=5), max_size=5))
def test_fuzz_movielens_loads_exactly_the_valid_rows_or_names_a_bad_line(kind, blank_first, rows):
    sep, header = SEPARATORS[kind]
    content = ([("", None)] if blank_first else []) + ([(header, None)] if header else [])
    content += [(sep.join(r), r) for r in rows]
    data = [(n, r) for n, (line, r) in enumerate(content, 1) if r is not None and line.strip()]  # blank: skipped
    expected = {n: [parse_field(w, f) for w, f in zip(("user", "item", "rating", "timestamp"), r)]
                for n, r in data if len(r) == 4}
    bad = {n for n, _ in data if n not in expected or None in expected[n]}
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / f"ratings.{kind}"
        path.write_text("\n".join(line for line, _ in content) + "\n")
        start = time.perf_counter()
        try:
            got = R.load_movielens(path)
        except ValueError as e:
            message = str(e)
            assert message.startswith(str(path)) and len(message) < SHORT, message
            if data:
                assert int(message[len(str(path)) + 1:].split(":")[0]) in bad, message
            else:
                assert "no ratings" in message
            return
        finally:
            assert time.perf_counter() - start < 5
    assert data and not bad, "loaded a file with a bad row"
    want = np.array([expected[n] for n, _ in data], dtype=object)
    np.testing.assert_array_equal(got.user, want[:, 0].astype(np.int64))
    np.testing.assert_array_equal(got.item, want[:, 1].astype(np.int64))
    np.testing.assert_array_equal(got.rating, want[:, 2].astype(np.float64).astype(np.float32))
    np.testing.assert_array_equal(got.timestamp, want[:, 3].astype(np.int64))


LABELS = st.one_of(
    st.lists(st.integers(-3, 5), min_size=1, max_size=6).map(np.array),
    st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=3).map(lambda v: np.array(v, np.uint64)),
    st.lists(st.sampled_from([0.0, 1.0, 2.5, -1.0, np.nan, np.inf, 1e30]), min_size=1, max_size=6).map(np.array),
    st.lists(st.text(alphabet="ab -1é", max_size=3), min_size=1, max_size=6).map(np.array),
)


@given(y=LABELS, renumber=st.booleans())
def test_fuzz_npz_labels_are_classes_or_a_named_error(y, renumber):
    with tempfile.TemporaryDirectory() as tmp:
        path = npz(pathlib.Path(tmp) / "fuzz.npz", y)
        values = y.tolist()
        integral = y.dtype.kind != "f" or all(math.isfinite(v) and v == int(v) and abs(v) < 2.0**63 for v in values)
        valid = y.dtype.kind == "U" or (integral and (renumber or (min(values) >= 0 and max(values) < I.MAX_CLASSES)))
        try:
            data = I.load_npz(path, renumber_labels=renumber)
        except ValueError as e:
            assert str(e).startswith(str(path)) and len(str(e)) < SHORT, str(e)
            assert not valid, f"refused valid labels {values}: {e}"
            return
    assert valid, f"loaded invalid labels {values}"
    names = [data.class_names[k] for k in data.y]
    assert names == [v if isinstance(v, str) else str(int(v)) for v in values]
    if y.dtype.kind != "U" and not renumber:
        np.testing.assert_array_equal(data.y, y.astype(np.int64))


@given(cut=st.integers(0, 10_000), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=3),
       target=st.sampled_from(["npz", "npz_compressed", "png", "u.data"]))
# Flips in the zip central directory (offsets for NumPy 2's savez) that once escaped as a raw
# NotImplementedError (version), RuntimeError (encrypted) and OSError (seek before the start).
@example(cut=0, flips=[(588, 64)], target="npz")
@example(cut=0, flips=[(590, 1)], target="npz")
@example(cut=0, flips=[(700, 1)], target="npz")
def test_fuzz_damaged_files_load_or_fail_with_their_name(cut, flips, target):
    """A valid file of each kind, its last ``cut`` bytes dropped and bytes flipped: it loads, or
    fails with a ValueError (KeyError for a lost npz member) naming the file, quickly."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        if target.startswith("npz"):
            path = npz(tmp / "d.npz", [0, 1, 1], x=(np.arange(3 * 8 * 8) % 256).astype(np.uint8).reshape(3, 8, 8),
                       compressed=target == "npz_compressed")
            load = I.load_npz
        elif target == "png":
            root = folder(tmp / "f", {"a/0.png": (np.arange(16 * 16) % 256).astype(np.uint8).reshape(16, 16)})
            path, load = root / "a" / "0.png", (lambda p: I.load_folder(root))
        else:
            path, load = write(tmp / "u.data", (DATA / "u.data").read_bytes()), R.load_movielens
        raw = bytearray(path.read_bytes())
        raw = raw[: max(len(raw) - cut, 0)]
        for at, xor in flips:
            if raw:
                raw[at % len(raw)] ^= xor
        path.write_bytes(bytes(raw))
        start = time.perf_counter()
        try:
            load(path)
        except (ValueError, KeyError) as e:
            message = str(e)
            assert str(path) in message and len(message) < SHORT, message
        assert time.perf_counter() - start < 5
