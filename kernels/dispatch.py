"""Backend choice for ``fused_dense``.

Each backend module registers itself here on import with ``register_backend``: "xla"
(``kernels.xla``, always there), "numba" (``kernels.numba_cpu``), "pallas" (``kernels.pallas_gpu``). A backend's
function takes ``(x, w, b, activation)`` with the arguments already checked and returns ``y``;
it owns its derivative rules (``kernels.autodiff``: reverse mode through its fused backward,
forward mode and second derivatives too), so everything above it is backend-agnostic.

"auto" on the CPU runs, per shape, the backend measured fastest there (``kernels.autotune``'s
table), one for a forward pass alone and one when the call is differentiated; on other platforms,
and with ``JAXNET_AUTO=rank``, the backend of best ``auto_rank``.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Callable, Literal

import jax

from kernels.checks import check_fused_dense_args


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable  # fn(x, w, b, activation) -> y
    is_available: Callable[[], bool]
    # Platforms ("cpu", "gpu") where "auto" may pick this backend; lower rank wins, except that on
    # the CPU "auto" measures every ranked backend per shape (kernels.autotune).
    auto_rank: dict[str, int]


_BACKENDS: dict[str, Backend] = {}
# How many models' weights the calls being traced are vmapped over (``models_batched``); 0: none.
_models = contextvars.ContextVar("jaxnet_auto_models", default=0)

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


def auto_candidates(platform: str) -> list[str]:
    """The available backends "auto" may pick on ``platform`` ("cpu", "gpu"), best-ranked first."""
    ranked = sorted((be.auto_rank[platform], name) for name, be in _BACKENDS.items()
                    if platform in be.auto_rank and be.is_available())
    return [name for _, name in ranked] or ["xla"]


def resolve(backend: str) -> Backend:
    """Maps a backend name to a usable ``Backend``; raises ``ValueError`` otherwise. "auto" maps to
    the best-ranked backend of the platform (``fused_dense`` refines it per shape on the CPU)."""
    if backend == "auto":
        return _BACKENDS[auto_candidates(jax.default_backend())[0]]
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
      backend: "xla", "numba", "pallas" or "auto": on the CPU the backend measured fastest for this
        shape, dtype and activation (``auto_choice``), elsewhere the best-ranked one (a GPU's: "pallas").

    Returns:
      ``[..., N]`` in x's dtype. Differentiable in x, w and b under jit, grad and vmap.

    Raises:
      TypeError, ValueError: at trace time, naming the offending shapes, dtypes or names.
    """
    if not isinstance(backend, str):
        raise ValueError(f"backend must be a string, got {backend!r}")
    be = resolve(backend)
    check_fused_dense_args(x, w, b, activation)
    if backend == "auto":
        return _auto(x, w, b, activation)
    return be.fn(x, w, b, activation)


@contextlib.contextmanager
def models_batched(size: int):
    """Says that the ``fused_dense(backend="auto")`` calls traced inside run under ``jax.vmap`` over
    ``size`` models' weights (a sweep: ``jaxnet.train.fit_many`` traces its programs inside it).

    "auto" then runs, on the CPU, the backend measured fastest for such a batch
    (``kernels.autotune.model_batch_op``) rather than for one model: the two can differ, as the
    numba backend runs a batch of weights one model at a time. The "xla" backend lays out its
    weight gradient for the batch (``kernels.xla``). The values are the same up to rounding.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"models_batched: size must be an int >= 1, got {size!r}")
    token = _models.set(size)
    try:
        yield size
    finally:
        _models.reset(token)


def batched_models() -> int:
    """How many models' weights the calls being traced are vmapped over (``models_batched``); 0
    outside it."""
    return _models.get()


def auto_choice(m: int, k: int, n: int, dtype, activation: str) -> tuple[str, str]:
    """The backends "auto" runs for ``x: [m, k] @ w: [k, n]`` (one dtype): ``(forward alone, when
    differentiated)``. On the CPU the ones measured fastest at this shape (``kernels.autotune``),
    for a batch of models' weights inside ``models_batched``; the best-ranked one on other
    platforms and with ``JAXNET_AUTO=rank``."""
    from kernels import autotune  # it runs the backends through this module

    platform = jax.default_backend()
    names = auto_candidates(platform)
    if platform != "cpu" or len(names) < 2 or autotune.policy() == "rank":
        return names[0], names[0]
    models = batched_models()
    op = autotune.model_batch_op(models) if models > 1 else autotune.FUSED_DENSE
    fwd, train = (autotune.choose(m, k, n, dtype, activation, names, mode=mode, op=op) for mode in autotune.MODES)
    return fwd, train


def _auto(x, w, b, activation: str):
    if len({a.dtype for a in (x, w, b) if a is not None}) > 1:  # mixed dtypes: nothing measured
        return resolve("auto").fn(x, w, b, activation)
    fwd, train = (_BACKENDS[name] for name in auto_choice(math.prod(x.shape[:-1]), *w.shape, x.dtype, activation))
    if fwd is train:
        return fwd.fn(x, w, b, activation)
    return _by_mode(fwd, train, activation)(x, w, b)


def _by_mode(fwd: Backend, train: Backend, activation: str) -> Callable:
    """``f(x, w, b)``: ``fwd``'s kernel when the call is not differentiated; when it is (grad, vjp,
    jvp), ``train``'s forward and derivative rules, as if ``train`` had been called."""
    f = jax.custom_jvp(lambda x, w, b: fwd.fn(x, w, b, activation))
    f.defjvp(lambda primals, tangents: jax.jvp(lambda x, w, b: train.fn(x, w, b, activation), primals, tangents))
    return f
