"""The FFI handler that trains many small MLPs by full-batch SGD, each model's epochs in cache.

One call runs ``E`` epochs of ``C`` models that share the data: per model and epoch the forward
pass, the MSE loss, the backward pass and the update ``p <- p + (-lr) * g``, every intermediate in
the model's own scratch (a few rows of ``n``), so nothing leaves the core's caches between layers
or epochs. Models are shared between the calling thread and helpers on XLA's intra-op pool by an
atomic counter (as the GEMM jobs of ``_kernels``).

Calling convention (float32, row-major):

  args:  xT [K0, n] (the inputs, transposed), yT [F, n] (the targets, transposed),
         p [C, P] (each model's parameters, flat), lr [C, E] (each model's rate at each epoch),
         active [C] (1: train, 0: copy),
         table [L, 8] int32, one row per layer: K, N, activation code, offset of W [K, N] in p,
         offset of b [N] in p (-1: no bias), leaf id of W, leaf id of b, offset of the layer's
         rows [N, n] in the activation scratch
  rets:  p_out [C, P] (p after E epochs; inactive models copied), metrics [C, E, 4]: per epoch
         the loss at the parameters it started from, the gradient's and the update's global L2
         norms, and the smallest leaf id with a non-finite gradient element (-1: none)

Activations: identity, relu (derivative 1/2 at exactly 0, as jnp.maximum's autodiff), tanh and
sigmoid (derivatives from the output). The arithmetic is float32 with reassociation (sums run
in vector lanes) and contraction (FMA); no other fast-math assumption, so non-finite values
propagate and are reported as in the reference. Bad shapes, offsets or codes return an XLA error.
"""
from __future__ import annotations

import math
import threading

import numpy as np
from llvmlite import binding as llvm
from numba import carray, cfunc, float32, int32, njit, types

from kernels.activations import CODES
from kernels.numba_cpu import _cache, _ffi, _kernels, _link
from kernels.numba_cpu._ffi import arg, dim, dtype, make_error, rank, ret
from kernels.numba_cpu._pipeline import Compiler

IDENTITY, RELU, TANH, SIGMOID = CODES["identity"], CODES["relu"], CODES["tanh"], CODES["sigmoid"]
SUPPORTED = ("identity", "relu", "tanh", "sigmoid")
TABLE_COLUMNS = 8
METRICS = 4  # loss, grad_norm, update_norm, first non-finite leaf
_OPTS = dict(cache=True, fastmath={"reassoc", "contract", "nsz"}, boundscheck=False, error_model="numpy",
             nogil=True, pipeline_class=Compiler)
DTYPE_S32 = 4  # XLA_FFI_DataType of int32

# The job: a ``_kernels`` job of kind 2 (``start_job``, ``schedule_helpers``, ``finish_job``: its
# claim and done counters, references and flag), with these int64 slots after the header.
_KIND = 2
_J_X, _J_Y, _J_P, _J_OUT, _J_LR, _J_ACTIVE, _J_TABLE, _J_METRICS = 48, 56, 64, 72, 80, 88, 96, 104
_J_C, _J_N, _J_K0, _J_F, _J_P_LEN, _J_L, _J_E, _J_ROWS, _J_WIDEST = 112, 120, 128, 136, 144, 152, 160, 168, 176
# Unsigned constants: index arithmetic stays uint64 (uint64 with an int64 is float64 in Numba).
_U1, _U2, _U3, _U4 = (np.uint64(v) for v in (1, 2, 3, 4))


@njit(**_OPTS)
def _layer(table, l):
    """Layer ``l``'s K, N, activation code, W's and b's offsets in p (b's -1: none) and its rows'
    offset in the scratch; sizes and offsets unsigned (Numba wraps negative indices, a check in
    every inner loop, unless the index is unsigned)."""
    u = np.uint64
    return u(table[l, 0]), u(table[l, 1]), table[l, 2], u(table[l, 3]), table[l, 4], u(table[l, 7])


