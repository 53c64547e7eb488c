"""The "numba" backend of ``kernels.fused_dense``: Numba kernels called from XLA through its FFI.

``fused_dense(x, w, b, activation)`` flattens x to ``[M, K]``, calls the forward handler with
``jax.ffi.ffi_call`` and wires gradients with ``jax.custom_vjp`` to the fused backward handler.

dtypes: float32 and float64 run natively. bfloat16/float16 operands are upcast to float32
outside the kernel (the kernel accumulates in float32) and the result is cast back to x's dtype,
as the reference does. Mixed dtypes compute in the widest of them (at least float32).

vmap: the FFI calls use ``vmap_method="broadcast_all"``: every operand gets the batch in front
(broadcast where it was unbatched) and the handlers loop over it.

Threads: problems of at least ``PARALLEL_MIN_MACS`` multiply-adds set the attribute ``share``
to 1, so that the kernel shares its blocks with XLA's intra-op thread pool; smaller ones run on
the calling thread only. The attribute is a flag, not an address, so executables stay valid in
JAX's persistent compilation cache (see ``_handlers``).

Each (kernel, dtype) handler is compiled (or loaded from Numba's cache) and registered with XLA
at its first use, not on ``import kernels``.

Scratch memory: the kernels allocate their scratch (packed panels, transposes, ``g``) with
malloc on every call; with glibc's default thresholds a large layer's scratch comes from fresh
pages every call. The backend leaves malloc alone: entry points that care (benchmarks,
experiments) call ``jaxnet.runtime.keep_host_memory()`` themselves.

Not supported: forward-mode autodiff (``jax.jvp``, ``jax.jacfwd``) and second derivatives
(``custom_vjp`` defines one reverse-mode rule whose kernels are not themselves differentiable).
"""
from __future__ import annotations

import functools
import math
import threading

import jax
import jax.numpy as jnp
import numpy as np

from kernels.activations import ACTIVATIONS

_PREFIX = "jaxnet_numba_fused_dense"
# Problems with fewer multiply-adds than this run on the calling thread: below it, handing
# blocks to XLA's thread pool costs more than the other cores save (docs/benchmarks.md).
PARALLEL_MIN_MACS = 1 << 19
_lock = threading.Lock()
# Registered handlers (cfuncs), kept referenced for the life of the process: XLA holds only
# their addresses.
_REGISTERED: dict[tuple[str, str], object] = {}


def is_available() -> bool:
    """True when Numba imports and JAX has a CPU backend."""
    try:
        import numba  # noqa: F401
        jax.devices("cpu")
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False
    return True


def _target(kind: str, dtype: str) -> str:
    """The FFI target name for ``kind`` ("forward"/"backward") and ``dtype``, compiling and
    registering that handler on first use."""
    name = f"{_PREFIX}_{kind}_{dtype}"
    if (kind, dtype) not in _REGISTERED:
        with _lock:
            if (kind, dtype) not in _REGISTERED:
                from kernels.numba_cpu import _ffi, _handlers

                handler = _handlers.handler(kind, dtype)
                _ffi.register(name, handler)
                _REGISTERED[(kind, dtype)] = handler
    return name


def precompile(dtypes=("float32", "float64"), kinds=("forward", "backward")) -> None:
    """Compiles (or loads from Numba's cache) and registers the handlers of ``kinds`` x ``dtypes``
    now rather than at their first call: e.g. to fill Numba's on-disk cache once before several
    processes start (the test suite does, see tests/conftest.py). Nothing else calls it.
    """
    for dtype in dtypes:
        for kind in kinds:
            _target(kind, dtype)


def _varying(a) -> frozenset:
    """The mesh axes ``a`` varies over inside ``jax.shard_map`` (empty elsewhere)."""
    mat = getattr(jax.typeof(a), "manual_axis_type", None)
    return frozenset() if mat is None else mat.varying


def _match_varying(*arrays):
    """Marks every array as varying over the union of the arrays' varying mesh axes.

    Inside ``shard_map`` the FFI call needs operands of one manual-axis type, and the backward
    pass then produces cotangents of that type; doing the cast here, outside ``custom_vjp``,
    lets JAX transpose it (a psum for an invariant ``w``).
    """
    vma = frozenset().union(*(_varying(a) for a in arrays if a is not None))
    if not vma:
        return arrays
    return tuple(a if a is None or _varying(a) == vma else
                 jax.lax.pcast(a, tuple(sorted(vma - _varying(a))), to="varying") for a in arrays)


