"""The XLA FFI handlers: one Numba ``cfunc`` per dtype and kernel, serving every shape.

``handler(kind, dtype)`` compiles (or loads from Numba's on-disk cache) one handler on first use,
with its dtype's helper task; importing this module compiles nothing.

Calling conventions (all buffers row-major; a leading batch, from ``vmap_method="broadcast_all"``,
may precede the matrix dims and must have the same size on every operand):

  forward:  args (x [..., M, K], w [..., K, N], b [..., N]?)  rets (y [..., M, N], s?)
            s, the residual when asked for: z [..., M, N], or for relu the tie flag t [..., 1]
            (1 if some z is exactly 0, else 0)
  backward: args (dy [..., M, N], x [..., M, K], w [..., K, N], r [..., M, N], t?, b?)
            rets (dx [..., M, K], dw [..., K, N], db [..., N]?)
            relu passes r = y, t, and b when there is a bias (db); other activations only r.
  attributes (sorted by name, as XLA passes them): ``act`` (int64), the activation's ``code`` in
  ``kernels.activations``; ``share`` (int64), 1 to share the GEMM blocks with XLA's intra-op
  thread pool, 0 to stay on the calling thread.

The helper task scheduled on XLA's pool is reached through a symbol, not an attribute: before a
handler is compiled or loaded from Numba's cache, its dtype's task is registered with LLVM's
symbol table (``TASK_SYMBOLS``), and the handler refers to it by name, so each process links its
own address into the cached machine code. An address in an attribute would be baked into the
executable, which JAX's persistent compilation cache can hand to another process.

A shape, dtype or attribute that does not fit these conventions returns an XLA error (never a
crash).
"""
from __future__ import annotations

import threading

from llvmlite import binding as llvm
from llvmlite import ir
from numba import carray, cfunc, float32, float64, njit, types
from numba.extending import intrinsic

from kernels.activations import ACTIVATIONS
from kernels.numba_cpu import _cache, _ffi
from kernels.numba_cpu._ffi import arg, as_pointer, data, dim, dtype, leading, make_error, rank, ret
from kernels.numba_cpu._kernels import RELU, backward, forward, run_job

_N_ACTS = len(ACTIVATIONS)
# The helper tasks' link-time names, by dtype.
TASK_SYMBOLS = {"float32": "jaxnet_numba_task_f32", "float64": "jaxnet_numba_task_f64"}


@intrinsic
def _task_address(typingctx, nbtype):
    """The address of ``nbtype``'s helper task (``TASK_SYMBOLS``), resolved when the code is
    linked into the process (the symbol must be registered by then: see ``handler``)."""
    name = {types.float32: TASK_SYMBOLS["float32"], types.float64: TASK_SYMBOLS["float64"]}.get(nbtype.instance_type)
    if name is None:
        return None

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        fn = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(ir.VoidType(), [i64]),
                                                               name)
        return builder.ptrtoint(fn, i64)
    return types.int64(nbtype), codegen


@njit
def _task(frame, nbtype):
    """The helper task's address if attribute 1 (``share``) is 1, 0 if it is 0, else -1."""
    share = _ffi.scalar_attr_i64(frame, 1)
    if share == 1:
        return _task_address(nbtype)
    return 0 if share == 0 else -1


@njit
def _view(buf, nbtype, shape):
    """The buffer's data as a C-contiguous array of ``shape`` (no copy)."""
    return carray(as_pointer(data(buf), nbtype), shape)


