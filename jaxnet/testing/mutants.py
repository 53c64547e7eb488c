"""Deliberately broken fused-dense kernels: each has one bug that real kernels have had.

The harness's own tests (and ``jaxnet verify --candidate jaxnet.testing.mutants:NAME``) check
that every one of these is rejected. A harness that passes one of them is a bug in the harness.
All share the contract ``fn(x, w, b=None, *, activation="relu") -> y`` and are top-level
functions, so ``check_bad_inputs`` can import them in a subprocess.

  bias_wrong_axis      8x8 output tiles; the bias tile is added down the rows, not across columns.
  relu_grad_at_zero    hand-written VJP whose relu mask is ``z >= 0`` (derivative 1 at z = 0).
  tail_dropped         K tiled by 8; the loop runs K // 8 blocks, so a partial last block is lost.
  low_precision_acc    K tiled by 4 with the accumulator in x's dtype (bf16/f16 sums of partials).
  no_grad_b            hand-written VJP that returns zeros for b (bias treated as a constant).
  jit_only             an eager "fast path" in NumPy that applies the activation before the bias.
  unchecked            no argument checks: malformed calls broadcast or run instead of raising.
  unsafe_native        unchecked, and crashes (SIGSEGV) on integer inputs and hangs on a wrong K.

Look-alikes, kernels whose activation is a well-known approximation of the contract's (each
differs from the exact one by 1e-4 to 1e-2 at |z| ~ 1-3, far beyond float32's tolerance):
``gelu_as_tanh`` (gelu computed by the tanh approximation), ``gelu_as_sigmoid`` (x sigmoid(1.702 x)),
``silu_scaled`` (x sigmoid(1.1 x)); and a control, ``tanh_via_sigmoid`` (2 sigmoid(2z) - 1, equal
to tanh exactly, rounded differently), which the harness must accept.

Controls, correct but written differently from the reference (the harness must accept them):
``k_blocked`` (K tiled by 16, float32 accumulator) and ``hand_written_vjp`` (custom_vjp).
"""
from __future__ import annotations

import ctypes
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels import activations
from kernels.checks import check_fused_dense_args

_HI = jax.lax.Precision.HIGHEST


def _acc_dtype(x):
    return jnp.promote_types(x.dtype, jnp.float32)


def _dot(x, w):
    return jnp.matmul(x, w, preferred_element_type=_acc_dtype(x), precision=_HI)


def _finish(z, b, activation, dtype):
    if b is not None:
        z = z + b.astype(z.dtype)
    return activations.get(activation)(z).astype(dtype)


