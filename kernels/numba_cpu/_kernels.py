"""Numba kernels for ``y = act(x @ w + b)`` and its backward pass, on row-major 2-D arrays.

The arrays are views of XLA's buffers (``numba.carray``); these functions never allocate
outputs. Accumulation is in the array dtype (float32 or float64); bfloat16/float16 are upcast
to float32 by the caller.

Activation codes (``ACT_CODES``) select the epilogue; ``RESIDUAL`` says what the backward pass
needs saved: the pre-activation ``z`` (relu, gelu, gelu_tanh, silu), the output ``y`` (tanh,
sigmoid: their derivatives are ``1 - y**2`` and ``y * (1 - y)``), or nothing (identity).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

ACT_CODES = {"identity": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4, "tanh": 5, "sigmoid": 6}
RESIDUAL = {"identity": "none", "relu": "z", "gelu": "z", "gelu_tanh": "z", "silu": "z", "tanh": "y",
            "sigmoid": "y"}

_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715

_OPTS = dict(cache=True, fastmath=True, boundscheck=False, error_model="numpy", nogil=True)
# Transcendental epilogues keep strict IEEE semantics (no fastmath): inf/nan inputs must give the
# reference's answers (e.g. sigmoid(-inf) = 0, tanh(inf) = 1).
_STRICT = dict(cache=True, fastmath=False, boundscheck=False, error_model="numpy", nogil=True)

# Block sizes (elements). Rows of x per block: the block of y (MB x N) and a strip of w stay in
# L2 while the K loop streams; KB rows of w per pass keep that strip small.
MB = 64
KB = 256


@njit(**_STRICT)
def _sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


@njit(**_STRICT)
def apply_activation(zrow, yrow, act):
    """``yrow[:] = act(zrow)``; ``zrow`` and ``yrow`` may be the same array."""
    n = zrow.shape[0]
    if act == 1:
        for j in range(n):
            v = zrow[j]
            yrow[j] = v if (v > 0 or v != v) else 0.0  # max(z, 0), nan propagates
    elif act == 2:
        for j in range(n):
            v = zrow[j]
            yrow[j] = 0.5 * v * (1.0 + math.erf(v * _INV_SQRT_2))
    elif act == 3:
        for j in range(n):
            v = zrow[j]
            yrow[j] = 0.5 * v * (1.0 + math.tanh(_SQRT_2_OVER_PI * (v + _GELU_C * v * v * v)))
    elif act == 4:
        for j in range(n):
            v = zrow[j]
            yrow[j] = v * _sigmoid(v)
    elif act == 5:
        for j in range(n):
            yrow[j] = math.tanh(zrow[j])
    elif act == 6:
        for j in range(n):
            yrow[j] = _sigmoid(zrow[j])
    elif zrow is not yrow:
        for j in range(n):
            yrow[j] = zrow[j]


@njit(**_STRICT)
def activation_grad(dyrow, rrow, grow, act):
    """``grow[:] = dyrow * act'(.)`` from the residual ``rrow`` (z or y, see ``RESIDUAL``)."""
    n = dyrow.shape[0]
    if act == 1:
        for j in range(n):
            v = rrow[j]
            # d max(z, 0)/dz as jnp.maximum defines it: 1, 0 and 1/2 at the tie.
            grow[j] = dyrow[j] * (1.0 if v > 0 else (0.5 if v == 0 else 0.0))
    elif act == 2:
        for j in range(n):
            v = rrow[j]
            grow[j] = dyrow[j] * (0.5 * (1.0 + math.erf(v * _INV_SQRT_2)) + v * _INV_SQRT_2PI * math.exp(-0.5 * v * v))
    elif act == 3:
        for j in range(n):
            v = rrow[j]
            t = math.tanh(_SQRT_2_OVER_PI * (v + _GELU_C * v * v * v))
            d = 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * v * v)
            grow[j] = dyrow[j] * d
    elif act == 4:
        for j in range(n):
            v = rrow[j]
            s = _sigmoid(v)
            grow[j] = dyrow[j] * (s * (1.0 + v * (1.0 - s)))
    elif act == 5:
        for j in range(n):
            y = rrow[j]
            grow[j] = dyrow[j] * (1.0 - y * y)
    elif act == 6:
        for j in range(n):
            y = rrow[j]
            grow[j] = dyrow[j] * (y * (1.0 - y))
    else:
        for j in range(n):
            grow[j] = dyrow[j]


@njit(**_OPTS)
def _gemm_block(x, w, z, i0, i1):
    """``z[i0:i1] += x[i0:i1] @ w`` (row-major, ``z`` pre-initialised)."""
    K = x.shape[1]
    for k0 in range(0, K, KB):
        k1 = min(k0 + KB, K)
        for i in range(i0, i1):
            zi = z[i]
            for k in range(k0, k1):
                a = x[i, k]
                wk = w[k]
                for j in range(zi.shape[0]):
                    zi[j] += a * wk[j]


@njit(**_OPTS)
def forward(x, w, b, has_bias, y, z, save_z, act):
    """``y = act(x @ w + b)`` and, if ``save_z``, ``z = x @ w + b``.

    x: [M, K], w: [K, N], b: [N] (ignored unless ``has_bias``), y: [M, N], z: [M, N] or unused.
    """
    M, N = y.shape
    for i0 in range(0, M, MB):
        i1 = min(i0 + MB, M)
        acc = z if save_z else y
        for i in range(i0, i1):
            if has_bias:
                acc[i, :] = b
            else:
                acc[i, :] = 0
        _gemm_block(x, w, acc, i0, i1)
        for i in range(i0, i1):
            apply_activation(acc[i], y[i], act)


@njit(**_OPTS)
def backward(dy, x, w, r, act, dx, dw, db, has_bias):
    """Gradients of ``y = act(x @ w + b)`` given ``dy`` and the residual ``r`` (see ``RESIDUAL``).

    dy, r: [M, N]; x: [M, K]; w: [K, N]; dx: [M, K]; dw: [K, N]; db: [N] (if ``has_bias``).
    ``g = dy * act'`` is formed one block of rows at a time and used at once for all three
    products, so dy and r are read once.
    """
    M, N = dy.shape
    K = x.shape[1]
    dw[:, :] = 0
    if has_bias:
        db[:] = 0
    g = np.empty((min(MB, M), N), dy.dtype)
    for i0 in range(0, M, MB):
        i1 = min(i0 + MB, M)
        for i in range(i0, i1):
            activation_grad(dy[i], r[i], g[i - i0], act)
            if has_bias:
                gi = g[i - i0]
                for j in range(N):
                    db[j] += gi[j]
        # dx[i, k] = sum_j g[i, j] * w[k, j]
        for i in range(i0, i1):
            gi = g[i - i0]
            for k in range(K):
                wk = w[k]
                s = dx.dtype.type(0)
                for j in range(N):
                    s += gi[j] * wk[j]
                dx[i, k] = s
        # dw[k, :] += sum_i x[i, k] * g[i, :]
        for k in range(K):
            dwk = dw[k]
            for i in range(i0, i1):
                a = x[i, k]
                gi = g[i - i0]
                for j in range(N):
                    dwk[j] += a * gi[j]