@njit(inline="always", cache=True, nogil=True)
def _forward_call(frame, nbtype, code):
    q = _ffi.answer_metadata(frame)
    if q >= 0:
        return q
    nargs = _ffi.load_i64(frame + _ffi.FRAME_ARGS_SIZE)
    nrets = _ffi.load_i64(frame + _ffi.FRAME_RETS_SIZE)
    if nargs < 2 or nargs > 3 or nrets < 1 or nrets > 2:
        return make_error(frame, "forward takes (x, w[, b]) and returns (y[, z or relu's tie flag])")
    act = _ffi.scalar_attr_i64(frame, 0)
    if act < 0 or act >= _N_ACTS:
        return make_error(frame, "missing or unknown int64 attribute 'act'")
    task = _task(frame, nbtype)
    if task < 0:
        return make_error(frame, "missing int64 attribute 'share' (0 or 1)")
    xb, wb, yb = arg(frame, 0), arg(frame, 1), ret(frame, 0)
    has_bias = nargs == 3
    save_z = nrets == 2 and act != RELU
    save_ties = nrets == 2 and act == RELU
    bb = arg(frame, 2) if has_bias else yb
    zb = ret(frame, 1) if save_z else yb
    tb = ret(frame, 1) if save_ties else yb
    for buf in (xb, wb, yb, bb, zb, tb):
        if dtype(buf) != code:
            return make_error(frame, "forward: operand dtypes differ from the handler's")
    nb = leading(xb, 2)
    if nb < 0 or leading(wb, 2) != nb or leading(yb, 2) != nb or leading(zb, 2) != nb:
        return make_error(frame, "forward: operand ranks or batch sizes differ")
    if save_ties and (leading(tb, 1) != nb or dim(tb, rank(tb) - 1) != 1):
        return make_error(frame, "forward: relu's tie flag must be [1]")
    m, k = dim(xb, rank(xb) - 2), dim(xb, rank(xb) - 1)
    n = dim(wb, rank(wb) - 1)
    if dim(wb, rank(wb) - 2) != k or dim(yb, rank(yb) - 2) != m or dim(yb, rank(yb) - 1) != n:
        return make_error(frame, "forward: x [M, K], w [K, N] and y [M, N] do not agree")
    if dim(zb, rank(zb) - 2) != m or dim(zb, rank(zb) - 1) != n:
        return make_error(frame, "forward: z must be [M, N]")
    if has_bias and (leading(bb, 1) != nb or dim(bb, rank(bb) - 1) != n):
        return make_error(frame, "forward: b must be [N]")
    xs = _view(xb, nbtype, (nb, m, k))
    ws = _view(wb, nbtype, (nb, k, n))
    ys = _view(yb, nbtype, (nb, m, n))
    zs = _view(zb, nbtype, (nb, m, n))
    # Without a bias the view aliases y and is never read.
    bs = _view(bb, nbtype, (nb, n))
    # Without save_ties the view aliases y and is never written.
    ts = _view(tb, nbtype, (nb, 1))
    for i in range(nb):
        ties = forward(xs[i], ws[i], bs[i], has_bias, ys[i], zs[i], save_z, act, frame, task)
        if save_ties:
            ts[i, 0] = 1 if ties else 0
    return 0


@njit(inline="always", cache=True, nogil=True)
def _backward_call(frame, nbtype, code):
    q = _ffi.answer_metadata(frame)
    if q >= 0:
        return q
    nargs = _ffi.load_i64(frame + _ffi.FRAME_ARGS_SIZE)
    nrets = _ffi.load_i64(frame + _ffi.FRAME_RETS_SIZE)
    if nrets < 2 or nrets > 3:
        return make_error(frame, "backward returns (dx, dw[, db])")
    act = _ffi.scalar_attr_i64(frame, 0)
    if act < 0 or act >= _N_ACTS:
        return make_error(frame, "missing or unknown int64 attribute 'act'")
    has_bias = nrets == 3
    relu = act == RELU
    if nargs != ((5 + has_bias) if relu else 4):
        return make_error(frame, "backward takes (dy, x, w, r), and for relu (dy, x, w, y, t[, b])")
    task = _task(frame, nbtype)
    if task < 0:
        return make_error(frame, "missing int64 attribute 'share' (0 or 1)")
    dyb, xb, wb, rb = arg(frame, 0), arg(frame, 1), arg(frame, 2), arg(frame, 3)
    dxb, dwb = ret(frame, 0), ret(frame, 1)
    dbb = ret(frame, 2) if has_bias else dwb
    tb = arg(frame, 4) if relu else dyb
    bb = arg(frame, 5) if relu and has_bias else dbb
    for buf in (dyb, xb, wb, rb, dxb, dwb, dbb, tb, bb):
        if dtype(buf) != code:
            return make_error(frame, "backward: operand dtypes differ from the handler's")
    nb = leading(xb, 2)
    for buf in (dyb, wb, rb, dxb, dwb):
        if leading(buf, 2) != nb:
            return make_error(frame, "backward: operand ranks or batch sizes differ")
    if nb < 0:
        return make_error(frame, "backward: operands must have rank >= 2")
    m, k = dim(xb, rank(xb) - 2), dim(xb, rank(xb) - 1)
    n = dim(wb, rank(wb) - 1)
    if dim(wb, rank(wb) - 2) != k:
        return make_error(frame, "backward: x [M, K] and w [K, N] do not agree")
    for buf in (dyb, rb):
        if dim(buf, rank(buf) - 2) != m or dim(buf, rank(buf) - 1) != n:
            return make_error(frame, "backward: dy and r must be [M, N]")
    if dim(dxb, rank(dxb) - 2) != m or dim(dxb, rank(dxb) - 1) != k:
        return make_error(frame, "backward: dx must be [M, K]")
    if dim(dwb, rank(dwb) - 2) != k or dim(dwb, rank(dwb) - 1) != n:
        return make_error(frame, "backward: dw must be [K, N]")
    if has_bias and (leading(dbb, 1) != nb or dim(dbb, rank(dbb) - 1) != n):
        return make_error(frame, "backward: db must be [N]")
    if relu and (leading(tb, 1) != nb or dim(tb, rank(tb) - 1) != 1):
        return make_error(frame, "backward: relu's tie flag must be [1]")
    if relu and has_bias and (leading(bb, 1) != nb or dim(bb, rank(bb) - 1) != n):
        return make_error(frame, "backward: b must be [N]")
    dys = _view(dyb, nbtype, (nb, m, n))
    xs = _view(xb, nbtype, (nb, m, k))
    ws = _view(wb, nbtype, (nb, k, n))
    rs = _view(rb, nbtype, (nb, m, n))
    dxs = _view(dxb, nbtype, (nb, m, k))
    dws = _view(dwb, nbtype, (nb, k, n))
    # Without a bias the view aliases dw and is never written.
    dbs = _view(dbb, nbtype, (nb, n))
    # Unless relu: both views alias dy or db, and are never read.
    ts = _view(tb, nbtype, (nb, 1))
    bs = _view(bb, nbtype, (nb, n))
    for i in range(nb):
        backward(dys[i], xs[i], ws[i], bs[i], rs[i], relu and ts[i, 0] != 0, act, dxs[i], dws[i], dbs[i], has_bias,
                 frame, task)
    return 0


