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
from numba import carray, njit

from kernels.numba_cpu import _ffi

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

# Cache blocking of ``dot_nt`` (elements): rows of ``a`` per block (the unit of the fused
# epilogue), rows of ``b`` per panel and the reduction length per pass, so that a panel of b
# (NB x LB: 64 KiB in float32) stays in L2 while a block of a streams through L1.
MB = 64
NB = 64
LB = 256
# Problems with fewer multiply-adds than this run on the calling thread: below it, handing
# blocks to XLA's thread pool costs more than the other cores save.
PARALLEL_MIN_MACS = 1 << 20




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
def _tile44(a, b, c, i, j, l0, l1, acc):
    """``c[i:i+4, j:j+4] (+)= a[i:i+4, l0:l1] @ b[j:j+4, l0:l1].T``.

    Sixteen scalar reductions over one contiguous loop: LLVM vectorises the l loop (fastmath
    allows the reassociation), keeping 16 vector accumulators in registers, 8 loads per 16 FMAs.
    """
    zero = c.dtype.type(0)
    a0, a1, a2, a3 = a[i], a[i + 1], a[i + 2], a[i + 3]
    b0, b1, b2, b3 = b[j], b[j + 1], b[j + 2], b[j + 3]
    s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = zero
    s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = zero
    for l in range(np.uint64(l0), np.uint64(l1)):  # unsigned: no negative-index wraparound
        x0, x1, x2, x3 = a0[l], a1[l], a2[l], a3[l]
        y0, y1, y2, y3 = b0[l], b1[l], b2[l], b3[l]
        s00 += x0 * y0
        s01 += x0 * y1
        s02 += x0 * y2
        s03 += x0 * y3
        s10 += x1 * y0
        s11 += x1 * y1
        s12 += x1 * y2
        s13 += x1 * y3
        s20 += x2 * y0
        s21 += x2 * y1
        s22 += x2 * y2
        s23 += x2 * y3
        s30 += x3 * y0
        s31 += x3 * y1
        s32 += x3 * y2
        s33 += x3 * y3
    if acc:
        s00 += c[i, j]
        s01 += c[i, j + 1]
        s02 += c[i, j + 2]
        s03 += c[i, j + 3]
        s10 += c[i + 1, j]
        s11 += c[i + 1, j + 1]
        s12 += c[i + 1, j + 2]
        s13 += c[i + 1, j + 3]
        s20 += c[i + 2, j]
        s21 += c[i + 2, j + 1]
        s22 += c[i + 2, j + 2]
        s23 += c[i + 2, j + 3]
        s30 += c[i + 3, j]
        s31 += c[i + 3, j + 1]
        s32 += c[i + 3, j + 2]
        s33 += c[i + 3, j + 3]
    c[i, j], c[i, j + 1], c[i, j + 2], c[i, j + 3] = s00, s01, s02, s03
    c[i + 1, j], c[i + 1, j + 1], c[i + 1, j + 2], c[i + 1, j + 3] = s10, s11, s12, s13
    c[i + 2, j], c[i + 2, j + 1], c[i + 2, j + 2], c[i + 2, j + 3] = s20, s21, s22, s23
    c[i + 3, j], c[i + 3, j + 1], c[i + 3, j + 2], c[i + 3, j + 3] = s30, s31, s32, s33


@njit(**_OPTS)
def _tile41(a, b, c, i, j, l0, l1, acc):
    """``c[i:i+4, j] (+)= a[i:i+4, l0:l1] @ b[j, l0:l1]`` (the right edge)."""
    zero = c.dtype.type(0)
    a0, a1, a2, a3, b0 = a[i], a[i + 1], a[i + 2], a[i + 3], b[j]
    s0 = s1 = s2 = s3 = zero
    for l in range(np.uint64(l0), np.uint64(l1)):  # unsigned: no negative-index wraparound
        y = b0[l]
        s0 += a0[l] * y
        s1 += a1[l] * y
        s2 += a2[l] * y
        s3 += a3[l] * y
    if acc:
        s0, s1, s2, s3 = s0 + c[i, j], s1 + c[i + 1, j], s2 + c[i + 2, j], s3 + c[i + 3, j]
    c[i, j], c[i + 1, j], c[i + 2, j], c[i + 3, j] = s0, s1, s2, s3


@njit(**_OPTS)
def _tile14(a, b, c, i, j, l0, l1, acc):
    """``c[i, j:j+4] (+)= a[i, l0:l1] @ b[j:j+4, l0:l1].T`` (the bottom edge)."""
    zero = c.dtype.type(0)
    a0, b0, b1, b2, b3 = a[i], b[j], b[j + 1], b[j + 2], b[j + 3]
    s0 = s1 = s2 = s3 = zero
    for l in range(np.uint64(l0), np.uint64(l1)):  # unsigned: no negative-index wraparound
        x = a0[l]
        s0 += x * b0[l]
        s1 += x * b1[l]
        s2 += x * b2[l]
        s3 += x * b3[l]
    if acc:
        s0, s1, s2, s3 = s0 + c[i, j], s1 + c[i, j + 1], s2 + c[i, j + 2], s3 + c[i, j + 3]
    c[i, j], c[i, j + 1], c[i, j + 2], c[i, j + 3] = s0, s1, s2, s3


