"""The XLA FFI handlers of the numba backend, and the units they are built from.

A handler serves one (kind, dtype, activation) and every shape: ``handler(kind, dtype,
activation)`` compiles it (or loads it from Numba's on-disk cache) on first use, with the units
it calls; importing this module compiles nothing.

Units (``_link``): C-callable cfuncs that call each other by link-time name, so that each is
compiled, optimised and code-generated once, not again inside every caller:

  per dtype:  ``blocks`` (claims and runs a GEMM job's blocks), ``gemm_nt`` and ``panel_gemm``
              (the two GEMMs), ``forward`` and ``backward`` (on one matrix), whose sources are
              the factories ``_kernels.*_unit``; here ``task`` (the helper task scheduled on XLA's
              pool: ``blocks``, then let go of the job) and ``forward_entry`` and
              ``backward_entry`` (read and check the call frame, loop over the batch);
  per dtype and activation (not identity): ``activate_<name>`` (the forward's epilogue) and
              ``gradient_<name>`` (act' times dy), the activation's code a constant there;
  handlers:   the registered targets, one line each: the entry with the handler's activation
              and the address of that activation's unit.

So a relu call compiles relu's two units and none of the other activations'. ``UNITS`` gives
each unit's callees, compiled and registered before it (their names must resolve when it is
linked). The helper task is reached the same way: an entry passes on its address, not an
attribute, so each process links its own address into the cached machine code; an address in an
attribute would be baked into the executable, which JAX's persistent compilation cache can hand
to another process.

Calling conventions (all buffers row-major; a leading batch, from ``vmap_method="broadcast_all"``,
may precede the matrix dims and must have the same size on every operand):

  forward:  args (x [..., M, K], w [..., K, N], b [..., N]?)  rets (y [..., M, N], s?)
            s, the residual when asked for: z [..., M, N], or for relu the tie flag t [..., 1]
            (1 if some z is exactly 0, else 0)
  backward: args (dy [..., M, N], x [..., M, K], w [..., K, N], r [..., M, N], t?, b?)
            rets (dx [..., M, K], dw [..., K, N], db [..., N]?)
            relu passes r = y, t, and b when there is a bias (db); other activations only r.
  attributes (int64, sorted by name, as XLA passes them; ``ATTRIBUTES``): ``act``, the
  activation's ``code`` in ``kernels.activations``, which must be the handler's; the cache
  blocking ``dwt``, ``kc``, ``lb``, ``mb``, ``nb``, ``pg``, ``pmb`` (``_kernels.BLOCKING_FIELDS``; each
  >= 1, pmb a multiple of ``_kernels.MR``; ``blocking.py``); ``share``, 1 to share the GEMM blocks with
  XLA's intra-op thread pool, 0 to stay on the calling thread. All are values in the HLO, never
  addresses. The entry copies the blocking into a record on its stack and passes its address
  down (``_kernels``).

A shape, dtype or attribute that does not fit these conventions returns an XLA error (never a
crash).
"""
from __future__ import annotations

import threading

import numpy as np
from llvmlite import binding as llvm
from numba import cfunc, float32, float64, njit, types

from kernels.activations import ACTIVATIONS
from kernels.numba_cpu import _cache, _ffi, _kernels, _link
from kernels.numba_cpu._ffi import arg, dim, dtype, leading, make_error, rank, ret, view
from kernels.numba_cpu._ffi import nonliteral as _nl  # constant indices: one compile of each reader, not one each
from kernels.numba_cpu._kernels import IDENTITY, RELU
from kernels.numba_cpu._pipeline import Compiler

_NBTYPES = {"float32": float32, "float64": float64}
_DTYPE_CODES = {"float32": _ffi.DTYPE_F32, "float64": _ffi.DTYPE_F64}
# The handlers' attributes in the order XLA passes them (sorted by name).
ATTRIBUTES = tuple(sorted(("act", "share", *_kernels.BLOCKING_FIELDS)))
_ACT, _SHARE = ATTRIBUTES.index("act"), ATTRIBUTES.index("share")
# The attribute of each slot of the blocking record, in slot order.
_BLOCKING_ATTRS = tuple(ATTRIBUTES.index(name) for name in _kernels.BLOCKING_FIELDS)
_PMB_SLOT = _kernels.BLOCKING_FIELDS.index("pmb")
_BAD_BLOCKING = (f"fused_dense: int64 attributes {', '.join(sorted(_kernels.BLOCKING_FIELDS))} must be >= 1, "
                 f"pmb a multiple of {_kernels.MR}")
_BLK_SLOTS = _kernels.BLK_SLOTS  # a literal for stack_buffer (a global of this module)