# The handlers' C signature is XLA_FFI_Error* (*)(XLA_FFI_CallFrame*); both pointers travel as
# int64 (same registers in the x86-64 and AArch64 C ABIs). The functions below become cfuncs
# only in ``handler``: compiling all of them up front made a first call wait for every dtype.
_SIG = types.int64(types.int64)
# XLA_FFI_Task: void (*)(void* data), the job.
_TASK_SIG = types.void(types.int64)


def forward_f32(frame):
    return _forward_call(frame, float32, _ffi.DTYPE_F32)


def forward_f64(frame):
    return _forward_call(frame, float64, _ffi.DTYPE_F64)


def backward_f32(frame):
    return _backward_call(frame, float32, _ffi.DTYPE_F32)


def backward_f64(frame):
    return _backward_call(frame, float64, _ffi.DTYPE_F64)


def task_f32(job):
    run_job(job, float32)


def task_f64(job):
    run_job(job, float64)


_SOURCES = {
    ("forward", "float32"): forward_f32,
    ("forward", "float64"): forward_f64,
    ("backward", "float32"): backward_f32,
    ("backward", "float64"): backward_f64,
}
_TASK_SOURCES = {"float32": task_f32, "float64": task_f64}

_lock = threading.Lock()
# Compiled cfuncs, kept referenced for the life of the process: XLA holds only their addresses.
_COMPILED: dict[tuple[str, str], object] = {}


def task(dtype_name: str):
    """The helper task cfunc of ``dtype_name`` ("float32"/"float64"), compiled on first use and
    registered under its ``TASK_SYMBOLS`` name."""
    with _lock:
        return _task_locked(dtype_name)


def _task_locked(dtype_name):
    key = ("task", dtype_name)
    if key not in _COMPILED:
        _cache.drop_if_stale()
        t = cfunc(_TASK_SIG, cache=True)(_TASK_SOURCES[dtype_name])
        llvm.add_symbol(TASK_SYMBOLS[dtype_name], t.address)
        _COMPILED[key] = t
    return _COMPILED[key]


def handler(kind: str, dtype_name: str):
    """The FFI handler cfunc for ``kind`` ("forward"/"backward") and ``dtype_name``, compiled (or
    loaded from Numba's cache) on first use, after its dtype's helper task."""
    key = (kind, dtype_name)
    with _lock:
        if key not in _COMPILED:
            source = _SOURCES[key]
            _task_locked(dtype_name)  # the symbol the handler links against
            _COMPILED[key] = cfunc(_SIG, cache=True)(source)
        return _COMPILED[key]