@njit(**_OPTS)
def _tile11(a, b, c, i, j, l0, l1, acc):
    s = c.dtype.type(0)
    a0, b0 = a[i], b[j]
    for l in range(np.uint64(l0), np.uint64(l1)):  # unsigned: no negative-index wraparound
        s += a0[l] * b0[l]
    c[i, j] = s + c[i, j] if acc else s


@njit(**_OPTS)
def _block(a, b, c, i0, i1, j0, j1):
    """``c[i0:i1, j0:j1] = a[i0:i1] @ b[j0:j1].T`` (a: [M, L], b: [N, L], both row-major).

    4 x 4 register tiles; the reduction is cut into LB-long passes so that the rows of b in use
    (j1 - j0 of them) stay in L2 while each 4-row strip of a is reused from L1.
    """
    L = a.shape[1]
    if L == 0:
        c[i0:i1, j0:j1] = 0
        return
    for l0 in range(0, L, LB):
        l1 = min(l0 + LB, L)
        acc = l0 > 0
        i = i0
        while i + 4 <= i1:
            j = j0
            while j + 4 <= j1:
                _tile44(a, b, c, i, j, l0, l1, acc)
                j += 4
            while j < j1:
                _tile41(a, b, c, i, j, l0, l1, acc)
                j += 1
            i += 4
        while i < i1:
            j = j0
            while j + 4 <= j1:
                _tile14(a, b, c, i, j, l0, l1, acc)
                j += 4
            while j < j1:
                _tile11(a, b, c, i, j, l0, l1, acc)
                j += 1
            i += 1