@njit
def _begin(frame, act, nbtype, blk):
    """An entry's first checks: ``(answer, task, nargs, nrets)``. ``answer >= 0`` is what the
    handler returns at once (XLA's registration query answered, or an error naming a bad
    attribute); otherwise ``task`` is the helper task's address if the attribute ``share`` is 1,
    0 if it is 0, ``nargs``, ``nrets`` count the call's operands and results, and the blocking
    record ``blk`` (the entry's ``BLK_SLOTS`` int64s) holds the blocking attributes."""
    q = _ffi.answer_metadata(frame)
    if q >= 0:
        return q, 0, 0, 0
    if _ffi.scalar_attr_i64(frame, _nl(_ACT)) != act:
        return make_error(frame, "fused_dense: int64 attribute 'act' missing or not the handler's activation"), 0, 0, 0
    share = _ffi.scalar_attr_i64(frame, _nl(_SHARE))
    if share != 0 and share != 1:
        return make_error(frame, "fused_dense: missing int64 attribute 'share' (0 or 1)"), 0, 0, 0
    for s in range(len(_BLOCKING_ATTRS)):
        v = _ffi.scalar_attr_i64(frame, _BLOCKING_ATTRS[s])
        if v < 1 or (s == _PMB_SLOT and v % _kernels.MR != 0):
            bad = make_error(frame, _BAD_BLOCKING)
            return bad, 0, 0, 0
        blk[s] = v
    task = _link.address("task", nbtype) if share == 1 else 0
    return -1, task, _ffi.load_i64(frame + _ffi.FRAME_ARGS_SIZE), _ffi.load_i64(frame + _ffi.FRAME_RETS_SIZE)


def _forward_entry_unit(nbtype, code):
    """The unit ``forward_entry`` of ``nbtype``: ``forward_entry(frame, act, act_unit)`` checks the
    call frame of a forward handler for the activation ``act`` (its unit at ``act_unit``), then
    runs ``forward`` on each matrix of the batch."""
    dtype_code = _DTYPE_CODES[str(nbtype)]

    def forward_entry(frame, act, act_unit):
        blk = _ffi.stack_buffer(_BLK_SLOTS, np.int64, True)
        answer, task, nargs, nrets = _begin(frame, act, nbtype, blk)
        if answer >= 0:
            return answer
        if nargs < 2 or nargs > 3 or nrets < 1 or nrets > 2:
            return make_error(frame, "fused_dense forward takes (x, w[, b]) and returns (y[, z or relu's tie flag])")
        xb, wb, yb = arg(frame, _nl(0)), arg(frame, _nl(1)), ret(frame, _nl(0))
        has_bias = nargs == 3
        save_z = nrets == 2 and act != RELU
        save_ties = nrets == 2 and act == RELU
        bb = arg(frame, _nl(2)) if has_bias else yb
        zb = ret(frame, _nl(1)) if save_z else yb
        tb = ret(frame, _nl(1)) if save_ties else yb
        for buf in (xb, wb, yb, bb, zb, tb):
            if dtype(buf) != dtype_code:
                return make_error(frame, "fused_dense forward: operand dtypes differ from the handler's")
        nb = leading(xb, _nl(2))
        if nb < 0 or leading(wb, _nl(2)) != nb or leading(yb, _nl(2)) != nb or leading(zb, _nl(2)) != nb:
            return make_error(frame, "fused_dense forward: operand ranks or batch sizes differ")
        if save_ties and (leading(tb, _nl(1)) != nb or dim(tb, rank(tb) - 1) != 1):
            return make_error(frame, "fused_dense forward: relu's tie flag must be [1]")
        m, k = dim(xb, rank(xb) - 2), dim(xb, rank(xb) - 1)
        n = dim(wb, rank(wb) - 1)
        if dim(wb, rank(wb) - 2) != k or dim(yb, rank(yb) - 2) != m or dim(yb, rank(yb) - 1) != n:
            return make_error(frame, "fused_dense forward: x [M, K], w [K, N] and y [M, N] do not agree")
        if dim(zb, rank(zb) - 2) != m or dim(zb, rank(zb) - 1) != n:
            return make_error(frame, "fused_dense forward: z must be [M, N]")
        if has_bias and (leading(bb, _nl(1)) != nb or dim(bb, rank(bb) - 1) != n):
            return make_error(frame, "fused_dense forward: b must be [N]")
        xs = view(xb, nbtype, (nb, m, k))
        ws = view(wb, nbtype, (nb, k, n))
        ys = view(yb, nbtype, (nb, m, n))
        zs = view(zb, nbtype, (nb, m, n))
        # Without a bias the view aliases y and is never read.
        bs = view(bb, nbtype, (nb, n))
        # Without save_ties the view aliases y and is never written.
        ts = view(tb, nbtype, (nb, _nl(1)))
        for i in range(nb):
            ties = _kernels.call_forward(xs[i], ws[i], bs[i], has_bias, ys[i], zs[i], save_z, act, act_unit, frame,
                                         task, _link.address_of(blk))
            if save_ties:
                ts[i, 0] = 1 if ties else 0
        return 0
    return forward_entry


