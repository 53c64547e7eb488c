"""``quantized_dense``: a dense layer on int8 weights, ``y = act(x @ (w_q * scale) + b)``.

Shapes: ``x: [..., K]`` float (float32, bfloat16, float16; float64 under x64), ``w_q: [K, N]``
int8, ``scale: [N]`` (one per output channel) or ``[]``/``[1]`` (one for the whole tensor, the
same as that value repeated N times), ``b: [N]`` or None; ``y: [..., N]`` in x's dtype. The
arithmetic runs in ``promote(x.dtype, float32)`` ("acc"), as ``fused_dense`` does.

Modes (``act_quant``):

- ``None``, weight-only: x stays float; ``z = x @ (w_q * scale) + b``.
- ``"int8"``, w8a8: each row of x is quantised first (``quantize_rows``: symmetric,
  ``scale_x = max|x_row| / 127``, round half to even, clip to [-127, 127]), the int8 x int8 dot
  accumulates exactly in int32 (|acc| <= K * 127**2 < 2**31 for K <= 133,144), and
  ``z = acc * scale_x[:, None] * scale[None, :] + b``.

Backends: "xla" (here), "numba" (``kernels.numba_cpu.quantized``: CPU kernels through the XLA
FFI) and "auto": on the CPU, per mode and shape, the backend measured fastest on this machine
(``kernels.autotune``'s table, as for ``fused_dense``: x's rows rounded up to a power of two,
K, N, dtype and activation; ``JAXNET_AUTO=rank`` takes "xla" without measuring); elsewhere
"xla". The fastest differs between CPUs: on an Intel Xeon with AMX, XLA's int8 dot is several
times faster than Numba's VNNI kernel, on an AMD EPYC it was the other way round
(docs/benchmarks.md, "Quantized dense"). The definition of correct is
``kernels.reference.quantized_dense``.

Gradients. Quantised inference is the use, but the weight-only layer is a smooth function of
x, scale and b, and is differentiable in them on every backend (XLA's autodiff; the numba
kernels take their derivatives from the reference's ``jnp`` arithmetic). w8a8 rounds x, so y is
piecewise constant in x: its derivative in x is 0 almost everywhere and useless, and a
straight-through estimate would be a different function's gradient. Differentiating w8a8 in x
raises ``TypeError`` (``quantize_rows``); in scale and b it works. ``w_q`` is an integer array:
JAX has no gradient for it.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kernels import activations, autotune

QMAX = 127  # symmetric int8, [-127, 127]: -x quantises to -q (no lone -128)
ACT_QUANT = (None, "int8")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")

NOT_DIFFERENTIABLE = ("quantized_dense(act_quant='int8') is not differentiable in x: x is rounded to "
                      "int8, so y is piecewise constant in x; differentiate act_quant=None or the float layer")


def _name(a) -> str:
    return jnp.dtype(a.dtype).name


def check_quantized_dense_args(x, w_q, scale, b, activation: str, act_quant) -> None:
    """Raises ``TypeError``/``ValueError`` naming the argument, its shape and dtype when the call is
    malformed. A non-finite scale is refused when ``scale`` is concrete (not under a trace)."""
    activations.get(activation)
    if not (act_quant is None or (isinstance(act_quant, str) and act_quant == "int8")):
        raise ValueError(f"quantized_dense: act_quant must be None or 'int8', got {act_quant!r:.80}")
    for name, a in (("x", x), ("w_q", w_q), ("scale", scale), ("b", b)):
        if a is not None and (not hasattr(a, "shape") or not hasattr(a, "dtype")):
            raise TypeError(f"quantized_dense: {name} must be an array, got {type(a).__name__}")
    if w_q.dtype != jnp.int8:
        raise TypeError(f"quantized_dense: w_q must be int8 [K, N] (jaxnet.compress.quantize_weight), "
                        f"got {_name(w_q)}{list(w_q.shape)}")
    for name, a in (("x", x), ("scale", scale), ("b", b)):
        if a is not None and _name(a) not in FLOAT_DTYPES:
            raise TypeError(f"quantized_dense: {name} has dtype {_name(a)} (shape {list(a.shape)}); "
                            f"expected one of {FLOAT_DTYPES}")
    if x.ndim < 1:
        raise ValueError(f"quantized_dense: x must be [..., K], got shape {list(x.shape)}")
    if w_q.ndim != 2:
        raise ValueError(f"quantized_dense: w_q must be [K, N], got shape {list(w_q.shape)}")
    k, n = w_q.shape
    if x.shape[-1] != k:
        raise ValueError(f"quantized_dense: x has K={x.shape[-1]} (x.shape={list(x.shape)}) but w_q has "
                         f"K={k} (w_q.shape={list(w_q.shape)})")
    if tuple(scale.shape) not in ((n,), (1,), ()):
        raise ValueError(f"quantized_dense: scale must be [N]=[{n}] (per channel) or [] / [1] (per tensor) "
                         f"for w_q.shape={list(w_q.shape)}, got scale.shape={list(scale.shape)}")
    if b is not None and tuple(b.shape) != (n,):
        raise ValueError(f"quantized_dense: b must be [N]=[{n}] for w_q.shape={list(w_q.shape)}, "
                         f"got b.shape={list(b.shape)}")
    _check_finite_scale(scale)


def _check_finite_scale(scale) -> None:
    # Traced (only its shape and dtype are known) or partly on other processes: not checked.
    if isinstance(scale, jax.core.Tracer) or not getattr(scale, "is_fully_addressable", True):
        return
    host = np.asarray(scale, np.float64)
    bad = np.flatnonzero(~np.isfinite(host.reshape(-1)))
    if bad.size:
        raise ValueError(f"quantized_dense: scale holds NaN/Inf at {bad.size} of {host.size} channels, "
                         f"first {bad[:8].tolist()}")


def compute_dtype(x):
    """The dtype the layer computes in: ``promote(x.dtype, float32)``."""
    return jnp.promote_types(x.dtype, jnp.float32)


@jax.custom_jvp
def refuse_derivative(x):
    """``x`` itself; differentiating through it in x raises ``TypeError`` (``NOT_DIFFERENTIABLE``):
    the guard every w8a8 path puts on x (``quantize_rows``, the numba kernel that quantises x
    itself)."""
    return x


@refuse_derivative.defjvp
def _refuse_derivative_jvp(primals, tangents):
    # Called only when x carries a tangent (JAX skips the rule for symbolic zeros), so
    # derivatives in scale and b still work.
    raise TypeError(NOT_DIFFERENTIABLE)


def quantize_rows(x):
    """Per-row symmetric int8 quantisation of activations, the w8a8 contract.

    ``x: [..., K]`` float -> ``(q: [..., K] int8, scale_x: [...] in compute_dtype(x))`` with
    ``scale_x = max|x_row| * (1/127)`` and ``q = clip(round(x * (1 / scale_x)), -127, 127)``,
    rounding half to even, so ``|x - q * scale_x| <= scale_x / 2`` (to rounding). Written with
    reciprocals because XLA turns a division by a constant or a broadcast into that product
    anyway: spelt out, the integers are a function of x alone, the same in every program and in
    NumPy. An all-zero row (and K = 0) has ``scale_x = 0`` and ``q = 0``; a row holding NaN or
    Inf gets a non-finite ``scale_x`` (its outputs are NaN). Every backend quantises through this
    one function.

    Not differentiable: ``jax.grad`` through x raises ``TypeError`` (see the module docstring).
    """
    acc = compute_dtype(x)
    xa = refuse_derivative(x).astype(acc)
    sx = jnp.max(jnp.abs(xa), axis=-1, initial=0) * jnp.asarray(1 / QMAX, acc)  # (...,)
    # XLA's CPU max reduction drops NaN from the rows of some shapes (jax 0.10: [64, 132] did):
    # a row holding one keeps it here, so that its outputs are NaN rather than finite.
    sx = jnp.where(jnp.isnan(xa).any(axis=-1), jnp.asarray(jnp.nan, acc), sx)
    inv = 1 / jnp.where(sx > 0, sx, 1)  # all-zero rows: 0 * 1 = 0
    q = jnp.clip(jnp.round(xa * inv[..., None]), -QMAX, QMAX).astype(jnp.int8)  # (..., K)
    return q, sx


def scale_row(scale, n: int, dtype):
    """``scale`` ([N], [1] or []) as an ``[N]`` row in ``dtype``."""
    return jnp.broadcast_to(jnp.reshape(scale, (-1,)), (n,)).astype(dtype)


def int8_dot(q, w_q):
    """``q @ w_q`` for int8 ``q: [M, K]``, ``w_q: [K, N]``, exact in int32 ``[M, N]`` (without
    ``preferred_element_type`` XLA returns int8, which wraps around)."""
    return jax.lax.dot_general(q, w_q, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)


def _precision(dtype):
    """HIGHEST for float32 operands (no TF32 or bf16 passes on GPUs); bf16 and f16 products of
    int8 values are exact in the f32 accumulator anyway."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) in (jnp.float32, jnp.float64) else None


def xla(x, w_q, scale, b, activation: str, act_quant):
    """The "xla" backend; arguments already checked.

    Weight-only is the dot in x's dtype with ``w_q`` cast to it (exact: int8 fits every float
    dtype's significand), accumulated in acc, then scaled per column: measured faster than
    dequantising w first (docs/benchmarks.md, "Quantized dense"), and the same function up to
    the rounding of one product.
    """
    acc = compute_dtype(x)
    lead, (k, n) = x.shape[:-1], w_q.shape
    x2 = x.reshape(math.prod(lead), k)  # (M, K); -1 would fail at K = 0
    s = scale_row(scale, n, acc)
    if act_quant is None:
        z = jnp.matmul(x2, w_q.astype(x.dtype), preferred_element_type=acc, precision=_precision(x.dtype)) * s
    else:
        q, sx = quantize_rows(x2)
        z = int8_dot(q, w_q).astype(acc) * sx[:, None] * s
    if b is not None:
        z = z + b.astype(acc)
    return activations.get(activation)(z).astype(x.dtype).reshape(*lead, n)


def _numba(x, w_q, scale, b, activation: str, act_quant):
    from kernels.numba_cpu import quantized  # compiles nothing until its first call

    return quantized.quantized_dense(x, w_q, scale, b, activation, act_quant)


