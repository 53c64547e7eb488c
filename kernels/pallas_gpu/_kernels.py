"""The Pallas kernel bodies for ``fused_dense``: forward, dx and dW (+ db).

Every body sees blocks of arrays that the wrapper has already zero-padded to whole blocks, so no
load ever reads out of bounds (interpret mode fills out-of-bounds reads with NaN; the GPU would
read garbage). The reduction dimension is walked with an in-kernel ``fori_loop`` (the Triton
tutorial-03 shape), which the Triton lowering turns into a software-pipelined ``scf.for``.

The epilogue math (activation, its derivative) runs in float32 (float64 for float64 inputs) and
uses only primitives that the Pallas Triton lowering has rules for; ``lax.erf`` has none, so exact
GELU goes through ``_erf`` below.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_C = 0.044715

# Rational approximation of erf on [-4, 4] (erf(±4) = ±1 in float32): x * P(x^2) / Q(x^2), the
# form XLA and Eigen use for float32. Max abs error ~4e-7 against math.erf, the same order as
# lax.erf's own float32 error (~3e-7).
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
          -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
          -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
          -7.37332916720468e-03, -1.42647390514189e-02)



def _erf(z):
    if z.dtype == jnp.float64:
        # float64 runs only in interpret mode (see ops.py), where lax.erf is available.
        return lax.erf(z)
    z = jnp.clip(z, -4.0, 4.0)
    z2 = z * z
    p = z2 * _ERF_P[0] + _ERF_P[1]  # Horner, in the input's dtype (python floats are weak)
    for c in _ERF_P[2:]:
        p = p * z2 + c
    q = z2 * _ERF_Q[0] + _ERF_Q[1]
    for c in _ERF_Q[2:]:
        q = q * z2 + c
    return z * p / q


def _sigmoid(z):
    return 1.0 / (1.0 + jnp.exp(-z))


def activation(name: str, z):
    """``act(z)`` for ``z`` in the accumulator dtype; mirrors ``kernels.activations``."""
    if name == "identity":
        return z
    if name == "relu":
        return jnp.maximum(z, 0.0)
    if name == "gelu":
        return 0.5 * z * (1.0 + _erf(z * _INV_SQRT_2))
    if name == "gelu_tanh":
        return 0.5 * z * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_C * z * z * z)))
    if name == "silu":
        return z * _sigmoid(z)
    if name == "tanh":
        return jnp.tanh(z)
    if name == "sigmoid":
        return _sigmoid(z)
    raise ValueError(f"unknown activation {name!r}")


def activation_grad(name: str, z):
    """``act'(z)`` for ``z`` in the accumulator dtype; at relu's kink it is 1/2, as autodiff of
    ``jnp.maximum(z, 0)`` gives (the reference's convention)."""
    if name == "identity":
        return jnp.ones_like(z)
    if name == "relu":
        return jnp.where(z > 0, 1.0, jnp.where(z == 0, 0.5, 0.0)).astype(z.dtype)
    if name == "gelu":
        return 0.5 * (1.0 + _erf(z * _INV_SQRT_2)) + z * _INV_SQRT_2PI * jnp.exp(-0.5 * z * z)
    if name == "gelu_tanh":
        t = jnp.tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_C * z * z * z))
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * z * z)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du
    if name == "silu":
        s = _sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    if name == "tanh":
        t = jnp.tanh(z)
        return (1.0 - t) * (1.0 + t)
    if name == "sigmoid":
        s = _sigmoid(z)
        return s * (1.0 - s)
    raise ValueError(f"unknown activation {name!r}")


def _dot(a, b, contract, acc_dtype):
    """``a @ b`` contracting ``a``'s dim ``contract[0]`` with ``b``'s ``contract[1]``; acc in acc_dtype."""
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                           preferred_element_type=acc_dtype)


