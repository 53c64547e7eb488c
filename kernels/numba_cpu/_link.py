"""Link-time names: how the numba backend's compiled pieces call each other.

Each piece (a "unit": the GEMM blocks, the forward, one activation's epilogue, ...) is compiled
once, as a C-callable ``cfunc``, and its address registered with LLVM's symbol table under
``symbol(unit, dtype)`` (``_handlers`` does both). Callers refer to a unit by that name, so their
code holds a declaration, not a copy of the unit: Numba links the code of every function it calls
into the caller and optimises and code-generates the whole again, which made each handler
recompile the whole GEMM tree. A name resolves when the caller is linked into the process
(compiled or loaded from Numba's cache): its units must be registered by then. Every process
links its own addresses, so cached machine code stays right in any process.

Units take and return int64 (pointers, sizes, flags as 0/1; the helper task XLA runs returns
nothing): one C signature per arity.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_SUFFIX = {"float32": "f32", "float64": "f64"}


def symbol(unit: str, dtype: str) -> str:
    """The link-time name of ``unit`` ("blocks", "forward", "activate_gelu", ...) for ``dtype``."""
    return f"jaxnet_numba_{unit}_{_SUFFIX[dtype]}"


def _dtype_name(like):
    """``like``'s dtype name ("float32"), for an array type or a number class (``float32``)."""
    if isinstance(like, types.Array):
        return str(like.dtype)
    if isinstance(like, types.NumberClass):
        return str(like.instance_type)
    return None


def _declare(builder, name, nargs):
    i64 = ir.IntType(64)
    fnty = ir.FunctionType(i64, [i64] * nargs)
    return builder.module.globals.get(name) or ir.Function(builder.module, fnty, name)


def _int64_args(context, builder, tuple_type, value):
    return [context.cast(builder, v, t, types.int64)
            for v, t in zip(cgutils.unpack_tuple(builder, value), tuple_type)]


def _int_tuple(args):
    return isinstance(args, types.BaseTuple) and all(isinstance(t, (types.Integer, types.Boolean)) for t in args)


@intrinsic(prefer_literal=True)
def call(typingctx, unit, like, args):
    """``unit(*args)`` for ``like``'s dtype (an array or a number class): a C call by link-time
    name. ``args``: a tuple of integers or booleans (passed as int64); returns int64."""
    name = _dtype_name(like)
    if not isinstance(unit, types.StringLiteral) or name not in _SUFFIX or not _int_tuple(args):
        return None
    sym = symbol(unit.literal_value, name)

    def codegen(context, builder, sig, llargs):
        fn = _declare(builder, sym, len(args))
        return builder.call(fn, _int64_args(context, builder, sig.args[2], llargs[2]))
    return types.int64(unit, like, args), codegen


@intrinsic(prefer_literal=True)
def address(typingctx, unit, like):
    """The address of ``unit`` for ``like``'s dtype (int64), resolved at link time."""
    name = _dtype_name(like)
    if not isinstance(unit, types.StringLiteral) or name not in _SUFFIX:
        return None
    sym = symbol(unit.literal_value, name)

    def codegen(context, builder, sig, llargs):
        # The arity does not matter for an address; 1 matches the task's declaration elsewhere.
        return builder.ptrtoint(_declare(builder, sym, 1), ir.IntType(64))
    return types.int64(unit, like), codegen


@intrinsic
def call_address(typingctx, addr, args):
    """``(*addr)(*args)``: a C call through a unit's address (as ``address`` gives it)."""
    if not isinstance(addr, types.Integer) or not _int_tuple(args):
        return None

    def codegen(context, builder, sig, llargs):
        i64 = ir.IntType(64)
        fnty = ir.FunctionType(i64, [i64] * len(args))
        fn = builder.inttoptr(llargs[0], fnty.as_pointer())
        return builder.call(fn, _int64_args(context, builder, sig.args[1], llargs[1]))
    return types.int64(addr, args), codegen


@intrinsic
def address_of(typingctx, ptr):
    """A pointer (e.g. ``_ffi.stack_buffer``'s) as an int64 address."""
    if not isinstance(ptr, types.CPointer):
        return None

    def codegen(context, builder, sig, llargs):
        return builder.ptrtoint(llargs[0], ir.IntType(64))
    return types.int64(ptr), codegen


@intrinsic
def keep(typingctx, values):
    """Uses ``values`` (a tuple, e.g. of arrays) and emits nothing: placed after a call that reads
    arrays through raw pointers, it keeps them alive until the call returned (Numba frees an
    array right after its last use in a function)."""
    if not isinstance(values, types.BaseTuple):
        return None

    def codegen(context, builder, sig, llargs):
        return context.get_dummy_value()
    return types.none(values), codegen
