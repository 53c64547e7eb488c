"""A minimal bridge from Numba ``cfunc`` handlers to XLA's typed FFI (api_version 1).

A handler is a C function ``XLA_FFI_Error* handler(XLA_FFI_CallFrame* frame)``. Numba cannot
see C structs, so the handler reads the call frame through raw loads at the byte offsets of
``xla/ffi/api/c_api.h`` (64-bit layout, checked against the header that ships with jaxlib):

  XLA_FFI_CallFrame: struct_size @0, extension_start @8, api @16, ctx @24, stage @32,
                     args {size @56, types @64, args @72}, rets {size @96, types @104, rets @112},
                     attrs {size @136, types @144, names @152, attrs @160}
  XLA_FFI_Buffer:    dtype @16 (int32), data @24, rank @32, dims @40 (int64*)
  XLA_FFI_Scalar:    dtype @0 (int32), value @8 (void*)
  XLA_FFI_Extension_Base: struct_size @0, type @8 (int32), next @16; the metadata extension
                     (type 1) adds ``XLA_FFI_Metadata* metadata`` @24
  XLA_FFI_Metadata:  struct_size @0, api_version {struct_size @8, extension_start @16,
                     major @24, minor @28}, traits @32 (uint32)
  XLA_FFI_Api:       XLA_FFI_Error_Create @48 (args: struct_size @0, extension_start @8,
                     message @16, errc @24 (int32); 28 bytes), XLA_FFI_Error_Destroy @64 (args:
                     struct_size, extension_start, error; 24 bytes), XLA_FFI_ThreadPool_Schedule
                     @136 (args: struct_size, extension_start, ctx, task, data; 40 bytes),
                     XLA_FFI_ThreadPool_NumThreads @144 (args: struct_size, extension_start, ctx,
                     int64_t* num_threads; 32 bytes)

Handlers are compiled once per dtype and kernel and serve every shape: shapes come from the
buffers' ``rank``/``dims`` at each call. Everything here is plain loads and stores, so handlers
are re-entrant (no globals, no GIL, no Python on the call path).

The small readers at the end (``arg``, ``dim``, ...) are plain ``njit`` functions that LLVM
inlines; Numba-level ``inline="always"`` would copy and retype their IR at each of the handlers'
many call sites, a large part of a cold compile.
"""
from __future__ import annotations

import jax
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic
from numba.np.arrayobj import populate_array

# XLA_FFI_CallFrame
FRAME_EXTENSION_START = 8
FRAME_API = 16
FRAME_ARGS_SIZE = 56
FRAME_ARGS = 72
FRAME_RETS_SIZE = 96
FRAME_RETS = 112
FRAME_ATTRS_SIZE = 136
FRAME_ATTRS_TYPES = 144
FRAME_ATTRS = 160
# XLA_FFI_Buffer
BUFFER_DTYPE = 16
BUFFER_DATA = 24
BUFFER_RANK = 32
BUFFER_DIMS = 40
# XLA_FFI_Scalar
SCALAR_DTYPE = 0
SCALAR_VALUE = 8
# Extensions and metadata
EXTENSION_TYPE = 8
EXTENSION_METADATA_TYPE = 1
METADATA_EXTENSION_METADATA = 24
METADATA_API_VERSION = 8
API_VERSION_STRUCT_SIZE = 24
API_MAJOR = 0
# The FFI minor version of the header this bridge was written against (jaxlib 0.10: 3).
API_MINOR = 3
METADATA_TRAITS = 32
# XLA_FFI_Api and the argument structs of the functions used here
API_ERROR_CREATE = 48
API_ERROR_DESTROY = 64
API_THREADPOOL_SCHEDULE = 136
API_THREADPOOL_NUM_THREADS = 144
ERROR_CREATE_ARGS_SIZE = 28
ERROR_DESTROY_ARGS_SIZE = 24
SCHEDULE_ARGS_SIZE = 40
NUM_THREADS_ARGS_SIZE = 32
FRAME_CTX = 24
ERROR_INVALID_ARGUMENT = 3
# Enumerations
ATTR_SCALAR = 3
DTYPE_S64 = 5
DTYPE_F32 = 11
DTYPE_F64 = 12