@njit(**_OPTS)
def _axpys(dst, do, src, so, w, wo, ws, count, n):
    """``dst[do:do+n] += sum_k w[wo + k ws] * src[so + k n : so + k n + n]`` for ``k < count``, four rows
    of src per pass over dst (a pass per row would load and store dst three times as often)."""
    k = np.uint64(0)
    while k + _U4 <= count:
        w0, w1, w2, w3 = w[wo + k * ws], w[wo + (k + _U1) * ws], w[wo + (k + _U2) * ws], w[wo + (k + _U3) * ws]
        s0 = so + k * n
        s1, s2, s3 = s0 + n, s0 + _U2 * n, s0 + _U3 * n
        for i in range(n):
            dst[do + i] += w0 * src[s0 + i] + w1 * src[s1 + i] + w2 * src[s2 + i] + w3 * src[s3 + i]
        k += _U4
    while k < count:
        w0 = w[wo + k * ws]
        s0 = so + k * n
        for i in range(n):
            dst[do + i] += w0 * src[s0 + i]
        k += _U1


@njit(**_OPTS)
def _dots(g, go, src, so, cur, count, n):
    """``g[go + j] = src[so:so+n] . cur[j n : j n + n]`` for ``j < count``, four rows of cur per pass
    over src."""
    j = np.uint64(0)
    while j + _U4 <= count:
        c0 = j * n
        c1, c2, c3 = c0 + n, c0 + _U2 * n, c0 + _U3 * n
        t0 = t1 = t2 = t3 = np.float32(0.0)
        for i in range(n):
            x = src[so + i]
            t0 += x * cur[c0 + i]
            t1 += x * cur[c1 + i]
            t2 += x * cur[c2 + i]
            t3 += x * cur[c3 + i]
        g[go + j], g[go + j + _U1], g[go + j + _U2], g[go + j + _U3] = t0, t1, t2, t3
        j += _U4
    while j < count:
        c0 = j * n
        t0 = np.float32(0.0)
        for i in range(n):
            t0 += src[so + i] * cur[c0 + i]
        g[go + j] = t0
        j += _U1


@njit(**_OPTS)
def _forward(xT, a, z, p, table, nl, n):
    """Every layer's pre-activation ``z`` and output ``a`` (rows ``[N, n]`` at the layer's offset)."""
    for l in range(nl):
        K, N, act, wo, bo, ro = _layer(table, l)
        src = xT if l == 0 else a
        so = np.uint64(0) if l == 0 else np.uint64(table[l - 1, 7])
        for j in range(N):
            zo = ro + j * n
            bj = p[np.uint64(bo) + j] if bo >= 0 else np.float32(0.0)
            for i in range(n):
                z[zo + i] = bj
            _axpys(z, zo, src, so, p, wo + j, N, K, n)  # w[k, j] for k < K
            if act == RELU:  # one loop per activation: a branch inside would stop it vectorising
                for i in range(n):
                    v = z[zo + i]
                    a[zo + i] = v if v > 0 else np.float32(0.0)
            elif act == TANH:
                for i in range(n):
                    a[zo + i] = math.tanh(z[zo + i])
            elif act == SIGMOID:
                for i in range(n):
                    a[zo + i] = np.float32(1.0) / (np.float32(1.0) + math.exp(-z[zo + i]))
            else:
                for i in range(n):
                    a[zo + i] = z[zo + i]


