"""Argument checks shared by every fused-dense backend, run at trace time before any launch."""
from __future__ import annotations

import jax.numpy as jnp

from kernels import activations

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def check_fused_dense_args(x, w, b, activation: str) -> None:
    """Raises ``TypeError``/``ValueError`` naming the shapes and dtypes when the call is malformed.

    ``x: [..., K]``, ``w: [K, N]``, ``b: [N]`` or None, all floating point.
    """
    activations.get(activation)
    for name, a in (("x", x), ("w", w), ("b", b)):
        if a is None:
            continue
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise TypeError(f"fused_dense: {name} must be an array, got {type(a).__name__}")
        if jnp.dtype(a.dtype).name not in FLOAT_DTYPES:
            raise TypeError(
                f"fused_dense: {name} has dtype {jnp.dtype(a.dtype).name} (shape {tuple(a.shape)}); "
                f"expected one of {FLOAT_DTYPES}"
            )
    if x.ndim < 1:
        raise ValueError(f"fused_dense: x must have at least one dimension [..., K], got shape {tuple(x.shape)}")
    if w.ndim != 2:
        raise ValueError(f"fused_dense: w must be [K, N], got shape {tuple(w.shape)}")
    if x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"fused_dense: x has K={x.shape[-1]} features (x.shape={tuple(x.shape)}) but w expects "
            f"K={w.shape[0]} (w.shape={tuple(w.shape)})"
        )
    if b is not None and tuple(b.shape) != (w.shape[1],):
        raise ValueError(
            f"fused_dense: b must be [N]=({w.shape[1]},) to match w.shape={tuple(w.shape)}, got b.shape={tuple(b.shape)}"
        )
