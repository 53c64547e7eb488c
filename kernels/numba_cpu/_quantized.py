"""Numba kernels and FFI handlers of ``quantized_dense``: int8 weights, float32 or int8 rows of x.

Two handlers, each compiled (or loaded from Numba's cache) at its first call, not before, and
apart from the fused-dense ones (``_handlers``), whose cold compile they do not wait for:

  weight-only and w8a8 alike: args (x f32 [M, K], w_q s8 [K, N], scale f32 [N], b f32 [N]?)
                              rets (y f32 [M, N])
  attribute ``act`` (int64): identity's or relu's code in ``kernels.activations``, applied on
  each tile as it is stored. The other activations run in XLA after the call (one elementwise
  pass over y; ``kernels.numba_cpu.quantized``): the fused kernels' transcendental epilogue
  would add seconds to each handler's cold compile.

The inner loops are LLVM IR written here (``_wo_tile``, ``_dot4_tile``): a tile of accumulator
vectors held in registers across the whole reduction, with no reliance on the loop vectoriser.

- Weight-only reads w_q in place, 64 columns (one cache line) at a time, converts them to
  float32 in registers and multiplies them with 1, 2 or 4 rows of x (fused multiply-add).
  Memory-bound at small M: a quarter of the bytes a float32 weight would move.
- w8a8 first quantises x's rows itself (``_quantize_rows``: the arithmetic of
  ``kernels.quantized.quantize_rows``, bit for bit), each block of rows once, by the first block
  of output that needs them (the others of its rows wait for it), so that no separate pass over
  x runs in XLA. Then it multiplies 4 consecutive k at once: ``vpdpbusd`` (AVX512-VNNI) adds four u8 x s8 products
  into each int32 lane. It needs one unsigned operand, so the weights go in as ``w + 128`` (a
  flip of the sign bit) and ``128 * sum_k q[i, k]`` is taken off each row after. int32 sums
  wrap modulo 2**32, so the result is the exact dot whenever that fits in int32 (K <= 133,144:
  the limit of any int32 accumulation, XLA's included), whatever the offset's own size. The
  4 x 32 bytes of a step are interleaved from 4 rows of w_q (two byte permutes and a flip):
  once per call into a packed copy (``_pack_quads``, panel after panel of 32 columns) for calls
  of ``PACK_MIN_ROWS`` rows or more, so that a step of the tile is two aligned loads beside its
  16 ``vpdpbusd``; in registers at every step for fewer rows (packing would cost about as much
  as it saves). A last tile of at most 16 columns (a classifier's 10) runs one vector wide.
  Without VNNI the same IR multiplies widened vectors (LLVM's own lowering).

Epilogue: ``z = acc * scale (* scale_x) + b``, then relu or not, on each tile row as it is
stored, on vectors (``_store_vectors``; scale and b zero-padded to whole tiles, a partial last
tile stored under a lane mask). A w8a8 call whose K is a multiple of 4 and at most ``4 *
KC_QUADS`` runs each tile in one pass and stores its sums to y from the registers
(``_dot4_tile_to_y``); otherwise the passes accumulate in a scratch that ``_store_row`` reads.
The handlers hand their arrays on ``_borrowed`` (``_lent``), and the blocks borrow them again for
the tile calls (no reference counting at each call).
Blocks of the output are shared with XLA's intra-op thread pool when the call's attribute
``share`` is 1 (``run``; the caller sets it: ``backend.int8_share_attribute``).
Measurements in docs/benchmarks.md ("Quantized dense").
"""
from __future__ import annotations

import threading

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import carray, cfunc, float32, int8, int32, literally, njit, types
from numba.core import config
from numba.core.codegen import get_host_cpu_features
from numba.extending import intrinsic, overload

from kernels.activations import CODES
from kernels.numba_cpu import _cache, _ffi
from kernels.numba_cpu._pipeline import Compiler
from kernels.numba_cpu._ffi import arg, as_pointer, as_shape, dim, dtype, make_error, rank, ret, view

DTYPE_S8 = 2  # XLA_FFI_DataType S8
# The activations applied in the kernels (others run in XLA after the call: ``quantized``).
IDENTITY, RELU = CODES["identity"], CODES["relu"]
WO_NR = 64  # weight-only: columns per tile (one 64-byte line of w_q, 4 float32 vectors)
WO_MR = 4  # weight-only: rows per tile (16 accumulator vectors)
WO_NARROW_MR = 8  # weight-only: rows per tile of the last columns when they fit 1 or 2 vectors
Q_NR = 32  # w8a8: columns per tile (2 int32 vectors)
Q_MR = 8  # w8a8: rows per tile (16 accumulator vectors)

_WO_TILE = WO_NARROW_MR * WO_NR  # literals for stack_buffer
KC_QUADS = 64  # w8a8: quads of k per pass over a block's row tiles (256 k)
# w8a8 packs w_q (``_packed``) for calls of at least this many rows: below, the packing costs
# more than it saves (docs/benchmarks.md, "Vector stores and packed weights").
PACK_MIN_ROWS = 64
WEIGHT_ONLY, W8A8 = 0, 1  # indices of TASK_SYMBOLS
# quantize_rows's constants: the float32 it multiplies max|x| by, and |x|'s bits (ordered as the
# floats; every NaN's above +inf's).
_INV_QMAX = np.float32(1 / 127)
_ABS_BITS = np.int32(0x7FFFFFFF)
_INF_BITS = np.int32(0x7F800000)
_FLT_MIN = np.float32(np.finfo(np.float32).tiny)  # the smallest normal float32
_FLT_INF = np.float32(np.inf)

# No fastmath: the drivers' loops vectorise without it, and relu must see NaN (the reduction loops
# are hand-written IR).
_OPTS = dict(cache=True, fastmath=False, boundscheck=False, error_model="numpy", nogil=True, pipeline_class=Compiler)


def target_features() -> set[str]:
    """The CPU features Numba compiles for, as it sets them: e.g. {"+avx512f", "-amx-tile", ...}."""
    text = config.CPU_FEATURES if config.CPU_FEATURES is not None else get_host_cpu_features()
    return set(text.split(","))


def has_vnni() -> bool:
    """Whether Numba compiles for a CPU with AVX512-VNNI."""
    return "+avx512vnni" in target_features()


def _i64(context, builder, value, ty):
    return context.cast(builder, value, ty, types.int64)


def _data(context, builder, ty, value):
    return context.make_array(ty)(context, builder, value).data


def _splat(builder, scalar, vty):
    undef = ir.Constant(vty, ir.Undefined)
    one = builder.insert_element(undef, scalar, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(ir.IntType(32), vty.count), None))


def _reduction_loop(builder, count, inits, body):
    """``acc = body(l, acc)`` for l in [0, count), the accumulators (LLVM values) as phis; returns
    the final ones (the inits when count <= 0)."""
    i64 = ir.IntType(64)
    pre = builder.block
    loop = builder.append_basic_block("q.loop")
    done = builder.append_basic_block("q.done")
    builder.cbranch(builder.icmp_signed(">", count, i64(0)), loop, done)
    builder.position_at_end(loop)
    l = builder.phi(i64)
    accs = [builder.phi(v.type) for v in inits]
    new = body(l, accs)
    l1 = builder.add(l, i64(1))
    end = builder.block
    builder.cbranch(builder.icmp_signed("<", l1, count), loop, done)
    l.add_incoming(i64(0), pre)
    l.add_incoming(l1, end)
    for a, v0, v1 in zip(accs, inits, new):
        a.add_incoming(v0, pre)
        a.add_incoming(v1, end)
    builder.position_at_end(done)
    out = []
    for v0, v1 in zip(inits, new):
        p = builder.phi(v0.type)
        p.add_incoming(v0, pre)
        p.add_incoming(v1, end)
        out.append(p)
    return out


