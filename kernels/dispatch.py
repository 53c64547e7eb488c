"""Backend choice for ``fused_dense``.

Each backend module registers itself here on import with ``register_backend``: "xla"
(``kernels.xla``, always there), "numba" (``kernels.numba_cpu``), "pallas" (``kernels.pallas_gpu``). A backend's
function takes ``(x, w, b, activation)`` with the arguments already checked and returns ``y``;
it owns its derivative rules (``kernels.autodiff``: reverse mode through its fused backward,
forward mode and second derivatives too), so everything above it is backend-agnostic.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import jax

from kernels.checks import check_fused_dense_args


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable  # fn(x, w, b, activation) -> y
    is_available: Callable[[], bool]
    # Platforms ("cpu", "gpu") where "auto" may pick this backend; lower rank wins.
    auto_rank: dict[str, int]


_BACKENDS: dict[str, Backend] = {}

# The names a config or a command-line flag may give: the backends kernels registers, and "auto"
# (register_backend may add others, for use from Python).
BackendName = Literal["auto", "xla", "numba", "pallas"]


def register_backend(name: str, fn: Callable, *, is_available: Callable[[], bool] = lambda: True,
                     auto_rank: dict[str, int] | None = None) -> None:
    """Adds (or replaces) a backend called ``name``."""
    _BACKENDS[name] = Backend(name, fn, is_available, dict(auto_rank or {}))


def available_backends() -> list[str]:
    """Names of the backends usable in this process, "xla" first."""
    return [name for name, be in _BACKENDS.items() if be.is_available()]


def resolve(backend: str) -> Backend:
    """Maps a backend name (or "auto") to a usable ``Backend``; raises ``ValueError`` otherwise."""
    if backend == "auto":
        platform = jax.default_backend()
        ranked = sorted(
            (be.auto_rank[platform], name) for name, be in _BACKENDS.items()
            if platform in be.auto_rank and be.is_available()
        )
        return _BACKENDS[ranked[0][1] if ranked else "xla"]
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {sorted(_BACKENDS)}")
    be = _BACKENDS[backend]
    if not be.is_available():
        raise ValueError(
            f"backend {backend!r} is not available in this process (available: {available_backends()})"
        )
    return be


def fused_dense(x, w, b=None, *, activation: str = "relu", backend: str = "auto"):
    """``y = act(x @ w + b)`` on the chosen backend.

    Args:
      x: ``[..., K]`` float array (float32/float64; bfloat16/float16 accumulate in float32).
      w: ``[K, N]`` float array.
      b: ``[N]`` float array or None.
      activation: "identity", "relu", "gelu" (exact), "gelu_tanh", "silu", "tanh" or "sigmoid".
      backend: "xla", "numba", "pallas" or "auto" (the fastest available for the platform).

    Returns:
      ``[..., N]`` in x's dtype. Differentiable in x, w and b under jit, grad and vmap.

    Raises:
      TypeError, ValueError: at trace time, naming the offending shapes, dtypes or names.
    """
    if not isinstance(backend, str):
        raise ValueError(f"backend must be a string, got {backend!r}")
    be = resolve(backend)
    check_fused_dense_args(x, w, b, activation)
    return be.fn(x, w, b, activation)