def _result(shape, like):
    """Result type of an FFI call: ``shape`` in ``like``'s dtype and manual-axis type."""
    if not _varying(like):
        return jax.ShapeDtypeStruct(shape, like.dtype)
    # Inside shard_map: like's type (manual mesh, varying axes) with no sharded dims of its own.
    aval = jax.typeof(like)
    return aval.update(shape=shape, sharding=aval.sharding.update(spec=jax.P(*([None] * len(shape)))))


def _share(m, k, n):
    """The ``share`` attribute: 1 when the problem is big enough to share with XLA's thread
    pool, else 0."""
    return np.int64(1 if m * k * n >= PARALLEL_MIN_MACS else 0)


def _forward(x2, w, b, activation, save):
    """FFI forward on ``x2: [M, K]``; returns ``(y, s)`` with ``s`` None unless ``save``: then
    ``s`` is z ``[M, N]``, or for relu its tie flag ``[1]`` (see ``_kernels``' module docstring)."""
    m, n = x2.shape[0], w.shape[1]
    out = _result((m, n), x2)
    saved = _result((1,), x2) if activation == "relu" else out
    call = jax.ffi.ffi_call(_target("forward", x2.dtype.name), (out, saved) if save else (out,),
                            vmap_method="broadcast_all")
    operands = (x2, w) if b is None else (x2, w, b)
    res = call(*operands, act=np.int64(ACTIVATIONS[activation].code), share=_share(m, x2.shape[1], n))
    return res[0], (res[1] if save else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dense(x2, w, b, activation):
    return _forward(x2, w, b, activation, save=False)[0]


def _dense_fwd(x2, w, b, activation):
    kind = ACTIVATIONS[activation].saves
    relu = activation == "relu"
    y, s = _forward(x2, w, b, activation, save=kind == "z" or relu)
    r = {"z": s, "y": y, "none": None}[kind]
    # b: whether there is one (None: no leaves), and for relu the operand of z's recomputation.
    return y, (x2, w, r, s if relu else None, b)


def _dense_bwd(activation, res, dy):
    x2, w, r, ties, b = res
    has_bias = b is not None
    m, k, n = x2.shape[0], x2.shape[1], w.shape[1]
    outs = [_result((m, k), x2), _result((k, n), x2)]
    if has_bias:
        outs.append(_result((n,), x2))
    call = jax.ffi.ffi_call(_target("backward", x2.dtype.name), tuple(outs), vmap_method="broadcast_all")
    # Identity needs no residual; dy stands in (the kernel does not read it as one).
    operands = [dy, x2, w, dy if r is None else r]
    if activation == "relu":  # y's tie flag, and b to recompute z when there were ties
        operands += [ties] + ([b] if has_bias else [])
    grads = call(*operands, act=np.int64(ACTIVATIONS[activation].code), share=_share(m, k, n))
    return grads[0], grads[1], (grads[2] if has_bias else None)


_dense.defvjp(_dense_fwd, _dense_bwd)


def fused_dense(x, w, b, activation):
    """``act(x @ w + b)`` on the Numba kernels; arguments already checked by ``kernels.dispatch``.

    Args:
      x: ``[..., K]`` float array.
      w: ``[K, N]``.
      b: ``[N]`` or None.
      activation: a name from ``kernels.activations.ACTIVATIONS``.

    Returns:
      ``[..., N]`` in x's dtype.
    """
    dtypes = [x.dtype, w.dtype] + ([] if b is None else [b.dtype])
    compute = jnp.float64 if any(jnp.dtype(d) == jnp.float64 for d in dtypes) else jnp.float32
    lead, k, n = x.shape[:-1], x.shape[-1], w.shape[1]
    x2 = jnp.reshape(x, (math.prod(lead), k)).astype(compute)  # (M, K)
    x2, w, b = _match_varying(x2, w.astype(compute), None if b is None else b.astype(compute))
    y = _dense(x2, w, b, activation)
    return jnp.reshape(y, (*lead, n)).astype(x.dtype)