@intrinsic
def load_i64(typingctx, addr):
    """``*(int64_t*)addr``."""
    def codegen(context, builder, sig, args):
        return builder.load(builder.inttoptr(args[0], ir.IntType(64).as_pointer()))
    return types.int64(types.int64), codegen


@intrinsic
def load_i32(typingctx, addr):
    """``*(int32_t*)addr``, sign-extended to int64."""
    def codegen(context, builder, sig, args):
        v = builder.load(builder.inttoptr(args[0], ir.IntType(32).as_pointer()))
        return builder.sext(v, ir.IntType(64))
    return types.int64(types.int64), codegen


@intrinsic
def store_i32(typingctx, addr, value):
    """``*(int32_t*)addr = value``."""
    def codegen(context, builder, sig, args):
        ptr = builder.inttoptr(args[0], ir.IntType(32).as_pointer())
        builder.store(builder.trunc(args[1], ir.IntType(32)), ptr)
        return context.get_dummy_value()
    return types.none(types.int64, types.int64), codegen


@intrinsic
def store_i64(typingctx, addr, value):
    """``*(int64_t*)addr = value``."""
    def codegen(context, builder, sig, args):
        builder.store(args[1], builder.inttoptr(args[0], ir.IntType(64).as_pointer()))
        return context.get_dummy_value()
    return types.none(types.int64, types.int64), codegen


@intrinsic
def nonliteral(typingctx, value):
    """``value`` typed as a run-time value: a constant argument (``0``, ``False``) would make
    Numba compile the callee once more, specialised for that constant, and every kernel below it
    with it (most of a cold compile's time); kernels whose constants pay are called with them."""
    result = types.unliteral(value)

    def codegen(context, builder, sig, args):
        return context.cast(builder, args[0], sig.args[0], result)
    return result(value), codegen


@intrinsic
def as_pointer(typingctx, addr, dtype):
    """The address ``addr`` as a typed pointer ``dtype*`` (``dtype`` a Numba number class)."""
    elem = dtype.instance_type
    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(elem).as_pointer())
    return types.CPointer(elem)(types.int64, dtype), codegen


@intrinsic
def as_shape(typingctx, a, shape):
    """``a.reshape(shape)`` for a C-contiguous ``a``, built inline: Numba's ``reshape`` calls a
    C helper that costs as much as a small kernel's whole epilogue.

    ``shape`` is an integer or a tuple of integers whose product the caller guarantees to be
    ``a.size`` (unchecked). The view shares ``a``'s memory and keeps it alive, as a reshape does.
    """
    if not isinstance(a, types.Array) or a.layout != "C":
        return None
    if isinstance(shape, types.Integer):
        ndim = 1
    elif isinstance(shape, types.BaseTuple) and all(isinstance(t, types.Integer) for t in shape):
        ndim = len(shape)
    else:
        return None
    result = a.copy(ndim=ndim, layout="C")

    def codegen(context, builder, sig, args):
        src = context.make_array(sig.args[0])(context, builder, args[0])
        dst = context.make_array(sig.return_type)(context, builder)
        if isinstance(sig.args[1], types.Integer):
            dims = [context.cast(builder, args[1], sig.args[1], types.intp)]
        else:
            dims = [context.cast(builder, v, t, types.intp)
                    for v, t in zip(cgutils.unpack_tuple(builder, args[1]), sig.args[1])]
        strides, step = [None] * ndim, src.itemsize
        for d in range(ndim - 1, -1, -1):  # row-major strides
            strides[d] = step
            step = builder.mul(step, dims[d])
        populate_array(dst, data=src.data, shape=dims, strides=strides, itemsize=src.itemsize,
                       meminfo=src.meminfo, parent=src.parent)
        return impl_ret_borrowed(context, builder, sig.return_type, dst._getvalue())
    return result(a, shape), codegen