@njit(**_OPTS)
def _epoch(xT, yT, p, g, table, nl, n, F, z, a, d0, d1, lr, m):
    """One full-batch SGD step of one model (``n``, ``F`` unsigned): ``m[:]`` = (loss, |g|,
    |update|, first bad leaf)."""
    _forward(xT, a, z, p, table, nl, n)
    top = np.uint64(table[nl - 1, 7])
    scale = np.float32(2.0) / np.float32(n * F)
    loss = np.float32(0.0)
    for j in range(F):
        for i in range(n):
            diff = a[top + j * n + i] - yT[j * n + i]
            loss += diff * diff
            d0[j * n + i] = diff * scale
    cur, nxt = d0, d1
    for l in range(nl - 1, -1, -1):
        K, N, act, wo, bo, ro = _layer(table, l)
        src = xT if l == 0 else a
        so = np.uint64(0) if l == 0 else np.uint64(table[l - 1, 7])
        for j in range(N):  # cur: d(loss)/d(output) -> d(loss)/dz, in place
            zo = ro + j * n
            co = j * n
            if act == RELU:
                for i in range(n):
                    v = z[zo + i]
                    cur[co + i] *= np.float32(1.0) if v > 0 else (np.float32(0.5) if v == 0 else np.float32(0.0))
            elif act == TANH:
                for i in range(n):
                    y = a[zo + i]
                    cur[co + i] *= (np.float32(1.0) - y) * (np.float32(1.0) + y)
            elif act == SIGMOID:
                for i in range(n):
                    y = a[zo + i]
                    cur[co + i] *= y * (np.float32(1.0) - y)
            if bo >= 0:
                s = np.float32(0.0)
                for i in range(n):
                    s += cur[co + i]
                g[np.uint64(bo) + j] = s
        for k in range(K):
            _dots(g, wo + k * N, src, so + k * n, cur, N, n)  # dW[k, j] for j < N
        if l > 0:  # d(loss)/d(input) = W dz, with the W the forward used
            for k in range(K):
                ko = k * n
                for i in range(n):
                    nxt[ko + i] = np.float32(0.0)
                _axpys(nxt, ko, cur, np.uint64(0), p, wo + k * N, np.uint64(1), N, n)  # w[k, j] for j < N
            cur, nxt = nxt, cur
    bad = -1
    for l in range(nl):  # leaf ids order the parameters as the caller's tree does
        K, N, act, wo, bo, ro = _layer(table, l)
        for q in range(wo, wo + K * N):
            if not math.isfinite(g[q]):
                if bad < 0 or table[l, 5] < bad:
                    bad = table[l, 5]
                break
        if bo >= 0:
            for q in range(np.uint64(bo), np.uint64(bo) + N):
                if not math.isfinite(g[q]):
                    if bad < 0 or table[l, 6] < bad:
                        bad = table[l, 6]
                    break
    gs = np.float32(0.0)
    us = np.float32(0.0)
    step = -lr
    for q in range(np.uint64(p.shape[0])):
        u = step * g[q]
        gs += g[q] * g[q]
        us += u * u
        p[q] = p[q] + u
    m[0] = loss / np.float32(n * F)
    m[1] = math.sqrt(gs)
    m[2] = math.sqrt(us)
    m[3] = np.float32(bad)


