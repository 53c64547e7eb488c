"""Checks for the scalar arguments of public entry points: the error names the argument.

Python ints and NumPy/JAX integer scalars are integers; ``bool`` and ``1.5`` are not (a float
batch size used to be truncated without a word). Numbers are finite reals of any of those kinds.
"""
from __future__ import annotations

import math
import numbers

import numpy as np


def _is_int(value) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, numbers.Integral):
        return True
    return getattr(value, "shape", None) == () and np.issubdtype(getattr(value, "dtype", np.float64), np.integer)


def check_int(value, name: str, *, minimum: int | None = None, allow_none: bool = False) -> int | None:
    """``value`` as a Python int; ``TypeError`` unless an integer (or None when allowed),
    ``ValueError`` below ``minimum``."""
    if value is None and allow_none:
        return None
    if not _is_int(value):
        kind = "an integer or None" if allow_none else "an integer"
        raise TypeError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}" + (" (or None)" if allow_none else "") + f", got {value}")
    return value


def check_number(value, name: str, *, minimum: float | None = None, allow_none: bool = False) -> float | None:
    """``value`` as a finite Python float (NumPy and JAX scalars included); ``TypeError`` unless a
    real number, ``ValueError`` if not finite or below ``minimum``."""
    if value is None and allow_none:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if not ok and getattr(value, "shape", None) == ():
        dtype = getattr(value, "dtype", None)
        ok = dtype is not None and (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer))
    if not ok:
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {value:g}")
    return value


def check_fraction(value, name: str, *, allow_zero: bool = False) -> float:
    """``value`` as a Python float in (0, 1) (or 0, meaning off, when ``allow_zero``); ``TypeError``
    unless a real number, ``ValueError`` outside that range."""
    value = check_number(value, name)
    if not (0.0 < value < 1.0 or (allow_zero and value == 0.0)):
        raise ValueError(f"{name} must be in (0, 1)" + (" (or 0: off)" if allow_zero else "") + f", got {value:g}")
    return value


def check_choice(value, name: str, choices) -> str:
    """``value`` if it is one of ``choices``, else ``ValueError`` listing them."""
    if value not in tuple(choices):
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value