@intrinsic(prefer_literal=True)
def make_error(typingctx, frame, message):
    """Calls ``frame->api->XLA_FFI_Error_Create`` with a constant message (INVALID_ARGUMENT),
    "numba " + ``message``: the message starts with its kernel's name ("fused_dense forward: ...").

    Returns the ``XLA_FFI_Error*`` as an int64, for the handler to return to XLA.
    """
    if not isinstance(message, types.StringLiteral):
        return None
    text = message.literal_value

    def codegen(context, builder, sig, args):
        i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
        api = builder.load(builder.inttoptr(builder.add(args[0], i64(FRAME_API)), i64.as_pointer()))
        fn_addr = builder.load(builder.inttoptr(builder.add(api, i64(API_ERROR_CREATE)), i64.as_pointer()))
        # XLA_FFI_Error_Create_Args on the stack: {size_t, void*, const char*, int32}.
        args_ty = ir.LiteralStructType([i64, i64, i64, i32])
        slot = builder.alloca(args_ty)
        builder.store(i64(ERROR_CREATE_ARGS_SIZE), builder.gep(slot, [i32(0), i32(0)]))
        builder.store(i64(0), builder.gep(slot, [i32(0), i32(1)]))
        msg = context.insert_const_string(builder.module, "numba " + text)  # the text names its kernel
        builder.store(builder.ptrtoint(msg, i64), builder.gep(slot, [i32(0), i32(2)]))
        builder.store(i32(ERROR_INVALID_ARGUMENT), builder.gep(slot, [i32(0), i32(3)]))
        fnty = ir.FunctionType(i8.as_pointer(), [args_ty.as_pointer()])
        err = builder.call(builder.inttoptr(fn_addr, fnty.as_pointer()), [slot])
        return builder.ptrtoint(err, i64)
    return types.int64(types.int64, message), codegen


@intrinsic(prefer_literal=True)
def stack_buffer(typingctx, count, dtype, zeroed):
    """A ``dtype*`` to ``count`` elements on the stack frame of the calling function, filled with
    zeros at every call when ``zeroed`` (a literal) is True, else left as the stack holds it
    (each call then pays nothing for it: a zero fill is a ``memset`` of the whole buffer, 16 KiB
    of them cost about 1 µs a call; docs/benchmarks.md).

    The alloca sits in the entry block, so when every access has a constant index (small fixed
    loops, fully unrolled) LLVM promotes the buffer to registers: this is how the GEMM
    micro-kernels keep their accumulator tile in vector registers.
    """
    if not isinstance(count, types.IntegerLiteral) or not isinstance(zeroed, types.BooleanLiteral):
        return None
    n, fill = count.literal_value, zeroed.literal_value
    elem = dtype.dtype if isinstance(dtype, types.DType) else dtype.instance_type

    def codegen(context, builder, sig, args):
        ety = context.get_value_type(elem)
        if fill:  # Numba's alloca_once zero-fills at the function's entry
            slot = cgutils.alloca_once(builder, ir.ArrayType(ety, n))
        else:
            with builder.goto_entry_block():
                slot = builder.alloca(ir.ArrayType(ety, n))
        return builder.bitcast(slot, ety.as_pointer())
    return types.CPointer(elem)(count, dtype, zeroed), codegen


