"""Naming and importing the kernels under test: one home for what ``verify``, ``check_bad_inputs``
and the ``jaxnet verify`` command say about a candidate and how they load one from a spec."""
from __future__ import annotations

import functools
import importlib
import os
import sys
from typing import Any, Callable


def name(fn) -> str:
    """A readable name: ``module.qualname``, with a partial's keywords (``...fused_dense(backend='numba')``)."""
    if isinstance(fn, functools.partial):
        kw = ", ".join(f"{k}={v!r}" for k, v in fn.keywords.items())
        return f"{name(fn.func)}({kw})"
    mod = getattr(fn, "__module__", None)
    qn = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"{mod}.{qn}" if mod else qn


def label(candidate: Any) -> str:
    """The spec itself for a ``"module:function"`` string, else ``name(candidate)``."""
    return candidate if isinstance(candidate, str) else name(candidate)


def resolve(candidate: Any) -> Callable:
    """The function a ``"module:function"`` spec names (``function`` may be dotted); a callable is
    returned as it is. A module in the current directory is found too (searched after the
    installed ones, so a file there cannot shadow them).

    Raises:
      ValueError: a spec without ``:``; ImportError, AttributeError: what the import raised.
    """
    if not isinstance(candidate, str):
        return candidate
    module, _, attr = candidate.partition(":")
    if not attr:
        raise ValueError(f"candidate {candidate!r}: expected 'module:function'")
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.append(here)
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj
