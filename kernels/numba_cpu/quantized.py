"""The "numba" backend of ``kernels.quantized_dense``: the kernels of ``_quantized`` through XLA's FFI.

``quantized_dense(x, w_q, scale, b, activation, act_quant)`` flattens x to ``[M, K]`` and calls
the weight-only or the w8a8 handler on float32 x (bfloat16 and float16 are upcast first,
exactly); the w8a8 handler quantises the rows itself, with ``kernels.quantized.quantize_rows``'s
arithmetic (the same integers every backend feeds its dot: tested bit for bit). The handlers compile at their first call, each on its own. relu and
identity run in the kernels; the other activations in XLA on their float32 result (the fused
kernels' transcendental epilogue would cost each handler seconds of cold compile).

float64 x runs the "xla" backend instead (the kernels compute in float32).

Threads: a call shares its blocks with XLA's intra-op pool from the machine model's threshold
(``backend.int8_share_attribute``: not the float32 step's tuned one, which was not timed on these
kernels).

Derivatives come from the reference's ``jnp`` arithmetic (``kernels.autodiff.with_reference_jvp``):
weight-only is differentiable in x, scale and b; w8a8 in scale and b (``quantize_rows`` refuses x).

vmap: a batch over x alone (the rows) folds into M, one call; a batched w_q, scale or b runs one
call per element (``_batching.unfolded``).
"""
from __future__ import annotations

import functools
import math
import threading

import jax
import jax.numpy as jnp
import numpy as np

from kernels import quantized as q8
from kernels.activations import ACTIVATIONS, CODES
from kernels.autodiff import with_reference_jvp
from kernels.numba_cpu import _batching
from kernels.numba_cpu.backend import int8_share_attribute

_PREFIX = "jaxnet_numba_quantized_dense"
_lock = threading.Lock()
_REGISTERED: dict[str, object] = {}


def _target(kind: str) -> str:
    """The FFI target of ``kind`` ("weight_only"/"w8a8"), its handler compiled and registered on first use."""
    name = f"{_PREFIX}_{kind}"
    if kind not in _REGISTERED:
        with _lock:
            if kind not in _REGISTERED:
                from kernels.numba_cpu import _ffi, _quantized

                handler = _quantized.handler(kind)
                _ffi.register(name, handler)
                _REGISTERED[kind] = handler
    return name


def _call(kind: str, relu: bool, *ops):
    """The handler on ``ops`` = (x ``[M, K]``, w_q, scale[, b]): ``y [M, N]``, relu'd if ``relu``.

    Under vmap with only x batched, the batch folds into M (one call, nested vmaps too);
    otherwise ``_batching.unfolded`` (one call per element).
    """
    (m, k), n = ops[0].shape, ops[1].shape[1]
    ffi = functools.partial(jax.ffi.ffi_call(_target(kind), (jax.ShapeDtypeStruct((m, n), jnp.float32),),
                                             vmap_method="sequential"),
                            act=np.int64(CODES["relu" if relu else "identity"]), share=int8_share_attribute(m, k, n))
    again = functools.partial(_call, kind, relu)

    def rule(axis_size, in_batched, *args):
        if any(in_batched[1:]):
            return _batching.unfolded(ffi, lambda *a: [again(*a)], 1, in_batched, args)
        x = _batching.rows(args[0], in_batched[0], axis_size)
        return [_batching.unrows(again(x, *args[1:]), axis_size, m)], [True]
    return _batching.call(ffi, ops, rule)[0]


def _weight_only_reference(activation, x2, w_q, s, b):
    """``_weight_only`` in ``jnp`` (its derivatives): the "xla" backend's arithmetic."""
    z = jnp.matmul(x2, w_q.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST) * s
    return ACTIVATIONS[activation].fn(z if b is None else z + b)


def _w8a8_reference(activation, x2, w_q, s, b):
    """``_w8a8`` in ``jnp``, for its derivatives in scale and b (x's are refused before the call:
    ``quantized_dense``; here x's tangent is an instantiated zero, which must not reach the guard)."""
    q, sx = q8.quantize_rows(jax.lax.stop_gradient(x2))
    z = q8.int8_dot(q, w_q).astype(jnp.float32) * sx[:, None] * s
    return ACTIVATIONS[activation].fn(z if b is None else z + b)


def _kernel(kind: str, activation: str, *ops):
    """The handler, with relu and identity applied in it and the other activations by XLA after."""
    ops = [a for a in ops if a is not None]
    if activation in ("relu", "identity"):
        return _call(kind, activation == "relu", *ops)
    return ACTIVATIONS[activation].fn(_call(kind, False, *ops))


_weight_only = with_reference_jvp(
    lambda activation, x2, w_q, s, b: _kernel("weight_only", activation, x2, w_q, s, b),
    _weight_only_reference, nondiff_argnums=(0,))
_w8a8 = with_reference_jvp(
    lambda activation, x2, w_q, s, b: _kernel("w8a8", activation, x2, w_q, s, b),
    _w8a8_reference, nondiff_argnums=(0,))


def quantized_dense(x, w_q, scale, b, activation: str, act_quant):
    """``act(x @ (w_q * scale) + b)`` on the Numba kernels; arguments already checked
    (``kernels.quantized``). Shapes as there; the result in x's dtype."""
    k, n = w_q.shape
    if q8.compute_dtype(x) != jnp.float32:
        return q8.xla(x, w_q, scale, b, activation, act_quant)
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), k)  # (M, K)
    s = q8.scale_row(scale, n, jnp.float32)
    b = None if b is None else b.astype(jnp.float32)
    if act_quant is None:
        y = _weight_only(activation, x2.astype(jnp.float32), w_q, s, b)
    else:  # the kernel quantises x's rows: not differentiable in x
        y = _w8a8(activation, q8.refuse_derivative(x2.astype(jnp.float32)), w_q, s, b)
    return y.astype(x.dtype).reshape(*lead, n)


def precompile(kinds=("weight_only", "w8a8")) -> None:
    """Compiles (or loads from Numba's cache) and registers the int8 handlers of ``kinds`` now
    rather than at their first call (the test suite fills the on-disk cache this way before its
    workers start, see tests/conftest.py). Nothing else calls it."""
    for kind in kinds:
        _target(kind)


__all__ = ["precompile", "quantized_dense"]