@intrinsic(prefer_literal=True)
def vector_copy(typingctx, dst, dst_index, src, src_index, count, accumulate):
    """``dst[dst_index : dst_index + count] (+)= src[src_index : src_index + count]`` (1-D arrays
    of one dtype, ``count`` a literal) as one LLVM vector load, add and store; no bounds checks.

    Why: Numba runs no SLP vectoriser, and LLVM fully unrolls a short copy loop before its loop
    vectoriser sees it, so a register tile's 32-wide row would be stored element by element
    (256 scalar stores per 8 x 32 tile).
    """
    if not isinstance(count, types.IntegerLiteral) or dst.dtype != src.dtype:
        return None
    n = count.literal_value

    def codegen(context, builder, sig, args):
        d, di, s, si, _, acc = args
        ety = context.get_value_type(sig.args[0].dtype)
        align = context.get_abi_sizeof(ety)  # element alignment: rows need not be vector-aligned
        vptr = ir.VectorType(ety, n).as_pointer()
        dp = builder.bitcast(builder.gep(context.make_array(sig.args[0])(context, builder, d).data, [di]), vptr)
        sp = builder.bitcast(builder.gep(context.make_array(sig.args[2])(context, builder, s).data, [si]), vptr)
        v = builder.load(sp, align=align)
        with builder.if_else(cgutils.as_bool_bit(builder, acc)) as (add, store):
            with add:
                builder.store(builder.fadd(v, builder.load(dp, align=align), flags=("fast",)), dp, align=align)
            with store:
                builder.store(v, dp, align=align)
        return context.get_dummy_value()
    return types.none(dst, dst_index, src, src_index, count, accumulate), codegen


@intrinsic
def transpose_block(typingctx, src, src_index, src_ld, dst, dst_index, dst_ld):
    """``dst[dst_index + c*dst_ld + r] = src[src_index + r*src_ld + c]`` for ``r, c < V``, the
    V x V block (V = 16 in float32, 8 in float64: one 64-byte vector a row) transposed in
    registers; 1-D arrays of one dtype, no bounds checks.

    log2(V) butterfly stages of two-source shuffles, each exchanging one bit of the row index
    with the same bit of the column index (rows i and i + b swap the b-halves of their pairs).
    Why: a scalar transpose moves about one element a cycle.
    """
    if src.dtype != dst.dtype or src.dtype not in (types.float32, types.float64):
        return None

    def codegen(context, builder, sig, args):
        s, si, sld, d, di, dld = args
        ety = context.get_value_type(sig.args[0].dtype)
        size = context.get_abi_sizeof(ety)
        n = 64 // size
        vptr = ir.VectorType(ety, n).as_pointer()
        mask = ir.VectorType(ir.IntType(32), n)
        sp = context.make_array(sig.args[0])(context, builder, s).data
        dp = context.make_array(sig.args[3])(context, builder, d).data
        rows = [builder.load(builder.bitcast(builder.gep(sp, [builder.add(si, builder.mul(sld, sld.type(r)))]),
                                             vptr), align=size) for r in range(n)]
        b = 1
        while b < n:
            lo = ir.Constant(mask, [n + c - b if c & b else c for c in range(n)])
            hi = ir.Constant(mask, [n + c if c & b else c + b for c in range(n)])
            new = list(rows)
            for i in range(n):
                if not i & b:
                    new[i] = builder.shuffle_vector(rows[i], rows[i + b], lo)
                    new[i + b] = builder.shuffle_vector(rows[i], rows[i + b], hi)
            rows, b = new, 2 * b
        for c in range(n):
            builder.store(rows[c], builder.bitcast(builder.gep(dp, [builder.add(di, builder.mul(dld, dld.type(c)))]),
                                                   vptr), align=size)
        return context.get_dummy_value()
    return types.none(src, src_index, src_ld, dst, dst_index, dst_ld), codegen


def _api_fn(builder, frame, offset, fnty):
    """``frame->api->fn`` at ``offset`` of XLA_FFI_Api, as a callable of type ``fnty``."""
    i64 = ir.IntType(64)
    api = builder.load(builder.inttoptr(builder.add(frame, i64(FRAME_API)), i64.as_pointer()))
    fn = builder.load(builder.inttoptr(builder.add(api, i64(offset)), i64.as_pointer()))
    return builder.inttoptr(fn, fnty.as_pointer())


def _args_struct(builder, fields):
    """A stack struct of int64 fields (every argument struct used here is size_t/pointer-only)."""
    i32, i64 = ir.IntType(32), ir.IntType(64)
    ty = ir.ArrayType(i64, len(fields))
    slot = builder.alloca(ty)
    for n, v in enumerate(fields):
        builder.store(v, builder.gep(slot, [i32(0), i32(n)]))
    return slot