def _backward_entry_unit(nbtype, code):
    """The unit ``backward_entry`` of ``nbtype``: ``backward_entry(frame, act, grad_unit)`` checks
    the call frame of a backward handler for the activation ``act`` (its unit at ``grad_unit``),
    then runs ``backward`` on each matrix of the batch."""
    dtype_code = _DTYPE_CODES[str(nbtype)]

    def backward_entry(frame, act, grad_unit):
        blk = _ffi.stack_buffer(_BLK_SLOTS, np.int64, True)
        answer, task, nargs, nrets = _begin(frame, act, nbtype, blk)
        if answer >= 0:
            return answer
        if nrets < 2 or nrets > 3:
            return make_error(frame, "fused_dense backward returns (dx, dw[, db])")
        has_bias = nrets == 3
        relu = act == RELU
        if nargs != ((5 + has_bias) if relu else 4):
            return make_error(frame, "fused_dense backward takes (dy, x, w, r), and for relu (dy, x, w, y, t[, b])")
        dyb, xb, wb, rb = arg(frame, _nl(0)), arg(frame, _nl(1)), arg(frame, _nl(2)), arg(frame, _nl(3))
        dxb, dwb = ret(frame, _nl(0)), ret(frame, _nl(1))
        dbb = ret(frame, _nl(2)) if has_bias else dwb
        tb = arg(frame, _nl(4)) if relu else dyb
        bb = arg(frame, _nl(5)) if relu and has_bias else dbb
        for buf in (dyb, xb, wb, rb, dxb, dwb, dbb, tb, bb):
            if dtype(buf) != dtype_code:
                return make_error(frame, "fused_dense backward: operand dtypes differ from the handler's")
        nb = leading(xb, _nl(2))
        for buf in (dyb, wb, rb, dxb, dwb):
            if leading(buf, _nl(2)) != nb:
                return make_error(frame, "fused_dense backward: operand ranks or batch sizes differ")
        if nb < 0:
            return make_error(frame, "fused_dense backward: operands must have rank >= 2")
        m, k = dim(xb, rank(xb) - 2), dim(xb, rank(xb) - 1)
        n = dim(wb, rank(wb) - 1)
        if dim(wb, rank(wb) - 2) != k:
            return make_error(frame, "fused_dense backward: x [M, K] and w [K, N] do not agree")
        for buf in (dyb, rb):
            if dim(buf, rank(buf) - 2) != m or dim(buf, rank(buf) - 1) != n:
                return make_error(frame, "fused_dense backward: dy and r must be [M, N]")
        if dim(dxb, rank(dxb) - 2) != m or dim(dxb, rank(dxb) - 1) != k:
            return make_error(frame, "fused_dense backward: dx must be [M, K]")
        if dim(dwb, rank(dwb) - 2) != k or dim(dwb, rank(dwb) - 1) != n:
            return make_error(frame, "fused_dense backward: dw must be [K, N]")
        if has_bias and (leading(dbb, _nl(1)) != nb or dim(dbb, rank(dbb) - 1) != n):
            return make_error(frame, "fused_dense backward: db must be [N]")
        if relu and (leading(tb, _nl(1)) != nb or dim(tb, rank(tb) - 1) != 1):
            return make_error(frame, "fused_dense backward: relu's tie flag must be [1]")
        if relu and has_bias and (leading(bb, _nl(1)) != nb or dim(bb, rank(bb) - 1) != n):
            return make_error(frame, "fused_dense backward: b must be [N]")
        dys = view(dyb, nbtype, (nb, m, n))
        xs = view(xb, nbtype, (nb, m, k))
        ws = view(wb, nbtype, (nb, k, n))
        rs = view(rb, nbtype, (nb, m, n))
        dxs = view(dxb, nbtype, (nb, m, k))
        dws = view(dwb, nbtype, (nb, k, n))
        # Without a bias the view aliases dw and is never written.
        dbs = view(dbb, nbtype, (nb, n))
        # Unless relu: both views alias dy or db, and are never read.
        ts = view(tb, nbtype, (nb, _nl(1)))
        bs = view(bb, nbtype, (nb, n))
        for i in range(nb):
            dy, x, w, r, dx, dw, db = dys[i], xs[i], ws[i], rs[i], dxs[i], dws[i], dbs[i]
            _link.call("backward", nbtype, (dy.ctypes.data, x.ctypes.data, w.ctypes.data, bs[i].ctypes.data,
                                            r.ctypes.data, dx.ctypes.data, dw.ctypes.data, db.ctypes.data, m, k, n,
                                            relu and ts[i, 0] != 0, act, grad_unit, has_bias, frame, task,
                                            _link.address_of(blk)))
        return 0
    return backward_entry