@njit(**_OPTS)
def _claim(job):
    """Trains the job's models until none is left unclaimed; returns 0."""
    ld = _ffi.load_i64
    C, n, K0, F, P, nl, E = ld(job + _J_C), ld(job + _J_N), ld(job + _J_K0), ld(job + _J_F), ld(job + _J_P_LEN), \
        ld(job + _J_L), ld(job + _J_E)
    rows, widest = ld(job + _J_ROWS), ld(job + _J_WIDEST)
    xT = carray(_ffi.as_pointer(ld(job + _J_X), float32), (K0 * n,))
    yT = carray(_ffi.as_pointer(ld(job + _J_Y), float32), (F * n,))
    p_in = carray(_ffi.as_pointer(ld(job + _J_P), float32), (C, P))
    p_out = carray(_ffi.as_pointer(ld(job + _J_OUT), float32), (C, P))
    lrs = carray(_ffi.as_pointer(ld(job + _J_LR), float32), (C, E))
    active = carray(_ffi.as_pointer(ld(job + _J_ACTIVE), float32), (C,))
    table = carray(_ffi.as_pointer(ld(job + _J_TABLE), int32), (nl, TABLE_COLUMNS))
    metrics = carray(_ffi.as_pointer(ld(job + _J_METRICS), float32), (C, E, METRICS))
    floats = 2 * rows * n + 2 * widest * n + P
    while True:
        c = _ffi.atomic_add(job + _kernels.NEXT, 1)
        if c >= C:
            return 0
        p = p_out[c]
        for q in range(P):
            p[q] = p_in[c, q]
        if active[c] == 0:
            for e in range(E):
                for k in range(METRICS):
                    metrics[c, e, k] = 0
        else:
            base = _ffi.c_malloc(4 * floats)
            if base == 0:
                _ffi.atomic_add(job + _kernels.FLAG, 1)
            else:
                # Separate C-contiguous views (a slice's layout is unknown to Numba and stops vectorising).
                z = carray(_ffi.as_pointer(base, float32), (rows * n,))
                a = carray(_ffi.as_pointer(base + 4 * rows * n, float32), (rows * n,))
                d0 = carray(_ffi.as_pointer(base + 8 * rows * n, float32), (widest * n,))
                d1 = carray(_ffi.as_pointer(base + 4 * (2 * rows + widest) * n, float32), (widest * n,))
                g = carray(_ffi.as_pointer(base + 8 * (rows + widest) * n, float32), (P,))
                for e in range(E):
                    _epoch(xT, yT, p, g, table, nl, np.uint64(n), np.uint64(F), z, a, d0, d1, lrs[c, e],
                           metrics[c, e])
                _ffi.c_free(base)
        _ffi.atomic_add(job + _kernels.DONE, 1)


def _claim_unit(job):
    return _claim(job)


def _task_unit(job):  # XLA_FFI_Task: void (*)(void* data), the job
    _link.call("mlp_sgd_claim", float32, (job,))
    _kernels.release(job)


@njit(**_OPTS)
def _check(frame, xb, yb, pb, lb, ab, tb, ob, mb):
    """Checks the call frame's buffers; returns -1 if they fit the convention, else an XLA error."""
    for buf in (xb, yb, pb, lb, ab, ob, mb):
        if dtype(buf) != _ffi.DTYPE_F32:
            return make_error(frame, "mlp_sgd: x, y, p, lr, active, p_out and metrics must be float32")
    if dtype(tb) != DTYPE_S32:
        return make_error(frame, "mlp_sgd: the layer table must be int32")
    if rank(xb) != 2 or rank(yb) != 2 or rank(pb) != 2 or rank(lb) != 2 or rank(ab) != 1 or rank(tb) != 2 \
            or rank(ob) != 2 or rank(mb) != 3:
        return make_error(frame, "mlp_sgd: ranks must be xT 2, yT 2, p 2, lr 2, active 1, table 2, p_out 2, metrics 3")
    K0, n, F = dim(xb, 0), dim(xb, 1), dim(yb, 0)
    C, P, nl = dim(pb, 0), dim(pb, 1), dim(tb, 0)
    if dim(yb, 1) != n or dim(lb, 0) != C or dim(lb, 1) != dim(mb, 1) or dim(ab, 0) != C or dim(ob, 0) != C \
            or dim(ob, 1) != P or dim(mb, 0) != C or dim(mb, 2) != METRICS or dim(tb, 1) != TABLE_COLUMNS \
            or nl < 1 or n < 1:
        return make_error(frame, "mlp_sgd: xT [K0, n], yT [F, n], p [C, P], lr [C, E], active [C], table [L, 8], "
                                 "p_out [C, P] and metrics [C, E, 4] do not agree")
    table = carray(_ffi.as_pointer(_ffi.data(tb), int32), (nl, TABLE_COLUMNS))
    width, rows = K0, 0
    for l in range(nl):
        K, N, act, wo, bo, ro = table[l, 0], table[l, 1], table[l, 2], table[l, 3], table[l, 4], table[l, 7]
        if K != width or N < 1 or wo < 0 or wo + K * N > P or bo < -1 or bo + N > P or ro != rows:
            return make_error(frame, "mlp_sgd: a layer's widths or offsets do not fit p or the previous layer")
        if act != IDENTITY and act != RELU and act != TANH and act != SIGMOID:
            return make_error(frame, "mlp_sgd: activations must be identity, relu, tanh or sigmoid")
        width, rows = N, rows + N * n
    if width != F:
        return make_error(frame, "mlp_sgd: the last layer's width must be yT's rows (F)")
    return -1