@intrinsic
def threadpool_schedule(typingctx, frame, task, data):
    """``XLA_FFI_ThreadPool_Schedule(ctx, task, data)``: runs ``task(data)`` on XLA's intra-op pool
    (or inline). Returns 0 or an ``XLA_FFI_Error*`` the caller must destroy."""
    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        ctx = builder.load(builder.inttoptr(builder.add(args[0], i64(FRAME_CTX)), i64.as_pointer()))
        slot = _args_struct(builder, [i64(SCHEDULE_ARGS_SIZE), i64(0), ctx, args[1], args[2]])
        fnty = ir.FunctionType(i64, [slot.type])
        return builder.call(_api_fn(builder, args[0], API_THREADPOOL_SCHEDULE, fnty), [slot])
    return types.int64(types.int64, types.int64, types.int64), codegen


@intrinsic
def threadpool_num_threads(typingctx, frame):
    """``XLA_FFI_ThreadPool_NumThreads``: the size of XLA's intra-op pool, or -(error) on error
    (the negated ``XLA_FFI_Error*``, for the caller to destroy)."""
    def codegen(context, builder, sig, args):
        i32, i64 = ir.IntType(32), ir.IntType(64)
        ctx = builder.load(builder.inttoptr(builder.add(args[0], i64(FRAME_CTX)), i64.as_pointer()))
        out = builder.alloca(i64)
        builder.store(i64(0), out)
        slot = _args_struct(builder, [i64(NUM_THREADS_ARGS_SIZE), i64(0), ctx, builder.ptrtoint(out, i64)])
        fnty = ir.FunctionType(i64, [slot.type])
        err = builder.call(_api_fn(builder, args[0], API_THREADPOOL_NUM_THREADS, fnty), [slot])
        return builder.select(builder.icmp_unsigned("==", err, i64(0)), builder.load(out), builder.neg(err))
    return types.int64(types.int64), codegen


@intrinsic
def destroy_error(typingctx, frame, error):
    """``XLA_FFI_Error_Destroy(error)``, for errors the handler handles itself."""
    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        slot = _args_struct(builder, [i64(ERROR_DESTROY_ARGS_SIZE), i64(0), args[1]])
        fnty = ir.FunctionType(ir.VoidType(), [slot.type])
        builder.call(_api_fn(builder, args[0], API_ERROR_DESTROY, fnty), [slot])
        return context.get_dummy_value()
    return types.none(types.int64, types.int64), codegen


@intrinsic
def atomic_add(typingctx, addr, value):
    """Atomically ``*(int64_t*)addr += value``; returns the old value (sequentially consistent)."""
    def codegen(context, builder, sig, args):
        ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.atomic_rmw("add", ptr, args[1], "seq_cst")
    return types.int64(types.int64, types.int64), codegen


@intrinsic
def atomic_load(typingctx, addr):
    """``*(int64_t*)addr`` with acquire ordering."""
    def codegen(context, builder, sig, args):
        ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.load_atomic(ptr, "acquire", 8)
    return types.int64(types.int64), codegen


def _libc(builder, name, ret, argtys):
    fnty = ir.FunctionType(ret, argtys)
    fn = builder.module.globals.get(name) or ir.Function(builder.module, fnty, name)
    return fn


@intrinsic
def c_malloc(typingctx, nbytes):
    """libc ``malloc``; 0 on failure."""
    def codegen(context, builder, sig, args):
        i8p, i64 = ir.IntType(8).as_pointer(), ir.IntType(64)
        return builder.ptrtoint(builder.call(_libc(builder, "malloc", i8p, [i64]), [args[0]]), i64)
    return types.int64(types.int64), codegen


@intrinsic
def c_free(typingctx, addr):
    """libc ``free``."""
    def codegen(context, builder, sig, args):
        i8p, i64 = ir.IntType(8).as_pointer(), ir.IntType(64)
        builder.call(_libc(builder, "free", ir.VoidType(), [i8p]), [builder.inttoptr(args[0], i8p)])
        return context.get_dummy_value()
    return types.none(types.int64), codegen


