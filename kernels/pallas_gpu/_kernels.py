"""The Pallas kernel bodies for ``fused_dense``: forward, dx and dW (+ db).

Every body sees blocks of arrays that the wrapper has already zero-padded to whole blocks, so no
load ever reads out of bounds (interpret mode fills out-of-bounds reads with NaN; the GPU would
read garbage). The reduction dimension is walked with an in-kernel ``fori_loop`` (the Triton
tutorial-03 shape), which the Triton lowering turns into a software-pipelined ``scf.for``.

The epilogue math (activation, its derivative) runs in float32 (float64 for float64 inputs) and
uses the table's lowerable forms (``kernels.activations``: only primitives the Pallas Triton
lowering has rules for; ``lax.erf`` has none, so exact GELU goes through a rational erf).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import activations


def _dot(a, b, contract, acc_dtype):
    """``a @ b`` contracting ``a``'s dim ``contract[0]`` with ``b``'s ``contract[1]``; acc in acc_dtype.

    HIGHEST: float32 operands multiply in IEEE float32; the Triton lowering's default is TF32
    (10-bit mantissa), which the float32 tolerances do not allow. bf16/f16 are unaffected.
    """
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                           precision=lax.Precision.HIGHEST, preferred_element_type=acc_dtype)


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
    y_ref[...] = activations.get(activation_name).lowerable_fn(z).astype(y_ref.dtype)  # ... and activation
    if save_grad:
        out_refs[1][...] = activations.get(activation_name).lowerable_grad(z).astype(out_refs[1].dtype)


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