def _handler_unit(frame):
    answer = _ffi.answer_metadata(frame)
    if answer >= 0:
        return answer
    if _ffi.load_i64(frame + _ffi.FRAME_ARGS_SIZE) != 6 or _ffi.load_i64(frame + _ffi.FRAME_RETS_SIZE) != 2:
        return make_error(frame, "mlp_sgd takes (xT, yT, p, lr, active, table) and returns (p_out, metrics)")
    xb, yb, pb, lb, ab, tb = arg(frame, 0), arg(frame, 1), arg(frame, 2), arg(frame, 3), arg(frame, 4), arg(frame, 5)
    ob, mb = ret(frame, 0), ret(frame, 1)
    bad = _check(frame, xb, yb, pb, lb, ab, tb, ob, mb)
    if bad >= 0:
        return bad
    C, nl = dim(pb, 0), dim(tb, 0)
    table = carray(_ffi.as_pointer(_ffi.data(tb), int32), (nl, TABLE_COLUMNS))
    widest = 0
    for l in range(nl):
        widest = max(widest, table[l, 0], table[l, 1])
    task = _link.address("mlp_sgd_task", float32)
    tagged = _kernels.start_job(frame, task, C, _KIND)  # the calling thread claims models too
    job = tagged & _kernels.ADDRESS
    st = _ffi.store_i64
    for slot, value in ((_J_X, _ffi.data(xb)), (_J_Y, _ffi.data(yb)), (_J_P, _ffi.data(pb)), (_J_OUT, _ffi.data(ob)),
                        (_J_LR, _ffi.data(lb)), (_J_ACTIVE, _ffi.data(ab)), (_J_TABLE, _ffi.data(tb)),
                        (_J_METRICS, _ffi.data(mb)), (_J_C, C), (_J_N, dim(xb, 1)), (_J_K0, dim(xb, 0)),
                        (_J_F, dim(yb, 0)), (_J_P_LEN, dim(pb, 1)), (_J_L, nl), (_J_E, dim(mb, 1)),
                        (_J_ROWS, table[nl - 1, 7] // dim(xb, 1) + table[nl - 1, 1]), (_J_WIDEST, widest)):
        st(job + slot, value)
    _link.call("mlp_sgd_claim", float32, (_kernels.schedule_helpers(frame, task, tagged),))
    if _kernels.finish_job(job, tagged != job, C):  # waits for every model; flagged: a scratch malloc failed
        return make_error(frame, "mlp_sgd: out of memory for a model's scratch")
    return 0


_lock = threading.Lock()
_COMPILED: dict[str, object] = {}


def handler():
    """The FFI handler cfunc, compiled (or loaded from Numba's cache) on first use with the units
    it calls (``mlp_sgd_claim``, ``mlp_sgd_task``), kept referenced for the life of the process."""
    with _lock:
        if "handler" not in _COMPILED:
            _cache.drop_if_stale()
            for name, fn, returns in (("mlp_sgd_claim", _claim_unit, types.int64),
                                      ("mlp_sgd_task", _task_unit, types.void),
                                      ("handler", _handler_unit, types.int64)):
                fn.__qualname__ = f"{name}_float32"  # its own index file in Numba's cache
                compiled = cfunc(returns(types.int64), cache=True, pipeline_class=Compiler)(fn)
                if name != "handler":
                    llvm.add_symbol(_link.symbol(name, "float32"), compiled.address)
                _COMPILED[name] = compiled
        return _COMPILED["handler"]