def _numba_available() -> bool:
    from kernels.numba_cpu import is_available

    return is_available()


# name -> (function, is_available)
_IMPLS = {"xla": (xla, lambda: True), "numba": (_numba, _numba_available)}


def _timing_problem(m: int, k: int, n: int, dtype):
    """``(x [m, k], w_q [k, n] int8, scale [n], b [n])``: what "auto" times (standard normal x and
    b, w_q uniform in [-127, 127], scale 1 / (127 sqrt(k)))."""
    x, _, b, _ = autotune.problem(m, k, n, dtype)
    w_q = jax.random.randint(jax.random.key(1), (k, n), -QMAX, QMAX + 1, jnp.int32).astype(jnp.int8)
    return x, w_q, jnp.full((n,), 1.0 / (QMAX * math.sqrt(max(k, 1))), x.dtype), b


def _timed_steps(act_quant):
    def steps(backend: str, activation: str):
        return (jax.jit(lambda x, w_q, s, b: quantized_dense(x, w_q, s, b, activation=activation,
                                                            act_quant=act_quant, backend=backend)),)
    return steps


# The ops "auto" measures, one per mode (inference: the forward alone).
TIMED_OPS = {mode: autotune.Op(f"quantized_dense_{mode or 'weights'}", ("fwd",), _timing_problem, _timed_steps(mode))
             for mode in ACT_QUANT}


def resolve(backend: str, act_quant, m: int, k: int, n: int, dtype, activation: str) -> str:
    """The backend that runs ``x: [m, k] @ w_q: [k, n]``: ``backend`` itself, or for "auto" on the
    CPU the one measured fastest for this mode and shape (``TIMED_OPS``; "xla" first: it is kept
    unless another is faster by ``autotune.MARGIN``), elsewhere "xla". ``ValueError`` for unknown
    or unavailable names."""
    if not isinstance(backend, str) or (backend != "auto" and backend not in _IMPLS):
        raise ValueError(f"quantized_dense: unknown backend {backend!r:.80}; choose 'auto' or one of {sorted(_IMPLS)}")
    if backend == "auto":
        names = [name for name, (_, available) in _IMPLS.items() if available()]
        if jax.default_backend() != "cpu" or autotune.policy() == "rank":
            return names[0]
        return autotune.choose(m, k, n, dtype, activation, names, mode="fwd", op=TIMED_OPS[act_quant])
    if not _IMPLS[backend][1]():
        raise ValueError(f"quantized_dense: backend {backend!r} is not available in this process")
    return backend


def quantized_dense(x, w_q, scale, b=None, *, activation: str = "relu", act_quant=None, backend: str = "auto"):
    """``act(x @ (w_q * scale) + b)`` with int8 weights (and, with ``act_quant="int8"``, int8 rows of x).

    Args:
      x: ``[..., K]`` float array (float32, bfloat16, float16; float64 under x64).
      w_q: ``[K, N]`` int8 (``jaxnet.compress.quantize_weight``).
      scale: ``[N]`` float per output channel, or ``[]``/``[1]`` for one per tensor.
      b: ``[N]`` float or None.
      activation: a name from ``kernels.activations.ACTIVATIONS``.
      act_quant: None (weight-only) or "int8" (w8a8, x quantised per row: ``quantize_rows``).
      backend: "xla", "numba" (CPU) or "auto" (the fastest measured here per mode and shape).

    Returns:
      ``[..., N]`` in x's dtype. Differentiable in x, scale and b for ``act_quant=None``; in
      scale and b only for "int8" (``TypeError`` in x: see the module docstring).

    Raises:
      TypeError, ValueError: at trace time, naming the argument, its shape and dtype.
    """
    check_quantized_dense_args(x, w_q, scale, b, activation, act_quant)
    name = resolve(backend, act_quant, math.prod(x.shape[:-1]), *w_q.shape, x.dtype, activation)
    return _IMPLS[name][0](x, w_q, scale, b, activation, act_quant)


__all__ = ["ACT_QUANT", "QMAX", "TIMED_OPS", "check_quantized_dense_args", "compute_dtype", "int8_dot",
           "quantize_rows", "quantized_dense", "refuse_derivative", "resolve", "scale_row"]