@intrinsic(prefer_literal=True)
def _wo_tile(typingctx, x, xo, ldx, rows, w, wo, ldw, k, out, nvec):
    """``out[r*64 + c] = sum_l x[xo + r*ldx + l] * float(w[wo + l*ldw + c])`` for r < rows,
    c < 16 nvec, l < k (out's other entries untouched). x: float32 1-D, w: int8 1-D, out: float32
    1-D (rows * 64); rows and nvec (1 to 4 vectors of 16 columns) literals."""
    if not isinstance(rows, types.IntegerLiteral) or not isinstance(nvec, types.IntegerLiteral):
        return None
    nrows, nv = rows.literal_value, nvec.literal_value

    def codegen(context, builder, sig, args):
        xa, xo_, ldx_, _, wa, wo_, ldw_, k_, oa, _ = args
        xo_, ldx_, wo_, ldw_, k_ = (_i64(context, builder, v, t) for v, t in zip(
            (xo_, ldx_, wo_, ldw_, k_), (sig.args[1], sig.args[2], sig.args[5], sig.args[6], sig.args[7])))
        xp, wp, op = (_data(context, builder, sig.args[i], a) for i, a in ((0, xa), (4, wa), (8, oa)))
        f32, i64 = ir.FloatType(), ir.IntType(64)
        vf, vb = ir.VectorType(f32, 16), ir.VectorType(ir.IntType(8), 16)
        fma = builder.module.globals.get("llvm.fma.v16f32") or ir.Function(
            builder.module, ir.FunctionType(vf, [vf] * 3), "llvm.fma.v16f32")

        def body(l, accs):
            row = builder.gep(wp, [builder.add(wo_, builder.mul(l, ldw_))], inbounds=True)
            wv = [builder.sitofp(builder.load(builder.bitcast(builder.gep(row, [i64(16 * c)], inbounds=True),
                                                                vb.as_pointer()), align=1), vf) for c in range(nv)]
            new = []
            for r in range(nrows):
                at = builder.add(builder.add(xo_, builder.mul(i64(r), ldx_)), l)
                xb = _splat(builder, builder.load(builder.gep(xp, [at], inbounds=True)), vf)
                new += [builder.call(fma, [xb, wv[c], accs[nv * r + c]]) for c in range(nv)]
            return new

        final = _reduction_loop(builder, k_, [ir.Constant(vf, None)] * (nv * nrows), body)
        for i, v in enumerate(final):
            at = i64(WO_NR * (i // nv) + 16 * (i % nv))
            builder.store(v, builder.bitcast(builder.gep(op, [at], inbounds=True), vf.as_pointer()), align=4)
        return context.get_dummy_value()
    u = types.unliteral
    return types.none(x, u(xo), u(ldx), rows, w, u(wo), u(ldw), u(k), out, nvec), codegen


def _dot4(builder, acc, xb, wv, vnni):
    """``acc[lane] += sum_{i<4} u8(wv)[4 lane + i] * s8(xb)[4 lane + i]`` (16 int32 lanes)."""
    v32 = ir.VectorType(ir.IntType(32), 16)
    if vnni:
        name = "llvm.x86.avx512.vpdpbusd.512"
        fn = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(v32, [v32] * 3), name)
        return builder.call(fn, [acc, builder.bitcast(wv, v32), xb])
    v64 = ir.VectorType(ir.IntType(32), 64)
    prod = builder.mul(builder.zext(wv, v64), builder.sext(builder.bitcast(xb, wv.type), v64))
    for i in range(4):
        part = builder.shuffle_vector(prod, ir.Constant(v64, ir.Undefined),
                                      ir.Constant(v32, [4 * lane + i for lane in range(16)]))
        acc = builder.add(acc, part)
    return acc


def _quad_vectors(builder, wp, wo, ldw, k0):
    """The two ``vpdpbusd`` weight operands of k rows ``k0..k0+3`` of a 32-column tile of w_q
    (``wp[wo + k * ldw:]``, int8): byte 4c + i of half h is column 16h + c of row k0 + i, + 128."""
    i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
    b32, b64 = ir.VectorType(i8, 32), ir.VectorType(i8, 64)
    concat = ir.Constant(ir.VectorType(i32, 64), list(range(64)))
    # Byte 4c + i of a half is column c of row i (rows 0-1 in the first operand, 2-3 in the second).
    halves = [ir.Constant(ir.VectorType(i32, 64), [(i % 2) * 32 + (i // 2) * 64 + c + 16 * h
                                                    for c in range(16) for i in range(4)]) for h in range(2)]
    flip = ir.Constant(b64, [-128] * 64)  # the sign bit: s8 w -> u8 w + 128
    rows4 = []
    for i in range(4):
        at = builder.add(wo, builder.mul(builder.add(k0, i64(i)), ldw))
        rows4.append(builder.load(builder.bitcast(builder.gep(wp, [at], inbounds=True), b32.as_pointer()), align=1))
    r01 = builder.shuffle_vector(rows4[0], rows4[1], concat)
    r23 = builder.shuffle_vector(rows4[2], rows4[3], concat)
    return [builder.xor(builder.shuffle_vector(r01, r23, halves[h]), flip) for h in range(2)]


def _packed_quads(builder, wp, wpo, l, nvec):
    """The first ``nvec`` ``vpdpbusd`` weight operands of step l of a panel packed by
    ``_pack_quads`` at ``wp[wpo:]`` (int8 pointer, 64-byte aligned): two aligned loads, no shuffles."""
    i64, b64 = ir.IntType(64), ir.VectorType(ir.IntType(8), 64)
    base = builder.add(wpo, builder.mul(l, i64(128)))
    return [builder.load(builder.bitcast(builder.gep(wp, [builder.add(base, i64(64 * h))], inbounds=True),
                                         b64.as_pointer()), align=64) for h in range(nvec)]


def _dot4_reduce(builder, qp, qo, ldq, nrows, nq, vnni, weights, nvec, inits):
    """A tile's reduction in registers: ``inits[nvec r + h]`` (int32 vectors) plus ``sum_l`` of
    ``nrows`` rows of q (``qp[qo + r * ldq + 4 l:][:4]``, each broadcast) against the first
    ``nvec`` (1 or 2) of ``weights(l)``'s two ``vpdpbusd`` operands, for l < nq; returns the sums."""
    i32, i64 = ir.IntType(32), ir.IntType(64)
    v32 = ir.VectorType(i32, 16)

    def body(l, accs):
        wv = weights(l)
        k0 = builder.mul(l, i64(4))
        new = []
        for r in range(nrows):
            at = builder.add(builder.add(qo, builder.mul(i64(r), ldq)), k0)
            word = builder.load(builder.bitcast(builder.gep(qp, [at], inbounds=True), i32.as_pointer()), align=1)
            xb = _splat(builder, word, v32)
            new += [_dot4(builder, accs[nvec * r + h], xb, wv[h], vnni) for h in range(nvec)]
        return new

    return _reduction_loop(builder, nq, inits, body)


def _dot4_loop(builder, qp, qo, ldq, nrows, op, nq, vnni, weights, nvec):
    """``_dot4_reduce`` on accumulators kept in memory: ``op[32 r + c] += ...`` for c < 16 nvec
    (int32; loaded first, held in registers, stored after)."""
    v32 = ir.VectorType(ir.IntType(32), 16)
    slots = [ir.IntType(64)(Q_NR * r + 16 * h) for r in range(nrows) for h in range(nvec)]
    inits = [builder.load(builder.bitcast(builder.gep(op, [at], inbounds=True), v32.as_pointer()), align=4)
             for at in slots]
    final = _dot4_reduce(builder, qp, qo, ldq, nrows, nq, vnni, weights, nvec, inits)
    for at, v in zip(slots, final):
        builder.store(v, builder.bitcast(builder.gep(op, [at], inbounds=True), v32.as_pointer()), align=4)


def _tile_weights(builder, packed, wp, wo, ldw, nvec):
    """``weights(l)`` of a tile's reduction (``_dot4_reduce``): step l's ``vpdpbusd`` weight
    operands from w_q in place (``wp[wo + k ldw:]``, interleaved in registers: ``_quad_vectors``)
    or, when ``packed``, from ``_pack_quads``'s copy (``wp[wo + 128 l:]``: ``nvec`` aligned loads)."""
    if packed:
        return lambda l: _packed_quads(builder, wp, wo, l, nvec)
    return lambda l: _quad_vectors(builder, wp, wo, ldw, builder.mul(l, ir.IntType(64)(4)))


@intrinsic(prefer_literal=True)
def _dot4_tile(typingctx, q, qo, ldq, rows, w, wo, ldw, nq, packed, nvec, out):
    """``out[r*32 + c] += sum_{l < 4 nq} (w_q[k, c] + 128) * q[qo + r*ldq + l]`` for r < rows,
    c < 16 nvec (int32, exact), k = l: w_q in place (``w[wo + l*ldw + c]``, ``packed`` False) or
    packed by ``_pack_quads`` (``w[wo:]``, 64-byte aligned, ``ldw`` unused). q, w: int8 1-D; out:
    int32 1-D (rows * 32); rows, packed and nvec (1 or 2) literals.

    In place, each step reads 32 bytes from each of 4 rows of w and interleaves them so that every
    int32 lane holds one column's 4 consecutive k (``vpdpbusd``'s layout); packed, it loads
    ``nvec`` vectors and shuffles nothing."""
    if not all(isinstance(a, t) for a, t in ((rows, types.IntegerLiteral), (packed, types.BooleanLiteral),
                                              (nvec, types.IntegerLiteral))):
        return None
    nrows, is_packed, nv, vnni = rows.literal_value, packed.literal_value, nvec.literal_value, has_vnni()

    def codegen(context, builder, sig, args):
        qo_, ldq_, wo_, ldw_, nq_ = (_i64(context, builder, args[i], sig.args[i]) for i in (1, 2, 5, 6, 7))
        qp, wp, op = (_data(context, builder, sig.args[i], args[i]) for i in (0, 4, 10))
        _dot4_loop(builder, qp, qo_, ldq_, nrows, op, nq_, vnni, _tile_weights(builder, is_packed, wp, wo_, ldw_, nv),
                   nv)
        return context.get_dummy_value()
    u = types.unliteral
    return types.none(q, u(qo), u(ldq), rows, w, u(wo), u(ldw), u(nq), packed, nvec, out), codegen


@intrinsic(prefer_literal=True)
def _pack_quads(typingctx, w, wo, ldw, nq, dst, do):
    """``dst[do + 128 l + 64 h + 4 c + i] = w[wo + (4 l + i) ldw + 16 h + c] + 128`` (as u8) for
    l < nq, h < 2, c < 16, i < 4: 32 columns of w_q, 4 k at a time, in ``vpdpbusd``'s layout (the
    interleave ``_dot4_tile`` does in registers, done once per call). w, dst: int8 1-D."""
    def codegen(context, builder, sig, args):
        wa, wo_, ldw_, nq_, da, do_ = args
        wo_, ldw_, nq_, do_ = (_i64(context, builder, v, t) for v, t in zip(
            (wo_, ldw_, nq_, do_), (sig.args[1], sig.args[2], sig.args[3], sig.args[5])))
        wp, dp = _data(context, builder, sig.args[0], wa), _data(context, builder, sig.args[4], da)
        i64 = ir.IntType(64)
        b64 = ir.VectorType(ir.IntType(8), 64)

        def body(l, _):
            for h, v in enumerate(_quad_vectors(builder, wp, wo_, ldw_, builder.mul(l, i64(4)))):
                at = builder.add(do_, builder.add(builder.mul(l, i64(128)), i64(64 * h)))
                builder.store(v, builder.bitcast(builder.gep(dp, [at], inbounds=True), b64.as_pointer()), align=1)
            return []

        _reduction_loop(builder, nq_, [], body)
        return context.get_dummy_value()
    u = types.unliteral
    return types.none(w, u(wo), u(ldw), u(nq), dst, u(do)), codegen


def _column_vectors(builder, sp, bp, j0, has_bias, relu, cols, nvec):
    """What a column tile's epilogue needs, once per tile: its ``nvec`` vectors of scale and of
    bias (zero without one: ``has_bias`` an i1), each vector's lane mask (column ``< cols``) and
    ``keep_all`` (an i1 vector: identity keeps every lane). sp, bp: float32 pointers."""
    i32, f32 = ir.IntType(32), ir.FloatType()
    v32, vf = ir.VectorType(i32, 16), ir.VectorType(f32, 16)

    def load(ptr, h):
        at = builder.add(j0, ir.IntType(64)(16 * h))
        return builder.load(builder.bitcast(builder.gep(ptr, [at], inbounds=True), vf.as_pointer()), align=4)

    live = _splat(builder, builder.trunc(cols, i32), v32)  # lanes c < cols are stored
    return ([load(sp, h) for h in range(nvec)],
            [builder.select(has_bias, load(bp, h), ir.Constant(vf, None)) for h in range(nvec)],
            [builder.icmp_signed("<", ir.Constant(v32, [16 * h + lane for lane in range(16)]), live)
             for h in range(nvec)],
            _splat(builder, builder.not_(relu), ir.VectorType(ir.IntType(1), 16)))


def _store_vectors(builder, values, off, factor, columns, yp, yo):
    """``y[yo + 16 h + lane] = act(float(values[h] - off) * factor * s + b)`` on the lanes of each
    vector's mask, act relu (NaN kept, as ``jnp.maximum`` does) or identity; ``columns`` from
    ``_column_vectors``. values: int32 vectors (``off`` an i32) or float32 ones (``off`` None);
    factor: a float32; yp: float32 pointer."""
    i32, f32 = ir.IntType(32), ir.FloatType()
    vf, v1 = ir.VectorType(f32, 16), ir.VectorType(ir.IntType(1), 16)
    svecs, bvecs, masks, keep_all = columns
    zero = ir.Constant(vf, None)
    store = _vector_intrinsic(builder, "llvm.masked.store.v16f32.p0", ir.VoidType(), [vf, vf.as_pointer(), i32, v1])
    for h, v in enumerate(values):
        if off is not None:
            v = builder.sitofp(builder.sub(v, _splat(builder, off, v.type)), vf)
        v = builder.fmul(builder.fmul(v, _splat(builder, factor, vf)), svecs[h])
        v = builder.fadd(v, bvecs[h])
        keep = builder.or_(builder.fcmp_unordered(">", v, zero), keep_all)
        at = builder.bitcast(builder.gep(yp, [builder.add(yo, ir.IntType(64)(16 * h))], inbounds=True),
                             vf.as_pointer())
        builder.call(store, [builder.select(keep, v, zero), at, i32(4), masks[h]])


@intrinsic(prefer_literal=True)
def _store_row(typingctx, acc, ao, off, factor, s, b, j0, has_bias, relu, y, yo, cols, width):
    """A tile row at once: ``y[yo + c] = act(float(acc[ao + c] - off) * factor * s[j0 + c] +
    (b[j0 + c] if has_bias else 0))`` for c < cols <= width (a literal multiple of 16), act relu
    (NaN kept, as ``jnp.maximum`` does) or identity, on 16-lane vectors stored under a mask of the
    first ``cols`` lanes (y past them neither read nor written: a partial last tile goes straight
    to y). acc: int32 (w8a8) or float32 (weight-only: off unused) 1-D; s, b, y: float32 1-D (s and
    b padded to whole tiles; b is read either way: the handlers pass s for a missing bias)."""
    if not isinstance(width, types.IntegerLiteral) or width.literal_value % 16:
        return None
    nvec, is_int = width.literal_value // 16, isinstance(acc.dtype, types.Integer)

    def codegen(context, builder, sig, args):
        acca, ao_, off_, factor_, sa, ba, j0_, hb_, relu_, ya, yo_, cols_, _ = args
        ao_, j0_, yo_, cols_ = (_i64(context, builder, v, t) for v, t in zip(
            (ao_, j0_, yo_, cols_), (sig.args[1], sig.args[6], sig.args[10], sig.args[11])))
        factor_ = context.cast(builder, factor_, sig.args[3], types.float32)
        hb_ = context.cast(builder, hb_, sig.args[7], types.boolean)
        relu_ = context.cast(builder, relu_, sig.args[8], types.boolean)
        ap, sp, bp, yp = (_data(context, builder, sig.args[i], a) for i, a in ((0, acca), (4, sa), (5, ba), (9, ya)))
        vty = ir.VectorType(ir.IntType(32) if is_int else ir.FloatType(), 16)
        values = [builder.load(builder.bitcast(builder.gep(ap, [builder.add(ao_, ir.IntType(64)(16 * h))],
                                                           inbounds=True), vty.as_pointer()), align=4)
                  for h in range(nvec)]
        off = context.cast(builder, off_, sig.args[2], types.int32) if is_int else None
        _store_vectors(builder, values, off, factor_, _column_vectors(builder, sp, bp, j0_, hb_, relu_, cols_, nvec),
                       yp, yo_)
        return context.get_dummy_value()
    u = types.unliteral
    return (types.none(acc, u(ao), u(off), u(factor), s, b, u(j0), u(has_bias), u(relu), y, u(yo), u(cols), width),
            codegen)


@intrinsic(prefer_literal=True)
def _dot4_tile_to_y(typingctx, q, qo, ldq, rows, w, wo, ldw, nq, packed, nvec, rowsum, sx, i0, s, b, j0, has_bias,
                    relu, y, ldy, cols):
    """A whole w8a8 tile in one pass over K (``4 nq``, all of it): the sums of ``_dot4_tile`` (w_q
    in place, ``packed`` False, or ``w[wo:]`` from ``_pack_quads``, packed True), from zero, kept
    in registers and stored by ``_store_row``'s epilogue (``_store_vectors``) straight into y:
    row r (x's row ``i0 + r``) to ``y[(i0 + r) ldy + j0:][:cols]``, ``off = 128 rowsum[i0 + r]``,
    ``factor = sx[i0 + r]``. The scale and bias vectors are loaded once per tile. rows, packed and
    nvec literals; rowsum: int32 1-D, sx, s, b, y: float32 1-D."""
    if not all(isinstance(a, t) for a, t in ((rows, types.IntegerLiteral), (packed, types.BooleanLiteral),
                                              (nvec, types.IntegerLiteral))):
        return None
    nrows, is_packed, nv, vnni = rows.literal_value, packed.literal_value, nvec.literal_value, has_vnni()

    def codegen(context, builder, sig, args):
        qa, wa, ra, sxa, sa, ba, ya = (args[i] for i in (0, 4, 10, 11, 13, 14, 18))
        qo_, ldq_, wo_, ldw_, nq_, i0_, j0_, ldy_, cols_ = (_i64(context, builder, args[i], sig.args[i])
                                                           for i in (1, 2, 5, 6, 7, 12, 15, 19, 20))
        hb_ = context.cast(builder, args[16], sig.args[16], types.boolean)
        relu_ = context.cast(builder, args[17], sig.args[17], types.boolean)
        qp, wp, rp, sxp, sp, bp, yp = (_data(context, builder, sig.args[i], a) for i, a in (
            (0, qa), (4, wa), (10, ra), (11, sxa), (13, sa), (14, ba), (18, ya)))
        i32, i64 = ir.IntType(32), ir.IntType(64)
        zeros = [ir.Constant(ir.VectorType(i32, 16), None)] * (nrows * nv)
        weights = _tile_weights(builder, is_packed, wp, wo_, ldw_, nv)
        sums = _dot4_reduce(builder, qp, qo_, ldq_, nrows, nq_, vnni, weights, nv, zeros)
        columns = _column_vectors(builder, sp, bp, j0_, hb_, relu_, cols_, nv)
        for r in range(nrows):
            i = builder.add(i0_, i64(r))
            off = builder.mul(builder.load(builder.gep(rp, [i], inbounds=True)), i32(128))
            factor = builder.load(builder.gep(sxp, [i], inbounds=True))
            _store_vectors(builder, sums[nv * r:nv * (r + 1)], off, factor, columns, yp,
                           builder.add(builder.mul(i, ldy_), j0_))
        return context.get_dummy_value()
    u = types.unliteral
    return (types.none(q, u(qo), u(ldq), rows, w, u(wo), u(ldw), u(nq), packed, nvec, rowsum, sx, u(i0), s, b, u(j0),
                       u(has_bias), u(relu), y, u(ldy), u(cols)), codegen)


@intrinsic
def _borrowed(typingctx, a):
    """``a`` without its owner (a null meminfo): a call that takes it then skips the atomic
    increment and decrement of the owner's reference count at its entry and exit (16 of them
    for a tile call of 8 owned arrays: more than its multiply-adds at K = 64; docs/benchmarks.md).
    Valid while the caller keeps ``a`` alive: a call's operands until ``run`` returns (``_lent``), a
    block's for the whole block."""
    if not isinstance(a, types.Array):
        return None

    def codegen(context, builder, sig, args):
        src = context.make_array(a)(context, builder, args[0])
        out = context.make_array(a)(context, builder)
        context.populate_array(out, data=src.data, shape=src.shape, strides=src.strides, itemsize=src.itemsize,
                               meminfo=None)
        return out._getvalue()
    return a(a), codegen


@intrinsic(prefer_literal=True)
def _row_prefix(typingctx, src, so, n, dst, do, width):
    """``dst[do + c] = src[so + c] if c < n else 0`` for c < width (a literal), on one vector of
    ``width`` bytes: a masked load, which reads no byte at or past ``so + n``. src, dst: int8 1-D."""
    if not isinstance(width, types.IntegerLiteral):
        return None
    nb = width.literal_value

    def codegen(context, builder, sig, args):
        sa, so_, n_, da, do_, _ = args
        so_, n_, do_ = (_i64(context, builder, v, t) for v, t in zip((so_, n_, do_), (sig.args[1], sig.args[2],
                                                                                     sig.args[4])))
        sp, dp = _data(context, builder, sig.args[0], sa), _data(context, builder, sig.args[3], da)
        i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
        vb, v1, vl = ir.VectorType(i8, nb), ir.VectorType(ir.IntType(1), nb), ir.VectorType(i64, nb)
        load = _vector_intrinsic(builder, f"llvm.masked.load.v{nb}i8.p0", vb, [vb.as_pointer(), i32, v1, vb])
        live = builder.icmp_signed("<", ir.Constant(vl, list(range(nb))), _splat(builder, n_, vl))
        at = builder.bitcast(builder.gep(sp, [so_], inbounds=True), vb.as_pointer())
        v = builder.call(load, [at, i32(1), live, ir.Constant(vb, None)])
        builder.store(v, builder.bitcast(builder.gep(dp, [do_], inbounds=True), vb.as_pointer()), align=1)
        return context.get_dummy_value()
    u = types.unliteral
    return types.none(src, u(so), u(n), dst, u(do), width), codegen


@njit(**_OPTS)
def _padded_columns(wq, j0, width):
    """``w_q[:, j0:]`` zero-padded to ``width`` columns (32 or 64, more than ``N - j0``), flat ``[K *
    width]``: the last, partial tile's columns (reading them in place would run past the end of
    w_q). A masked vector load and a store per row."""
    literally(width)
    K, N = wq.shape
    out = np.empty(K * width, np.int8)
    wf = as_shape(wq, wq.size)
    for k in range(K):
        _row_prefix(wf, k * N + j0, N - j0, out, k * width, width)
    return out


# Work is cut into blocks of at most BLOCK_ROWS rows x BLOCK_COLS columns of y; with ``share``,
# the blocks are shared with helper tasks on XLA's intra-op thread pool (as the fused kernels do,
# see ``_kernels``): claimed through an atomic counter, so any number of helpers (none included)
# is correct, and the job freed by whoever lets go last.
BLOCK_ROWS = 64
BLOCK_COLS = 256
_Q_BLOCK_ACC = 2 * BLOCK_ROWS * Q_NR  # a literal for stack_buffer: two column tiles


@njit(**_OPTS)
def _grid(M, N):
    """``(column blocks, blocks)`` of an ``[M, N]`` output."""
    ncb = (N + BLOCK_COLS - 1) // BLOCK_COLS
    return ncb, ((M + BLOCK_ROWS - 1) // BLOCK_ROWS) * ncb


@njit(**_OPTS)
def _padded(v, size):
    """``v`` (float32 [N]) zero-padded to ``size`` >= N: what ``_store_row`` reads for whole tiles."""
    out = np.zeros(size, np.float32)
    out[:v.size] = v
    return out


def _vector_intrinsic(builder, name, ret, args):
    fn = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(ret, args), name)
    return fn


@intrinsic
def _absmax_bits(typingctx, x, xo, nvec):
    """``max_l (bits(x[xo + l]) & 0x7FFFFFFF)`` over l < 16 nvec, as int32 (0 when nvec = 0): the
    bits of max|x| when no NaN is among them, above +inf's otherwise. x: float32 1-D."""
    def codegen(context, builder, sig, args):
        xa, xo_, n_ = args
        xo_, n_ = _i64(context, builder, xo_, sig.args[1]), _i64(context, builder, n_, sig.args[2])
        xp = _data(context, builder, sig.args[0], xa)
        i32, i64 = ir.IntType(32), ir.IntType(64)
        v32 = ir.VectorType(i32, 16)
        mask = ir.Constant(v32, [0x7FFFFFFF] * 16)

        def body(l, accs):
            at = builder.add(xo_, builder.mul(l, i64(16)))
            v = builder.and_(builder.load(builder.bitcast(builder.gep(xp, [at], inbounds=True), v32.as_pointer()),
                                          align=4), mask)
            return [builder.select(builder.icmp_signed(">", v, accs[0]), v, accs[0])]

        top, = _reduction_loop(builder, n_, [ir.Constant(v32, None)], body)
        return builder.call(_vector_intrinsic(builder, "llvm.vector.reduce.smax.v16i32", i32, [v32]), [top])
    return types.int32(x, types.unliteral(xo), types.unliteral(nvec)), codegen


@intrinsic(prefer_literal=True)
def _quantize_vectors(typingctx, x, xo, nvec, inv, q, checked):
    """``q[xo + l] = int8(clamp(rint(x[xo + l] * inv), -127, 127))`` (NaN to 0) for l < 16 nvec;
    returns the sum of those q (int32). x: float32 1-D, q: int8 1-D, inv: float32. ``checked``
    (a literal) False leaves out the NaN and clamp selects, for rows where none can act (finite x
    and a normal scale: ``_quantize_rows``)."""
    if not isinstance(checked, types.BooleanLiteral):
        return None
    guard = checked.literal_value

    def codegen(context, builder, sig, args):
        xa, xo_, n_, inv_, qa, _ = args
        xo_, n_ = _i64(context, builder, xo_, sig.args[1]), _i64(context, builder, n_, sig.args[2])
        inv_ = context.cast(builder, inv_, sig.args[3], types.float32)
        xp, qp = _data(context, builder, sig.args[0], xa), _data(context, builder, sig.args[4], qa)
        f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
        vf, v32, v8 = ir.VectorType(f32, 16), ir.VectorType(i32, 16), ir.VectorType(ir.IntType(8), 16)
        rint = _vector_intrinsic(builder, "llvm.rint.v16f32", vf, [vf])
        scale = _splat(builder, inv_, vf)
        hi, lo, zero = ir.Constant(vf, [127.0] * 16), ir.Constant(vf, [-127.0] * 16), ir.Constant(vf, None)

        def body(l, accs):
            at = builder.add(xo_, builder.mul(l, i64(16)))
            v = builder.load(builder.bitcast(builder.gep(xp, [at], inbounds=True), vf.as_pointer()), align=4)
            v = builder.call(rint, [builder.fmul(v, scale)])
            if guard:
                v = builder.select(builder.fcmp_unordered("uno", v, v), zero, v)
                v = builder.select(builder.fcmp_ordered(">", v, hi), hi, v)
                v = builder.select(builder.fcmp_ordered("<", v, lo), lo, v)
            n = builder.fptosi(v, v32)
            builder.store(builder.trunc(n, v8), builder.bitcast(builder.gep(qp, [at], inbounds=True), v8.as_pointer()),
                          align=1)
            return [builder.add(accs[0], n)]

        total, = _reduction_loop(builder, n_, [ir.Constant(v32, None)], body)
        return builder.call(_vector_intrinsic(builder, "llvm.vector.reduce.add.v16i32", i32, [v32]), [total])
    u = types.unliteral
    return types.int32(x, u(xo), u(nvec), u(inv), q, checked), codegen


@njit(**_OPTS)
def _quantize_rows(xf, K, i0, i1, qf, sx, rowsum):
    """Rows ``i0..i1`` of x (float32 ``[M * K]`` flat) quantised as ``kernels.quantized.quantize_rows``
    does, bit for bit: ``sx[i] = max|x_i| * float32(1/127)`` (NaN for a row holding one), ``q =
    clip(rint(x * (1 / (sx if sx > 0 else 1))), -127, 127)`` (NaN to 0, as XLA converts it) into
    ``qf``, and ``rowsum[i] = sum_{k < 4 (K // 4)} q[i, k]`` (the offset ``_q_block`` takes off)."""
    xbits = xf.view(np.int32)
    top_bits = np.empty(1, np.int32)
    top = top_bits.view(np.float32)
    k4, k16 = K // 4 * 4, K // 16 * 16
    # Every row's scale first: a row's max|x| ends in a horizontal max that its quantisation
    # waits for, and in a pass of their own the rows' chains overlap (docs/benchmarks.md).
    for i in range(i0, i1):
        o = i * K
        big = _absmax_bits(xf, o, k16 // 16)  # max|x| on the bits: NaN's above +inf's
        for k in range(k16, K):
            big = max(big, xbits[o + k] & _ABS_BITS)
        top_bits[0] = big
        sx[i] = np.float32(np.nan) if big > _INF_BITS else top[0] * _INV_QMAX
    for i in range(i0, i1):
        o = i * K
        scale = sx[i]
        inv = np.float32(1) / (scale if scale > 0 else np.float32(1))
        if _FLT_MIN <= scale < _FLT_INF:  # x finite, a normal scale: |x * inv| <= 127 (1 + 3 eps), no clamp
            total = _quantize_vectors(xf, o, k16 // 16, inv, qf, False)
        else:
            total = _quantize_vectors(xf, o, k16 // 16, inv, qf, True)
        for k in range(k16, K):
            v = np.rint(xf[o + k] * inv)
            v = np.float32(0) if v != v else (np.float32(127) if v > 127 else (np.float32(-127) if v < -127 else v))
            q = int8(v)
            qf[o + k] = q
            total += int32(q)
        for k in range(k4, K):
            total -= int32(qf[o + k])
        rowsum[i] = total


@njit(**_OPTS)
def _wo_rows(xf, xo, K, rows, src, wo, ldw, nv, tile):
    """``_wo_tile`` for ``rows`` (8, 4, 2 or 1; 8 only with nv <= 2) and ``nv`` vectors (1-4),
    dispatched to the compiled literal pairs."""
    if nv == 4:
        if rows == 4:
            _wo_tile(xf, xo, K, 4, src, wo, ldw, K, tile, 4)
        elif rows == 2:
            _wo_tile(xf, xo, K, 2, src, wo, ldw, K, tile, 4)
        else:
            _wo_tile(xf, xo, K, 1, src, wo, ldw, K, tile, 4)
    elif nv == 3:
        if rows == 4:
            _wo_tile(xf, xo, K, 4, src, wo, ldw, K, tile, 3)
        else:
            _wo_tile(xf, xo, K, 1, src, wo, ldw, K, tile, 3)
    elif nv == 2:
        if rows == 8:
            _wo_tile(xf, xo, K, 8, src, wo, ldw, K, tile, 2)
        else:
            _wo_tile(xf, xo, K, 1, src, wo, ldw, K, tile, 2)
    elif rows == 8:
        _wo_tile(xf, xo, K, 8, src, wo, ldw, K, tile, 1)
    else:
        _wo_tile(xf, xo, K, 1, src, wo, ldw, K, tile, 1)


@njit(**_OPTS)
def _wo_block(t, xf, K, wf, tail, s, b, has_bias, relu, y, sx, rowsum, packed, qf, ready):
    """Block ``t`` of weight-only: ``y = (x @ w_q) * s + b`` (relu'd) on its rows and columns.

    Column tiles of 64 outer (a tile's K x 64 bytes of w_q stay in cache while the row tiles
    read them), row tiles of 4 (then 2, 1) inner. The last, partial column tile is as many
    16-column vectors as its columns need, in row tiles of 8 when that is 1 or 2 vectors (enough
    independent multiply-adds in flight), else 4 (then 1). ``s``, ``b``: padded to whole tiles.
    ``sx``, ``rowsum``, ``packed``, ``qf``, ``ready``: unused (w8a8's).
    """
    M, N = y.shape
    ncb, _ = _grid(M, N)
    i0, p0 = (t // ncb) * BLOCK_ROWS, (t % ncb) * (BLOCK_COLS // WO_NR)
    i1, p1 = min(i0 + BLOCK_ROWS, M), min(p0 + BLOCK_COLS // WO_NR, (N + WO_NR - 1) // WO_NR)
    nfull = N // WO_NR
    yf = as_shape(y, y.size)
    # Zeroed: a narrow tile leaves its other columns as they are (computed, never stored to y).
    tile = carray(_ffi.stack_buffer(_WO_TILE, float32, True), _WO_TILE)
    for p in range(p0, p1):
        j0 = p * WO_NR
        src, wo, ldw = (wf, j0, N) if p < nfull else (tail, 0, WO_NR)
        nv = 4 if p < nfull else (N - j0 + 15) // 16
        mr = WO_NARROW_MR if nv <= 2 else WO_MR
        r0 = i0
        while r0 < i1:
            left = i1 - r0
            rows = mr if left >= mr else (2 if nv == 4 and left >= 2 else 1)
            _wo_rows(xf, r0 * K, K, rows, src, wo, ldw, nv, tile)
            for r in range(rows):
                _store_row(tile, r * WO_NR, int32(0), float32(1), s, b, j0, has_bias, relu, yf, (r0 + r) * N + j0,
                           min(WO_NR, N - j0), WO_NR)
            r0 += rows


@njit(**_OPTS)
def _q_tile(qf, qr, K, rows, src, woc, ldw, nqc, packed, wpo, dst, nvec):
    """One row tile (``rows`` 8, 4 or 1) of one column tile, one pass: ``_dot4_tile`` on ``packed``
    (from ``wpo``) or, when it is empty, on w_q in place (``src[woc:]``); ``nvec`` vectors of 16
    columns (1 for a last tile of at most 16, else 2; compiled as a literal: ``literally``)."""
    literally(nvec)
    if packed.size == 0:
        if rows == 8:
            _dot4_tile(qf, qr, K, 8, src, woc, ldw, nqc, False, nvec, dst)
        elif rows == 4:
            _dot4_tile(qf, qr, K, 4, src, woc, ldw, nqc, False, nvec, dst)
        else:
            _dot4_tile(qf, qr, K, 1, src, woc, ldw, nqc, False, nvec, dst)
    elif rows == 8:
        _dot4_tile(qf, qr, K, 8, packed, wpo, 0, nqc, True, nvec, dst)
    elif rows == 4:
        _dot4_tile(qf, qr, K, 4, packed, wpo, 0, nqc, True, nvec, dst)
    else:
        _dot4_tile(qf, qr, K, 1, packed, wpo, 0, nqc, True, nvec, dst)


@njit(**_OPTS)
def _q_tile_to_y(qf, qr, K, rows, src, woc, ldw, nq, packed, wpo, rowsum, sx, i0, s, b, j0, has_bias, relu, y, N,
                 cols, nvec):
    """``_dot4_tile_to_y`` for one row tile (``rows`` 8, 4 or 1) of one column tile, on ``packed``
    (from ``wpo``) or, when it is empty, on w_q in place (``src[woc:]``); ``nvec`` as in ``_q_tile``."""
    literally(nvec)
    if packed.size == 0:
        if rows == 8:
            _dot4_tile_to_y(qf, qr, K, 8, src, woc, ldw, nq, False, nvec, rowsum, sx, i0, s, b, j0, has_bias, relu, y,
                            N, cols)
        elif rows == 4:
            _dot4_tile_to_y(qf, qr, K, 4, src, woc, ldw, nq, False, nvec, rowsum, sx, i0, s, b, j0, has_bias, relu, y,
                            N, cols)
        else:
            _dot4_tile_to_y(qf, qr, K, 1, src, woc, ldw, nq, False, nvec, rowsum, sx, i0, s, b, j0, has_bias, relu, y,
                            N, cols)
    elif rows == 8:
        _dot4_tile_to_y(qf, qr, K, 8, packed, wpo, 0, nq, True, nvec, rowsum, sx, i0, s, b, j0, has_bias, relu, y, N,
                        cols)
    elif rows == 4:
        _dot4_tile_to_y(qf, qr, K, 4, packed, wpo, 0, nq, True, nvec, rowsum, sx, i0, s, b, j0, has_bias, relu, y, N,
                        cols)
    else:
        _dot4_tile_to_y(qf, qr, K, 1, packed, wpo, 0, nq, True, nvec, rowsum, sx, i0, s, b, j0, has_bias, relu, y, N,
                        cols)


@njit(**_OPTS)
def _q_block(t, xf, K, wf, tail, s, b, has_bias, relu, y, sx, rowsum, packed, qf, ready):
    """Block ``t`` of w8a8: ``y = (q @ w_q) * sx[:, None] * s + b`` (relu'd) on its rows and columns.

    Blocks go column block by column block. Those of the first quantise their rows
    (``_quantize_rows`` into ``qf``, ``sx``, ``rowsum``) and then raise ``ready[row block]``; the
    later ones wait for that flag, which the block claimed ``nrb`` claims earlier (so already
    running, and usually done) raises.

    Column tiles go in pairs, each row tile of the block against both in turn (in place, the two
    share w_q's 64-byte lines: the second finds them in L1). With K a multiple of 4 of at most
    ``KC_QUADS`` quads, each tile is one call from zero to y (``_q_tile_to_y``). Otherwise, per
    pair, the reduction runs in passes of ``KC_QUADS`` quads of k over every row tile,
    accumulating in a block-high int32 scratch per tile (``_q_tile``: both tile forms add ``128 *
    rowsum``, taken off here). The last K % 4 k go through a plain loop. Tile rows are stored on vectors
    (``_store_row``; ``s`` and ``b`` padded to whole tiles), a partial tile's under a lane mask.
    """
    M, N = y.shape
    nrb = (M + BLOCK_ROWS - 1) // BLOCK_ROWS
    rb, cb = t % nrb, t // nrb  # column blocks outer: every row block's first comes before any second
    i0, p0 = rb * BLOCK_ROWS, cb * (BLOCK_COLS // Q_NR)
    i1, p1 = min(i0 + BLOCK_ROWS, M), min(p0 + BLOCK_COLS // Q_NR, (N + Q_NR - 1) // Q_NR)
    nfull = N // Q_NR
    nq = K // 4
    # Borrowed again, though they arrive borrowed: here the null owner is known when compiling, so
    # LLVM drops the reference-count calls of every tile call (docs/benchmarks.md).
    xf, wf, tail, s, b, yf = _borrowed(xf), _borrowed(wf), _borrowed(tail), _borrowed(s), _borrowed(b), _borrowed(
        as_shape(y, y.size))
    sx, rowsum, packed, qf = _borrowed(sx), _borrowed(rowsum), _borrowed(packed), _borrowed(qf)
    flag = np.int64(ready.ctypes.data) + 8 * rb
    if cb == 0:
        _quantize_rows(xf, K, i0, i1, qf, sx, rowsum)
        _ffi.atomic_add(flag, 1)
    else:
        while _ffi.atomic_load(flag) == 0:
            _ffi.cpu_yield()
    one_pass = K % 4 == 0 and 0 < nq <= KC_QUADS  # each tile stores its sums to y from its registers
    acc = carray(_ffi.stack_buffer(_Q_BLOCK_ACC, int32, False), _Q_BLOCK_ACC)  # (2, BLOCK_ROWS, Q_NR)
    for pa in range(p0, p1, 2):
        pb = min(pa + 2, p1)
        if not one_pass:
            acc[:] = 0
        for c0 in range(0, nq, KC_QUADS):
            nqc = min(KC_QUADS, nq - c0)
            r0 = i0
            while r0 < i1:
                rows = min(Q_MR, i1 - r0)
                rows = 8 if rows == 8 else (4 if rows >= 4 else 1)
                for p in range(pa, pb):
                    src, wo, ldw = (wf, p * Q_NR, N) if p < nfull else (tail, 0, Q_NR)
                    qr, woc, wpo = r0 * K + 4 * c0, wo + 4 * c0 * ldw, (p * nq + c0) * 128
                    j0, dst = p * Q_NR, acc[((p - pa) * BLOCK_ROWS + r0 - i0) * Q_NR:]
                    # nvec: 1 for a last tile of at most 16 columns (one vector wide), else 2
                    if one_pass and N - j0 <= 16:
                        _q_tile_to_y(qf, qr, K, rows, src, woc, ldw, nq, packed, wpo, rowsum, sx, r0, s, b, j0,
                                     has_bias, relu, yf, N, N - j0, 1)
                    elif one_pass:
                        _q_tile_to_y(qf, qr, K, rows, src, woc, ldw, nq, packed, wpo, rowsum, sx, r0, s, b, j0,
                                     has_bias, relu, yf, N, min(Q_NR, N - j0), 2)
                    elif N - j0 <= 16:
                        _q_tile(qf, qr, K, rows, src, woc, ldw, nqc, packed, wpo, dst, 1)
                    else:
                        _q_tile(qf, qr, K, rows, src, woc, ldw, nqc, packed, wpo, dst, 2)
                r0 += rows
        if one_pass:
            continue
        for p in range(pa, pb):
            j0 = p * Q_NR
            cols = min(Q_NR, N - j0)
            src, wo, ldw = (wf, j0, N) if p < nfull else (tail, 0, Q_NR)
            base = (p - pa) * BLOCK_ROWS * Q_NR
            for i in range(i0, i1):
                at = base + (i - i0) * Q_NR
                for k in range(4 * nq, K):  # the last K % 4 k (src: whole tiles, the tail padded)
                    qv = int32(qf[i * K + k])
                    for c in range(Q_NR):
                        acc[at + c] += qv * int32(src[wo + k * ldw + c])
                _store_row(acc, at, int32(128) * rowsum[i], sx[i], s, b, j0, has_bias, relu, yf, i * N + j0, cols, Q_NR)


def _block(t, ops):
    """Block ``t`` of the kernel that ``ops`` is for (chosen when typing, so that each handler
    compiles only its own kernel)."""


@overload(_block, jit_options=_OPTS)
def _block_typed(t, ops):
    kernel = _wo_block if ops[12].dtype == types.float32 else _q_block  # qf: a float32 stand-in for weight-only
    return lambda t, ops: kernel(t, *ops)


# The job: int64 slots in a malloc'd block. ``ops`` (x, K, w_q, tail, s, b, has_bias, relu, y, sx,
# rowsum, packed, qf, ready) travels as pointers and sizes (s and b: padded to ``_J_SB_N``).
_J_NEXT, _J_DONE, _J_REFS, _J_NBLOCKS, _J_M, _J_K, _J_N, _J_TAIL_N = 0, 8, 16, 24, 32, 40, 48, 56
_J_X, _J_W, _J_TAIL, _J_S, _J_B, _J_FLAGS, _J_Y, _J_SX, _J_ROWSUM, _J_SX_N = 64, 72, 80, 88, 96, 104, 112, 120, 128, 136
_J_PACKED, _J_PACKED_N = 144, 152
_J_Q, _J_Q_N, _J_READY, _J_READY_N, _J_SB_N = 160, 168, 176, 184, 192
_J_BYTES = 200
# The helper tasks' link-time names, by kind (see ``_task_address``).
TASK_SYMBOLS = ("jaxnet_numba_quantized_task_weight_only", "jaxnet_numba_quantized_task_w8a8")


@njit(**_OPTS)
def _claim(job, nblocks, ops):
    """Runs blocks of the job until none is left unclaimed."""
    while True:
        t = _ffi.atomic_add(job + _J_NEXT, 1)
        if t >= nblocks:
            return
        _block(t, ops)
        _ffi.atomic_add(job + _J_DONE, 1)


@njit(**_OPTS)
def _release(job):
    if _ffi.atomic_add(job + _J_REFS, -1) == 1:
        _ffi.c_free(job)


@njit(**_OPTS)
def run_job(job, qtype):
    """A helper task's body: the operands back from the job (qf's element type ``qtype``: int8
    for w8a8, float32 for weight-only's stand-in), blocks claimed, the job let go."""
    ld = _ffi.load_i64
    m, k, n = ld(job + _J_M), ld(job + _J_K), ld(job + _J_N)
    flags, nsx, nsb = ld(job + _J_FLAGS), ld(job + _J_SX_N), ld(job + _J_SB_N)
    ops = (carray(as_pointer(ld(job + _J_X), float32), m * k), k, carray(as_pointer(ld(job + _J_W), int8), k * n),
           carray(as_pointer(ld(job + _J_TAIL), int8), ld(job + _J_TAIL_N)),
           carray(as_pointer(ld(job + _J_S), float32), nsb), carray(as_pointer(ld(job + _J_B), float32), nsb),
           flags & 1 != 0, flags & 2 != 0, carray(as_pointer(ld(job + _J_Y), float32), (m, n)),
           carray(as_pointer(ld(job + _J_SX), float32), nsx), carray(as_pointer(ld(job + _J_ROWSUM), int32), nsx),
           carray(as_pointer(ld(job + _J_PACKED), int8), ld(job + _J_PACKED_N)),
           carray(as_pointer(ld(job + _J_Q), qtype), ld(job + _J_Q_N)),
           carray(as_pointer(ld(job + _J_READY), np.int64), ld(job + _J_READY_N)))
    _claim(job, ld(job + _J_NBLOCKS), ops)
    _release(job)


@intrinsic
def _task_address(typingctx, kind):
    """The address of ``kind``'s helper task, resolved when the code is linked into the process
    (``handler`` registers its symbol first): an address in an attribute would be baked into
    executables that JAX's persistent compilation cache can hand to another process."""
    if not isinstance(kind, types.IntegerLiteral):
        return None
    name = TASK_SYMBOLS[kind.literal_value]

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        fn = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(ir.VoidType(), [i64]),
                                                               name)
        return builder.ptrtoint(fn, i64)
    return types.int64(kind), codegen


@njit(**_OPTS)
def _helpers(frame, nblocks):
    """How many helper tasks to schedule: one per pool thread but the caller's, at most one per
    block beyond the first (0 when the pool cannot be asked)."""
    n = _ffi.threadpool_num_threads(frame)
    if n < 0:
        _ffi.destroy_error(frame, -n)
        return 0
    return max(0, min(n - 1, nblocks - 1))


@njit(**_OPTS)
def _wait(job, nblocks):
    """After the caller ran out of blocks: waits for the helpers' blocks, lets go of the job."""
    while _ffi.atomic_load(job + _J_DONE) < nblocks:
        _ffi.cpu_yield()
    _release(job)


@njit(inline="always", **_OPTS)
def _lent(ops):
    """``ops`` with every array ``_borrowed``: the calls that hand them on (``run``, ``_block``,
    the block) take no reference counts, two atomic operations per array at each (about 0.2 µs
    of a small call; docs/benchmarks.md). The caller keeps ``ops`` alive until ``run`` returns:
    ``_kept(ops)`` after it."""
    x, K, wf, tail, s, b, has_bias, relu, y, sx, rowsum, packed, qf, ready = ops
    return (_borrowed(x), K, _borrowed(wf), _borrowed(tail), _borrowed(s), _borrowed(b), has_bias, relu, _borrowed(y),
            _borrowed(sx), _borrowed(rowsum), _borrowed(packed), _borrowed(qf), _borrowed(ready))


@njit(inline="always", **_OPTS)
def _kept(ops):
    """A use of ``ops``' scratch (its elements' sizes), after ``run``: Numba frees an array after
    its last use, and the blocks and helpers read these through ``_lent``'s borrowed views."""
    _, _, _, tail, s, b, _, _, _, sx, rowsum, packed, qf, ready = ops
    return tail.size + s.size + b.size + sx.size + rowsum.size + packed.size + qf.size + ready.size


@njit(**_OPTS)
def run(frame, task, share, ops):
    """All blocks of one call: on the calling thread alone, or (``share``) shared with helpers
    running ``task`` (an address)."""
    x, K, wf, tail, s, b, has_bias, relu, y, sx, rowsum, packed, qf, ready = ops
    M, N = y.shape
    _, nblocks = _grid(M, N)
    helpers = _helpers(frame, nblocks) if share else 0
    job = _ffi.c_malloc(_J_BYTES) if helpers > 0 else 0
    if job == 0:
        for t in range(nblocks):
            _block(t, ops)
        return
    st = _ffi.store_i64
    st(job + _J_NEXT, 0)
    st(job + _J_DONE, 0)
    st(job + _J_REFS, helpers + 1)
    st(job + _J_NBLOCKS, nblocks)
    st(job + _J_M, M)
    st(job + _J_K, K)
    st(job + _J_N, N)
    st(job + _J_TAIL_N, tail.size)
    st(job + _J_FLAGS, (1 if has_bias else 0) | (2 if relu else 0))
    st(job + _J_X, np.int64(x.ctypes.data))
    st(job + _J_W, np.int64(wf.ctypes.data))
    st(job + _J_TAIL, np.int64(tail.ctypes.data))
    st(job + _J_S, np.int64(s.ctypes.data))
    st(job + _J_B, np.int64(b.ctypes.data))
    st(job + _J_Y, np.int64(y.ctypes.data))
    st(job + _J_SX, np.int64(sx.ctypes.data))
    st(job + _J_ROWSUM, np.int64(rowsum.ctypes.data))
    st(job + _J_SX_N, sx.size)  # rowsum's too: M for w8a8, 0 for weight-only
    st(job + _J_PACKED, np.int64(packed.ctypes.data))
    st(job + _J_PACKED_N, packed.size)
    st(job + _J_Q, np.int64(qf.ctypes.data))
    st(job + _J_Q_N, qf.size)
    st(job + _J_READY, np.int64(ready.ctypes.data))
    st(job + _J_READY_N, ready.size)
    st(job + _J_SB_N, s.size)
    for _ in range(helpers):
        err = _ffi.threadpool_schedule(frame, task, job)
        if err != 0:  # that helper will never run: drop its reference
            _ffi.destroy_error(frame, err)
            _ffi.atomic_add(job + _J_REFS, -1)
    _claim(job, nblocks, ops)
    _wait(job, nblocks)


@njit(**_OPTS)
def weight_only(frame, x, wq, s, b, has_bias, relu, y, share):
    """``y = act((x @ w_q) * s + b)``, act relu or identity: x [M, K] f32, w_q [K, N] int8,
    s, b [N] f32, y [M, N] f32."""
    K, N = wq.shape
    tail = _padded_columns(wq, N // WO_NR * WO_NR, WO_NR) if N % WO_NR else np.zeros(0, np.int8)
    npad = (N + WO_NR - 1) // WO_NR * WO_NR
    ops = (as_shape(x, x.size), K, as_shape(wq, wq.size), tail, _padded(s, npad), _padded(b, npad), has_bias, relu, y,
           np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(0, np.int8), np.zeros(0, np.float32),
           np.zeros(0, np.int64))
    run(frame, _task_address(WEIGHT_ONLY), share, _lent(ops))
    return _kept(ops)


@njit(**_OPTS)
def _packed(wq, tail):
    """w_q's first ``4 * (K // 4)`` rows in ``_pack_quads``'s layout, panel after panel of 32
    columns (the last from ``tail``, zero-padded), 64-byte aligned: ``[ceil(N / 32), K // 4, 128]``
    flat: every row tile then loads each step's weights as two aligned vectors."""
    K, N = wq.shape
    nq, npan = K // 4, (N + Q_NR - 1) // Q_NR
    size = npan * nq * 128
    raw = np.empty(size + 64, np.int8)
    start = (-raw.ctypes.data) & 63
    out = raw[start:start + size]
    wf = as_shape(wq, wq.size)
    for p in range(npan):
        if (p + 1) * Q_NR <= N:
            _pack_quads(wf, p * Q_NR, N, nq, out, p * nq * 128)
        else:
            _pack_quads(tail, 0, Q_NR, nq, out, p * nq * 128)
    return out


@njit(**_OPTS)
def w8a8(frame, x, wq, s, b, has_bias, relu, y, share):
    """``y = act((q @ w_q) * sx[:, None] * s + b)`` with ``q, sx = quantize_rows(x)``, act relu or
    identity: x [M, K] f32, w_q [K, N] int8, s, b [N] f32, y [M, N] f32; the dot exact in int32
    (modulo 2**32, see the module docstring)."""
    M, K = x.shape
    N = wq.shape[1]
    qf = np.empty(M * K, np.int8)  # x's rows quantised, sx their scales, rowsum their sums (k < 4 (K // 4))
    sx = np.empty(M, np.float32)
    rowsum = np.empty(M, np.int32)
    ready = np.zeros((M + BLOCK_ROWS - 1) // BLOCK_ROWS, np.int64)  # per row block: quantised
    tail = _padded_columns(wq, N // Q_NR * Q_NR, Q_NR) if N % Q_NR else np.zeros(0, np.int8)
    packed = _packed(wq, tail) if M >= PACK_MIN_ROWS else np.zeros(0, np.int8)
    npad = (N + WO_NR - 1) // WO_NR * WO_NR
    ops = (as_shape(x, x.size), K, as_shape(wq, wq.size), tail, _padded(s, npad), _padded(b, npad), has_bias, relu, y,
           sx, rowsum, packed, qf, ready)
    run(frame, _task_address(W8A8), share, _lent(ops))
    return _kept(ops)


@njit
def _matrix(buf, code):
    """``(rows, cols)`` of a rank-2 buffer of dtype ``code``, or ``(-1, -1)``."""
    if rank(buf) != 2 or dtype(buf) != code:
        return -1, -1
    return dim(buf, 0), dim(buf, 1)


@njit
def _vector(buf, n):
    """Whether ``buf`` is a float32 ``[n]``."""
    return rank(buf) == 1 and dtype(buf) == _ffi.DTYPE_F32 and dim(buf, 0) == n


@njit(inline="always")
def _prologue(frame):
    """Common checks of both handlers (the same operands): returns ``(error or 0, relu, has_bias,
    share, M, K, N)``; error -1 means "answered XLA's metadata query" (return 0). Operands x f32
    [M, K], w_q s8 [K, N], scale f32 [N], b f32 [N]?; result y f32 [M, N]. Attributes, sorted by
    name: ``act``, ``share`` (0 or 1)."""
    q = _ffi.answer_metadata(frame)
    if q >= 0:
        return (-1 if q == 0 else q), False, False, False, 0, 0, 0
    nargs = _ffi.load_i64(frame + _ffi.FRAME_ARGS_SIZE)
    if nargs != 3 and nargs != 4 or _ffi.load_i64(frame + _ffi.FRAME_RETS_SIZE) != 1:
        return make_error(frame, "quantized_dense: wrong number of operands or results"), False, False, False, 0, 0, 0
    act = _ffi.scalar_attr_i64(frame, 0)
    if act != IDENTITY and act != RELU:
        error = make_error(frame, "quantized_dense: attribute 'act' must be identity's or relu's code")
        return error, False, False, False, 0, 0, 0
    share = _ffi.scalar_attr_i64(frame, 1)
    if share != 0 and share != 1:
        error = make_error(frame, "quantized_dense: missing int64 attribute 'share' (0 or 1)")
        return error, False, False, False, 0, 0, 0
    has_bias = nargs == 4
    m, k = _matrix(arg(frame, 0), _ffi.DTYPE_F32)
    k2, n = _matrix(arg(frame, 1), DTYPE_S8)
    m2, n2 = _matrix(ret(frame, 0), _ffi.DTYPE_F32)
    if (m < 0 or k2 != k or m2 != m or n2 != n or not _vector(arg(frame, 2), n)
            or not _vector(arg(frame, 3 if has_bias else 2), n)):
        error = make_error(frame, "quantized_dense: the numba kernels take x f32 [M, K], w_q s8 [K, N], scale f32 "
                                  "[N], b f32 [N] and return y f32 [M, N]")
        return error, False, False, False, 0, 0, 0
    return 0, act == RELU, has_bias, share == 1, m, k, n


@njit(inline="always")
def _views(frame, has_bias, m, k, n):
    """``(x, w_q, scale, b, y)`` of a call ``_prologue`` accepted (b: scale when there is none)."""
    s = view(arg(frame, 2), float32, n)
    return (view(arg(frame, 0), float32, (m, k)), view(arg(frame, 1), int8, (k, n)), s,
            view(arg(frame, 3), float32, n) if has_bias else s, view(ret(frame, 0), float32, (m, n)))


def weight_only_f32(frame):
    err, relu, has_bias, share, m, k, n = _prologue(frame)
    if err != 0:
        return 0 if err == -1 else err
    x, wq, s, b, y = _views(frame, has_bias, m, k, n)
    weight_only(frame, x, wq, s, b, has_bias, relu, y, share)
    return 0


def w8a8_f32(frame):
    err, relu, has_bias, share, m, k, n = _prologue(frame)
    if err != 0:
        return 0 if err == -1 else err
    x, wq, s, b, y = _views(frame, has_bias, m, k, n)
    w8a8(frame, x, wq, s, b, has_bias, relu, y, share)
    return 0


def task_weight_only(job):
    run_job(job, float32)


def task_w8a8(job):
    run_job(job, int8)


# kind -> (handler, its helper task, the task's symbol)
_SOURCES = {"weight_only": (weight_only_f32, task_weight_only, TASK_SYMBOLS[WEIGHT_ONLY]),
            "w8a8": (w8a8_f32, task_w8a8, TASK_SYMBOLS[W8A8])}
_SIG = types.int64(types.int64)  # XLA_FFI_Error* (*)(XLA_FFI_CallFrame*), pointers as int64
_TASK_SIG = types.void(types.int64)  # XLA_FFI_Task: void (*)(void* data)
_lock = threading.Lock()
# Compiled cfuncs, kept referenced for the life of the process: XLA holds only their addresses.
_COMPILED: dict[str, object] = {}


def handler(kind: str):
    """The FFI handler cfunc of ``kind`` ("weight_only" or "w8a8"), compiled (or loaded from
    Numba's cache, after ``_cache.drop_if_stale``) on first use, after the helper task whose
    symbol it links against."""
    with _lock:
        if kind not in _COMPILED:
            source, task, symbol = _SOURCES[kind]
            _cache.drop_if_stale()
            compiled = cfunc(_TASK_SIG, cache=True)(task)
            llvm.add_symbol(symbol, compiled.address)
            _COMPILED["task_" + kind] = compiled
            _COMPILED[kind] = cfunc(_SIG, cache=True)(source)
        return _COMPILED[kind]