@njit(**_OPTS)
def _block_epilogue(a, b, c, bias, has_bias, y, act, t, nbj):
    """Block ``t`` of the (MB x NB) grid: GEMM, then bias and activation while it is in cache."""
    M, N = c.shape
    i0, j0 = (t // nbj) * MB, (t % nbj) * NB
    i1, j1 = min(i0 + MB, M), min(j0 + NB, N)
    _block(a, b, c, i0, i1, j0, j1)
    if has_bias or act != 0:
        for i in range(i0, i1):
            ci = c[i, j0:j1]
            if has_bias:
                ci += bias[j0:j1]
            apply_activation(ci, y[i, j0:j1], act)
    elif c is not y:
        y[i0:i1, j0:j1] = c[i0:i1, j0:j1]


# A parallel GEMM is a "job" in a malloc'd block of int64 slots, shared by the calling thread
# and the helper tasks it schedules on XLA's intra-op pool. Blocks are claimed with an atomic
# counter, so any number of helpers (none, if the pool runs tasks inline or late) is correct;
# the last party to let go of the job frees it, so a helper that starts after the work is done
# touches only the job, never the (by then released) buffers.
_J_NEXT, _J_DONE, _J_REFS, _J_A, _J_B, _J_C, _J_BIAS, _J_Y = 0, 8, 16, 24, 32, 40, 48, 56
_J_M, _J_N, _J_L, _J_HAS_BIAS, _J_ACT, _J_NBLOCKS, _J_NBJ = 64, 72, 80, 88, 96, 104, 112
_J_BYTES = 120


@njit(**_OPTS)
def _claim_blocks(job, a, b, c, bias, has_bias, y, act, nblocks, nbj):
    """Runs blocks of the job until none is left unclaimed."""
    while True:
        t = _ffi.atomic_add(job + _J_NEXT, 1)
        if t >= nblocks:
            return
        _block_epilogue(a, b, c, bias, has_bias, y, act, t, nbj)
        _ffi.atomic_add(job + _J_DONE, 1)


@njit(**_OPTS)
def _release(job):
    if _ffi.atomic_add(job + _J_REFS, -1) == 1:
        _ffi.c_free(job)


@njit(**_OPTS)
def run_job(job, nbtype):
    """The body of a helper task (``_handlers.task_*``): claim blocks, then let go of the job."""
    ld = _ffi.load_i64
    m, n, l = ld(job + _J_M), ld(job + _J_N), ld(job + _J_L)
    a = carray(_ffi.as_pointer(ld(job + _J_A), nbtype), (m, l))
    b = carray(_ffi.as_pointer(ld(job + _J_B), nbtype), (n, l))
    c = carray(_ffi.as_pointer(ld(job + _J_C), nbtype), (m, n))
    y = carray(_ffi.as_pointer(ld(job + _J_Y), nbtype), (m, n))
    bias = carray(_ffi.as_pointer(ld(job + _J_BIAS), nbtype), (n,))
    _claim_blocks(job, a, b, c, bias, ld(job + _J_HAS_BIAS) == 1, y, ld(job + _J_ACT),
                  ld(job + _J_NBLOCKS), ld(job + _J_NBJ))
    _release(job)


@njit(**_OPTS)
def gemm_nt(a, b, c, bias, has_bias, y, act, frame, task):
    """``c = a @ b.T (+ bias)`` and ``y = act(c)`` (``y`` may be ``c``), block by block.

    a: [M, L], b: [N, L], c, y: [M, N], bias: [N] (read only if ``has_bias``). With ``task``
    (the address of the dtype's helper task, 0 for none) the blocks are shared with helpers on
    XLA's intra-op thread pool, reached through the call ``frame``.
    """
    M, N = c.shape
    nbj = (N + NB - 1) // NB
    nblocks = ((M + MB - 1) // MB) * nbj
    helpers = 0
    if task != 0 and nblocks > 1:
        helpers = _ffi.threadpool_num_threads(frame)
        if helpers < 0:
            _ffi.destroy_error(frame, -helpers)
            helpers = 0
        helpers = min(helpers, nblocks - 1)
    job = _ffi.c_malloc(_J_BYTES) if helpers > 0 else 0
    if job == 0:
        for t in range(nblocks):
            _block_epilogue(a, b, c, bias, has_bias, y, act, t, nbj)
        return
    st = _ffi.store_i64
    st(job + _J_NEXT, 0)
    st(job + _J_DONE, 0)
    st(job + _J_REFS, helpers + 1)
    st(job + _J_A, np.int64(a.ctypes.data))
    st(job + _J_B, np.int64(b.ctypes.data))
    st(job + _J_C, np.int64(c.ctypes.data))
    st(job + _J_BIAS, np.int64(bias.ctypes.data))
    st(job + _J_Y, np.int64(y.ctypes.data))
    st(job + _J_M, M)
    st(job + _J_N, N)
    st(job + _J_L, a.shape[1])
    st(job + _J_HAS_BIAS, 1 if has_bias else 0)
    st(job + _J_ACT, act)
    st(job + _J_NBLOCKS, nblocks)
    st(job + _J_NBJ, nbj)
    for _ in range(helpers):
        err = _ffi.threadpool_schedule(frame, task, job)
        if err != 0:  # that helper will never run: drop its reference
            _ffi.destroy_error(frame, err)
            _ffi.atomic_add(job + _J_REFS, -1)
    _claim_blocks(job, a, b, c, bias, has_bias, y, act, nblocks, nbj)
    # Every block is claimed; wait for the ones helpers are still computing.
    while _ffi.atomic_load(job + _J_DONE) < nblocks:
        _ffi.cpu_yield()
    _release(job)


@njit(**_OPTS)
def transpose(a, out):
    """``out[:] = a.T`` in 32 x 32 tiles (both sides touch whole cache lines)."""
    M, N = a.shape
    for i0 in range(0, M, 32):
        i1 = min(i0 + 32, M)
        for j0 in range(0, N, 32):
            j1 = min(j0 + 32, N)
            for j in range(j0, j1):
                for i in range(i0, i1):
                    out[j, i] = a[i, j]


@njit(**_OPTS)
def forward(x, w, b, has_bias, y, z, save_z, act, frame, task):
    """``y = act(x @ w + b)`` and, if ``save_z``, ``z = x @ w + b``.

    x: [M, K], w: [K, N], b: [N] (ignored unless ``has_bias``), y: [M, N], z: [M, N] or unused.
    w is transposed once into scratch so that both GEMM operands are read contiguously; the
    bias and activation are applied to each block right after it is computed.
    """
    N, K = w.shape[1], w.shape[0]
    wt = np.empty((N, K), w.dtype)  # (N, K)
    transpose(w, wt)
    gemm_nt(x, wt, z if save_z else y, b, has_bias, y, act, frame, task)


@njit(**_OPTS)
def backward(dy, x, w, r, act, dx, dw, db, has_bias, frame, task):
    """Gradients of ``y = act(x @ w + b)`` given ``dy`` and the residual ``r`` (see ``RESIDUAL``).

    dy, r: [M, N]; x: [M, K]; w: [K, N]; dx: [M, K]; dw: [K, N]; db: [N] (if ``has_bias``).
    ``g = dy * act'`` is formed once (one pass over dy and r) and feeds all three products:
    ``dx = g @ w.T`` (both read along N), ``dw = x.T @ g`` and ``db = sum_i g`` (from g.T and
    x.T, transposed once into scratch so every product reads contiguously).
    """
    M, N = dy.shape
    K = x.shape[1]
    g = np.empty((M, N), dy.dtype)  # (M, N)
    for i in range(M):
        activation_grad(dy[i], r[i], g[i], act)
    gt = np.empty((N, M), dy.dtype)  # (N, M)
    transpose(g, gt)
    if has_bias:
        for j in range(N):
            s = db.dtype.type(0)
            gj = gt[j]
            for i in range(M):
                s += gj[i]
            db[j] = s
    gemm_nt(g, w, dx, db, False, dx, 0, frame, task)
    xt = np.empty((K, M), x.dtype)  # (K, M)
    transpose(x, xt)
    gemm_nt(xt, gt, dw, db, False, dw, 0, frame, task)