def _cdiv(a, b):
    return -(-a // b)


def bias_wrong_axis(x, w, b=None, *, activation="relu"):
    """Square 8x8 output tiles; bias added as ``b_tile[:, None]`` (rows) instead of ``[None, :]``."""
    check_fused_dense_args(x, w, b, activation)
    t = 8
    k, n = w.shape
    r = math.prod(x.shape[:-1])
    x2 = x.reshape(r, k)
    rp, np_ = _cdiv(r, t) * t, _cdiv(n, t) * t
    z = _dot(jnp.pad(x2, ((0, rp - r), (0, 0))), jnp.pad(w, ((0, 0), (0, np_ - n))))
    if b is not None:
        bt = jnp.pad(b.astype(z.dtype), (0, np_ - n)).reshape(np_ // t, t)  # (Nt, t)
        z = z.reshape(rp // t, t, np_ // t, t) + bt.T[None, :, :, None]  # BUG: should be bt[None, None]
        z = z.reshape(rp, np_)
    y = activations.get(activation)(z[:r, :n]).astype(x.dtype)
    return y.reshape(x.shape[:-1] + (n,))


def tail_dropped(x, w, b=None, *, activation="relu"):
    """K in blocks of 8, ``range(K // 8)`` blocks (BUG: should be ``cdiv(K, 8)``)."""
    check_fused_dense_args(x, w, b, activation)
    bk = 8
    kf = (w.shape[0] // bk) * bk
    return _finish(_dot(x[..., :kf], w[:kf]), b, activation, x.dtype)


def _k_blocked(x, w, b, activation, acc_dtype, bk=16):
    k, n = w.shape
    kp = _cdiv(k, bk) * bk
    xb = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, kp - k)]).reshape(x.shape[:-1] + (kp // bk, bk))
    wb = jnp.pad(w, ((0, kp - k), (0, 0))).reshape(kp // bk, bk, n)
    parts = jnp.einsum("...ck,ckn->c...n", xb, wb, preferred_element_type=_acc_dtype(x), precision=_HI)

    def step(acc, p):
        return acc + p.astype(acc_dtype), None

    acc, _ = jax.lax.scan(step, jnp.zeros(x.shape[:-1] + (n,), acc_dtype), parts)
    return _finish(acc.astype(_acc_dtype(x)), b, activation, x.dtype)


def low_precision_acc(x, w, b=None, *, activation="relu"):
    """K in blocks of 4; partial products in f32, but summed into an accumulator of x's dtype."""
    check_fused_dense_args(x, w, b, activation)
    return _k_blocked(x, w, b, activation, x.dtype, bk=4)  # BUG: the accumulator should be float32


def k_blocked(x, w, b=None, *, activation="relu"):
    """Control (correct): K in blocks of 16 summed in float32 -- another summation order."""
    check_fused_dense_args(x, w, b, activation)
    return _k_blocked(x, w, b, activation, _acc_dtype(x))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fused_vjp(x, w, b, activation, relu_mask_ge, zero_db):
    return _finish(_dot(x, w), b, activation, x.dtype)


def _fused_vjp_fwd(x, w, b, activation, relu_mask_ge, zero_db):
    z = _dot(x, w)
    if b is not None:
        z = z + b.astype(z.dtype)
    return activations.get(activation)(z).astype(x.dtype), (x, w, b, z)


def _fused_vjp_bwd(activation, relu_mask_ge, zero_db, res, g):
    x, w, b, z = res
    g = g.astype(z.dtype)
    if activation == "relu" and relu_mask_ge:
        dz = g * (z >= 0)  # BUG: derivative 1 at z == 0 (the reference's convention differs there)
    else:
        _, act_vjp = jax.vjp(activations.get(activation), z)
        (dz,) = act_vjp(g)
    (k, n), rows = w.shape, math.prod(x.shape[:-1])
    dx = jnp.matmul(dz, w.T.astype(dz.dtype), precision=_HI).astype(x.dtype)
    dw = jnp.matmul(x.reshape(rows, k).T.astype(dz.dtype), dz.reshape(rows, n), precision=_HI).astype(w.dtype)
    if b is None:
        db = None
    elif zero_db:
        db = jnp.zeros_like(b)  # BUG: the bias gets no gradient
    else:
        db = dz.reshape(rows, n).sum(0).astype(b.dtype)
    return dx, dw, db


_fused_vjp.defvjp(_fused_vjp_fwd, _fused_vjp_bwd)


def hand_written_vjp(x, w, b=None, *, activation="relu"):
    """Control (correct): the same hand-written VJP without the bugs."""
    check_fused_dense_args(x, w, b, activation)
    return _fused_vjp(x, w, b, activation, False, False)


def relu_grad_at_zero(x, w, b=None, *, activation="relu"):
    """Hand-written VJP; relu's mask is ``z >= 0``, so the derivative at exactly 0 is 1."""
    check_fused_dense_args(x, w, b, activation)
    return _fused_vjp(x, w, b, activation, True, False)


def no_grad_b(x, w, b=None, *, activation="relu"):
    """Hand-written VJP that returns zeros as b's gradient."""
    check_fused_dense_args(x, w, b, activation)
    return _fused_vjp(x, w, b, activation, False, True)


def jit_only(x, w, b=None, *, activation="relu"):
    """Right under jit, vmap and grad; wrong when called eagerly on concrete arrays."""
    check_fused_dense_args(x, w, b, activation)
    if isinstance(x, jax.core.Tracer) or activation not in activations.ACTIVATIONS:
        return _finish(_dot(x, w), b, activation, x.dtype)
    # Eager fast path in NumPy. BUG: activation applied before the bias.
    with np.errstate(all="ignore"):
        z = np.asarray(x, np.float32) @ np.asarray(w, np.float32)
        y = activations.get(activation).np_fn(z) + (0 if b is None else np.asarray(b, np.float32))
    return jnp.asarray(y.astype(np.dtype(x.dtype)))


def unchecked(x, w, b=None, *, activation="relu"):
    """No argument checks: whatever jnp broadcasting allows goes through."""
    z = jnp.matmul(x, w)
    if b is not None:
        z = z + b
    return activations.ACTIVATIONS.get(activation, activations.get("relu"))(z)


def unsafe_native(x, w, b=None, *, activation="relu"):
    """Like a native kernel with no checks: reads int buffers as floats, spins on a wrong K."""
    if jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer) or jnp.issubdtype(jnp.asarray(w).dtype, jnp.integer):
        ctypes.string_at(0)  # SIGSEGV, as an out-of-bounds read in C would
    if getattr(x, "ndim", 0) >= 1 and getattr(w, "ndim", 0) == 2 and x.shape[-1] != w.shape[0]:
        while True:  # waits for K-blocks that never arrive
            time.sleep(0.05)
    return unchecked(x, w, b, activation=activation)


def _with_activation(name: str, replacement):
    """A correct kernel except that activation ``name`` is computed by ``replacement(z)``."""
    def kernel(x, w, b=None, *, activation="relu"):
        check_fused_dense_args(x, w, b, activation)
        z = _dot(x, w)
        if b is not None:
            z = z + b.astype(z.dtype)
        act = replacement if activation == name else activations.get(activation)
        return act(z).astype(x.dtype)
    return kernel


gelu_as_tanh = _with_activation("gelu", activations.get("gelu_tanh"))
gelu_as_tanh.__doc__ = "Exact gelu replaced by its tanh approximation (0.5 z (1 + tanh(...)))."
gelu_as_sigmoid = _with_activation("gelu", lambda z: z * jax.nn.sigmoid(1.702 * z))
gelu_as_sigmoid.__doc__ = "Exact gelu replaced by z * sigmoid(1.702 z)."
silu_scaled = _with_activation("silu", lambda z: z * jax.nn.sigmoid(1.1 * z))
silu_scaled.__doc__ = "silu with the wrong slope: z * sigmoid(1.1 z)."
tanh_via_sigmoid = _with_activation("tanh", lambda z: 2.0 * jax.nn.sigmoid(2.0 * z) - 1.0)
tanh_via_sigmoid.__doc__ = "Control (correct): tanh written as 2 sigmoid(2z) - 1."
for _f, _n in ((gelu_as_tanh, "gelu_as_tanh"), (gelu_as_sigmoid, "gelu_as_sigmoid"),
               (silu_scaled, "silu_scaled"), (tanh_via_sigmoid, "tanh_via_sigmoid")):
    _f.__name__ = _f.__qualname__ = _n  # importable by name, so check_bad_inputs can pickle them


MUTANTS = {
    "bias_wrong_axis": bias_wrong_axis,
    "relu_grad_at_zero": relu_grad_at_zero,
    "tail_dropped": tail_dropped,
    "low_precision_acc": low_precision_acc,
    "no_grad_b": no_grad_b,
    "jit_only": jit_only,
}
# Correct kernels written differently from the reference: the harness must accept these.
CONTROLS = {"k_blocked": k_blocked, "hand_written_vjp": hand_written_vjp}
# Approximations of an activation that a default run must reject, and an exact rewrite it must accept.
LOOKALIKE_MUTANTS = {"gelu_as_tanh": gelu_as_tanh, "gelu_as_sigmoid": gelu_as_sigmoid, "silu_scaled": silu_scaled}
LOOKALIKE_CONTROLS = {"tanh_via_sigmoid": tanh_via_sigmoid}
# Broken only for malformed calls (correct on valid ones): for check_bad_inputs.
BAD_INPUT_MUTANTS = {"unchecked": unchecked, "unsafe_native": unsafe_native}
