"""Input checks for data entering training and for the loaders reading it: clear, short errors
instead of silent wrong results."""
from __future__ import annotations

import codecs
import pathlib

import numpy as np


def as_float_array(a, name: str) -> np.ndarray:
    """Returns ``a`` as a floating-point NumPy array, or raises naming ``name``.

    Raises:
      TypeError: for integer, boolean, complex, string or object arrays (a float model fed integer
        data is usually a mistake in the pipeline; convert explicitly with ``.astype``).
      ValueError: when ``a`` holds NaN or Inf, naming how many and the first index.
    """
    try:
        arr = np.asarray(a)
    except Exception as e:  # ragged lists and the like
        raise TypeError(f"{name}: cannot be turned into an array ({e})") from e
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(
            f"{name}: expected a floating-point array, got dtype {arr.dtype} with shape {arr.shape}; "
            f"convert it explicitly, e.g. {name}.astype(np.float32)"
        )
    bad = ~np.isfinite(arr)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name}: {int(bad.sum())} non-finite value(s) (NaN/Inf) in array of shape {arr.shape}; "
            f"first at index {first} = {arr[first]}"
        )
    return arr


def check_same_length(**arrays) -> int:
    """Checks that every array has the same leading dimension and returns it.

    ``check_same_length(x=x, y=y)`` raises ``ValueError`` naming each array's shape otherwise.
    """
    lengths = {name: (np.shape(a)[0] if np.ndim(a) else None) for name, a in arrays.items()}
    if any(n is None for n in lengths.values()):
        scalars = [k for k, n in lengths.items() if n is None]
        raise ValueError(f"expected arrays with a leading example dimension, got scalars: {scalars}")
    if len(set(lengths.values())) > 1:
        shapes = ", ".join(f"{k}.shape={np.shape(a)}" for k, a in arrays.items())
        raise ValueError(f"inputs and targets must have the same number of examples: {shapes}")
    return next(iter(lengths.values()))


def check_supervised(x, y, *, x_name: str = "x", y_name: str = "y", y_float: bool = True):
    """Validates a supervised pair and returns ``(x, y)`` as NumPy arrays.

    ``x: [n, ...]`` float; ``y: [n, ...]`` float (or integer class labels when ``y_float=False``).
    """
    x = as_float_array(x, x_name)
    if y_float:
        y = as_float_array(y, y_name)
    else:
        y = np.asarray(y)
        if not np.issubdtype(y.dtype, np.integer):
            raise TypeError(f"{y_name}: expected integer class labels, got dtype {y.dtype} with shape {y.shape}")
    check_same_length(**{x_name: x, y_name: y})
    return x, y


def snippet(value, limit: int = 80) -> str:
    """``repr`` of ``value`` cut to about ``limit`` characters, for echoing input in an error
    message (a 10 MB bad line must not become a 10 MB message)."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def read_text(path, encoding: str = "utf-8") -> str:
    """The text of the file ``path`` decoded with ``encoding``, a leading byte-order mark removed.

    Raises:
      ValueError: for an unknown encoding, bytes that are not valid in ``encoding`` or a NUL
        character (a binary file, or UTF-16 read as UTF-8), naming the file and the line.
    """
    try:
        codecs.lookup(encoding)
    except (LookupError, TypeError) as e:
        raise ValueError(f"{path}: unknown encoding {encoding!r}") from e
    data = pathlib.Path(path).read_bytes()
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        hint = "pass the file's encoding, e.g. encoding='latin-1'"
        if data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
            hint = "it starts with a UTF-16 byte-order mark: pass encoding='utf-16'"
        raise ValueError(f"{path}:{line}: byte {e.start} is not valid {encoding}; {hint}") from e
    if text.startswith("\ufeff"):
        text = text[1:]
    nul = text.find("\x00")
    if nul >= 0:
        raise ValueError(f"{path}:{text.count(chr(10), 0, nul) + 1}: NUL character: a binary file, or text "
                         f"in another encoding than {encoding}")
    return text