def _task_unit(nbtype, code):
    """The unit ``task`` of ``nbtype``, the helper task that ``gemm_nt`` and ``panel_gemm`` schedule
    on XLA's pool: runs ``blocks``, then lets go of the job."""
    def task(job):  # XLA_FFI_Task: void (*)(void* data), the job
        _link.call("blocks", nbtype, (job,))
        _kernels.release(job)
    return task


def _handler_source(kind, name, nbtype, code):
    """The FFI handler of ``kind``, the activation ``name`` (its ``code``) and ``nbtype``: the entry,
    told the handler's activation and the address of that activation's unit."""
    entry = kind + "_entry"
    own = ("activate_" if kind == "forward" else "gradient_") + name

    if code == IDENTITY:  # no unit of its own
        def handler(frame):
            return _link.call(entry, nbtype, (frame, code, 0))
    else:
        def handler(frame):
            return _link.call(entry, nbtype, (frame, code, _link.address(own, nbtype)))
    return handler


# unit -> (factory, the units it calls). A factory takes the dtype's Numba type and the
# activation's code (-1 but for the per-activation units) and returns the function to compile:
# closures, so that one source serves every dtype and activation (Numba keys its cache on the
# closure's values too); its ``options`` (``_kernels``) are those of the code it inlines.
UNITS = {
    "blocks": (_kernels.blocks_unit, ()),
    "task": (_task_unit, ("blocks",)),
    "gemm_nt": (_kernels.gemm_nt_unit, ("blocks",)),
    "panel_gemm": (_kernels.panel_gemm_unit, ("blocks",)),
    "forward": (_kernels.forward_unit, ("gemm_nt", "panel_gemm")),
    "backward": (_kernels.backward_unit, ("gemm_nt", "panel_gemm", "forward")),
    "forward_entry": (_forward_entry_unit, ("forward", "task")),
    "backward_entry": (_backward_entry_unit, ("backward", "task")),
    "activate": (_kernels.activate_unit, ()),
    "gradient": (_kernels.gradient_unit, ()),
}

_lock = threading.RLock()
# Compiled cfuncs, kept referenced for the life of the process: XLA and the units' callers hold
# only their addresses.
_COMPILED: dict[tuple, object] = {}


def _compile(fn, returns, options, qualname):
    """``fn`` as a cfunc ``returns(int64, ...)``: pointers, sizes and flags all travel as int64 (the
    same registers in the x86-64 and AArch64 C ABIs)."""
    fn.__qualname__ = qualname  # its own index file in Numba's cache
    sig = returns(*[types.int64] * fn.__code__.co_argcount)
    return cfunc(sig, **{"pipeline_class": Compiler, **options, "cache": True})(fn)


def unit(name: str, dtype_name: str):
    """The unit ``name`` ("blocks", "forward", "activate_gelu", ...) of ``dtype_name``, compiled (or
    loaded from Numba's cache) and registered under ``_link.symbol(name, dtype_name)`` on first
    use, after the units it calls."""
    with _lock:
        key = (name, dtype_name)
        if key not in _COMPILED:
            base, _, act = name.partition("_") if name.startswith(("activate_", "gradient_")) else (name, "", "")
            factory, calls = UNITS[base]
            for callee in calls:
                unit(callee, dtype_name)
            _cache.drop_if_stale()
            fn = factory(_NBTYPES[dtype_name], ACTIVATIONS[act].code if act else -1)
            compiled = _compile(fn, types.void if base == "task" else types.int64, getattr(factory, "options", {}),
                                f"{name}_{dtype_name}")
            llvm.add_symbol(_link.symbol(name, dtype_name), compiled.address)
            _COMPILED[key] = compiled
        return _COMPILED[key]


def handler(kind: str, dtype_name: str, activation: str):
    """The FFI handler cfunc for ``kind`` ("forward"/"backward"), ``dtype_name`` and ``activation``,
    compiled (or loaded from Numba's cache) on first use, after the units it calls."""
    key = ("handler", kind, dtype_name, activation)
    with _lock:
        if key not in _COMPILED:
            code = ACTIVATIONS[activation].code
            unit(kind + "_entry", dtype_name)
            if code != IDENTITY:
                unit(("activate_" if kind == "forward" else "gradient_") + activation, dtype_name)
            source = _handler_source(kind, activation, _NBTYPES[dtype_name], code)
            _COMPILED[key] = _compile(source, types.int64, {}, f"{kind}_{activation}_{dtype_name}")
        return _COMPILED[key]