def forward_kernel(x_ref, w_ref, b_ref, *out_refs, activation_name, block_k, acc_dtype, save_grad):
    """One (block_m, block_n) tile of ``y = act(x @ w + b)``.

    x_ref: [block_m, K] (K a multiple of block_k); w_ref: [K, block_n]; b_ref: [block_n];
    out_refs: y_ref [block_m, block_n] and, when ``save_grad``, d_ref [block_m, block_n] in the
    accumulator dtype: ``act'(z)``, the backward residual.

    Why act'(z) and not z: the backward kernels re-load each dz tile once per output tile (K/block
    times), so the derivative would be re-evaluated that often -- an exp or an erf polynomial per
    element on CUDA cores against a handful of tensor-core MACs. Here it is evaluated once, from the
    float32 z in registers, and the backward's fused load of dy is a single multiply. It is stored
    in float32 because act' of a z rounded to bf16 would be the largest error in the gradient.
    """
    n_k = x_ref.shape[1] // block_k
    bm, bn = x_ref.shape[0], w_ref.shape[1]

    def body(kk, acc):
        ks = pl.ds(pl.multiple_of(kk * block_k, block_k), block_k)
        return acc + _dot(x_ref[:, ks], w_ref[ks, :], (1, 0), acc_dtype)  # (bm, bn)

    z = lax.fori_loop(0, n_k, body, jnp.zeros((bm, bn), acc_dtype))
    z = z + b_ref[...].astype(acc_dtype)[None, :]  # epilogue: bias ...
    y_ref = out_refs[0]
    y_ref[...] = activation(activation_name, z).astype(y_ref.dtype)  # ... and activation
    if save_grad:
        out_refs[1][...] = activation_grad(activation_name, z).astype(out_refs[1].dtype)


def _dz(dy, d, acc_dtype):
    """The activation derivative fused into the load of dy: ``dz = dy * act'(z)`` in acc_dtype
    (``d`` is act'(z) from the forward, None for identity)."""
    dy = dy.astype(acc_dtype)
    return dy if d is None else dy * d


def dx_kernel(dy_ref, d_ref, w_ref, dx_ref, *, block_n, acc_dtype):
    """One (block_m, block_k) tile of ``dx = (dy * act'(z)) @ w.T``.

    dy_ref, d_ref: [block_m, N] (N a multiple of block_n; d_ref, act'(z), is None for identity);
    w_ref: [block_k, N]; dx_ref: [block_m, block_k].
    """
    n_n = dy_ref.shape[1] // block_n
    bm, bk = dx_ref.shape

    def body(nn, acc):
        ns = pl.ds(pl.multiple_of(nn * block_n, block_n), block_n)
        dz = _dz(dy_ref[:, ns], None if d_ref is None else d_ref[:, ns], acc_dtype)  # (bm, bn)
        w = w_ref[:, ns]  # (bk, bn)
        # dz goes into the MMA in the input dtype (bf16/f16 tensor cores), accumulating in acc_dtype.
        return acc + _dot(dz.astype(w.dtype), w, (1, 1), acc_dtype)  # (bm, bk)

    acc = lax.fori_loop(0, n_n, body, jnp.zeros((bm, bk), acc_dtype))
    dx_ref[...] = acc.astype(dx_ref.dtype)


def dw_kernel(x_ref, dy_ref, d_ref, dw_ref, db_ref, *, block_m, acc_dtype):
    """One (block_k, block_n) tile of ``dw = x.T @ (dy * act'(z))``, and ``db = sum_m dz`` fused.

    x_ref: [M, block_k] (M a multiple of block_m); dy_ref, d_ref: [M, block_n] (d_ref None for
    identity); dw_ref: [block_k, block_n]; db_ref: [block_n], this tile's row of the db partials.

    db rides along because this kernel already walks all of M for its column block and has dz in
    registers: the column sum costs block_m * block_n adds per step against block_m * block_n *
    block_k MACs. Every K-tile computes the same sum; the wrapper keeps the first row.
    """
    n_m = x_ref.shape[0] // block_m
    bk, bn = dw_ref.shape

    def body(mm, carry):
        acc, db = carry
        ms = pl.ds(pl.multiple_of(mm * block_m, block_m), block_m)
        dz = _dz(dy_ref[ms, :], None if d_ref is None else d_ref[ms, :], acc_dtype)  # (bm, bn)
        x = x_ref[ms, :]  # (bm, bk)
        acc = acc + _dot(x, dz.astype(x.dtype), (0, 0), acc_dtype)  # (bk, bn)
        return acc, db + jnp.sum(dz, axis=0)

    acc, db = lax.fori_loop(0, n_m, body, (jnp.zeros((bk, bn), acc_dtype), jnp.zeros((bn,), acc_dtype)))
    dw_ref[...] = acc.astype(dw_ref.dtype)
    db_ref[...] = db.astype(db_ref.dtype)


def grouped_tile(pid, n_rows: int, n_cols: int, group: int):
    """Maps a 1-D program id to a (row, col) tile, ``group`` row-tiles at a time (Triton tutorial
    03's L2-friendly order: neighbouring programs share input panels)."""
    group = max(1, min(group, n_rows))
    per_group = group * n_cols
    group_id = pid // per_group
    first_row = group_id * group
    rows_here = jnp.minimum(n_rows - first_row, group)
    local = pid % per_group
    return first_row + local % rows_here, local // rows_here


