"""The definition of correct for ``fused_dense``: plain ``jax.numpy``.

``fused_dense`` here is what the "xla" backend runs and what every other backend is checked
against; ``fused_dense_numpy`` is an independent float64 NumPy version for tests.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kernels import activations
from kernels.checks import check_fused_dense_args


def fused_dense(x, w, b=None, *, activation: str = "relu", backend: str = "xla"):
    """``y = act(x @ w + b)`` in plain jax.numpy.

    Args:
      x: ``[..., K]`` float array.
      w: ``[K, N]`` float array.
      b: ``[N]`` float array or None.
      activation: a name from ``kernels.activations.ACTIVATIONS``.
      backend: accepted for signature compatibility with ``kernels.fused_dense``; must be "xla".

    Returns:
      ``[..., N]`` in x's dtype. Low-precision inputs (bfloat16, float16) are multiplied with a
      float32 accumulator and the bias and activation are applied in float32 before the cast.
    """
    if backend != "xla":
        raise ValueError(f"kernels.reference.fused_dense is the 'xla' backend, got backend={backend!r}")
    check_fused_dense_args(x, w, b, activation)
    act = activations.get(activation)
    acc = jnp.promote_types(x.dtype, jnp.float32)
    z = jnp.matmul(x, w, preferred_element_type=acc, precision=jax.lax.Precision.HIGHEST)
    if b is not None:
        z = z + b.astype(acc)
    return act(z).astype(x.dtype)


def _np_erf(z):
    return np.vectorize(math.erf, otypes=[np.float64])(z)


_NUMPY_ACTIVATIONS = {
    "identity": lambda z: z,
    "relu": lambda z: np.maximum(z, 0.0),
    "gelu": lambda z: 0.5 * z * (1.0 + _np_erf(z / math.sqrt(2.0))),
    "gelu_tanh": lambda z: 0.5 * z * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3))),
    "silu": lambda z: z / (1.0 + np.exp(-z)),
    "tanh": np.tanh,
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
}


def fused_dense_numpy(x, w, b=None, *, activation: str = "relu") -> np.ndarray:
    """Float64 NumPy ``act(x @ w + b)``: an independent check on the jax reference.

    Returns ``[..., N]`` float64 whatever the input dtypes.
    """
    z = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    if b is not None:
        z = z + np.asarray(b, np.float64)
    with np.errstate(over="ignore"):
        return _NUMPY_ACTIVATIONS[activation](z)