@intrinsic
def cpu_yield(typingctx):
    """``sched_yield()``: lets another thread have this core while waiting."""
    def codegen(context, builder, sig, args):
        builder.call(_libc(builder, "sched_yield", ir.IntType(32), []), [])
        return context.get_dummy_value()
    return types.none(), codegen


def register(name: str, handler) -> None:
    """Registers a Numba ``cfunc`` handler as the CPU FFI target ``name`` (api_version 1).

    The caller keeps ``handler`` referenced for the life of the process: XLA holds only its
    address.
    """
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler.address), platform="cpu", api_version=1)


@njit
def answer_metadata(frame):
    """Answers XLA's registration-time query, if ``frame`` carries one.

    Returns -1 for an ordinary call (the handler goes on to compute), else the value the handler
    must return: 0 (NULL, success) after filling in the FFI API version and traits, or an error.
    """
    ext = load_i64(frame + FRAME_EXTENSION_START)
    if ext == 0 or load_i32(ext + EXTENSION_TYPE) != EXTENSION_METADATA_TYPE:
        return -1
    if load_i64(ext) < METADATA_EXTENSION_METADATA + 8:
        return make_error(frame, "FFI: metadata extension struct is too small")
    md = load_i64(ext + METADATA_EXTENSION_METADATA)
    if load_i64(md) < METADATA_TRAITS + 4:
        return make_error(frame, "FFI: metadata struct is too small")
    store_i64(md + METADATA_API_VERSION, API_VERSION_STRUCT_SIZE)
    store_i64(md + METADATA_API_VERSION + 8, 0)  # extension_start
    store_i32(md + METADATA_API_VERSION + 16, API_MAJOR)
    store_i32(md + METADATA_API_VERSION + 20, API_MINOR)
    store_i32(md + METADATA_TRAITS, 0)
    return 0


@njit
def arg(frame, i):
    """Address of the ``XLA_FFI_Buffer`` of argument ``i``."""
    return load_i64(load_i64(frame + FRAME_ARGS) + 8 * i)


@njit
def ret(frame, i):
    """Address of the ``XLA_FFI_Buffer`` of result ``i``."""
    return load_i64(load_i64(frame + FRAME_RETS) + 8 * i)


@njit
def dim(buf, d):
    """``buf->dims[d]``."""
    return load_i64(load_i64(buf + BUFFER_DIMS) + 8 * d)


@njit
def rank(buf):
    return load_i64(buf + BUFFER_RANK)


@njit
def dtype(buf):
    return load_i32(buf + BUFFER_DTYPE)


@njit
def data(buf):
    return load_i64(buf + BUFFER_DATA)


@njit
def view(buf, nbtype, shape):
    """The buffer's data as a C-contiguous array of ``shape`` (no copy)."""
    return carray(as_pointer(data(buf), nbtype), shape)


@njit
def leading(buf, trailing):
    """Product of all but the last ``trailing`` dims (the batch that vmap puts in front), or -1
    when the buffer has fewer than ``trailing`` dims."""
    r = rank(buf)
    if r < trailing:
        return -1
    n = 1
    for d in range(r - trailing):
        n *= dim(buf, d)
    return n


@njit
def scalar_attr_i64(frame, i):
    """The int64 scalar attribute ``i`` (attributes are sorted by name), or -1 if it is not one."""
    if i >= load_i64(frame + FRAME_ATTRS_SIZE):
        return -1
    if load_i32(load_i64(frame + FRAME_ATTRS_TYPES) + 4 * i) != ATTR_SCALAR:
        return -1
    scalar = load_i64(load_i64(frame + FRAME_ATTRS) + 8 * i)
    if load_i32(scalar + SCALAR_DTYPE) != DTYPE_S64:
        return -1
    return load_i64(load_i64(scalar + SCALAR_VALUE))
