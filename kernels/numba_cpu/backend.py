"""The "numba" backend of ``kernels.fused_dense``: Numba kernels called from XLA through its FFI.

``fused_dense(x, w, b, activation)`` flattens x to ``[M, K]``, calls the forward handler with
``jax.ffi.ffi_call``; its derivatives come from ``kernels.autodiff``: a ``jax.custom_jvp`` whose
tangent is computed in ``jnp`` (forward mode) and transposes to the fused backward handler
(reverse mode, as fast as before).

dtypes: float32 and float64 run natively. bfloat16/float16 operands are upcast to float32
outside the kernel (the kernel accumulates in float32) and the result is cast back to x's dtype,
as the reference does. Mixed dtypes compute in the widest of them (at least float32).

vmap: each FFI call has a ``custom_vmap`` rule (``_batching``). A batch over x alone (w and b
unbatched) folds into M: one forward call on ``[B*M, K]`` and one backward call for dx, no copy
of w, nested vmaps included; dw and db, per element under vmap, come from XLA (``_backward_call``
says why). A batched b runs one call per element (``lax.map``), a batched w ``broadcast_all``.

Cache blocking and threads: each call carries the blocking of ``blocking()`` (``blocking.py``:
tuned on this machine, else derived from its caches) as attributes, read when the call is
traced; problems of at least its ``parallel_min_macs`` multiply-adds set the attribute ``share``
to 1, so that the kernel shares its blocks with XLA's intra-op thread pool; smaller ones run on
the calling thread only. The attributes are values, not addresses, so executables stay valid in
JAX's persistent compilation cache (see ``_handlers``).

Each (kernel, dtype, activation) handler is compiled (or loaded from Numba's cache) and
registered with XLA at its first use, not on ``import kernels``: a call compiles its own
activation's code only (``_handlers``).

Scratch memory: the kernels allocate their scratch (packed panels, transposes, ``g``) with
malloc on every call; with glibc's default thresholds a large layer's scratch comes from fresh
pages every call. The backend leaves malloc alone: entry points that care (benchmarks,
experiments) call ``jaxnet.runtime.keep_host_memory()`` themselves.

Forward mode and second derivatives (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``,
Hessian-vector products) work: the kernels give the values, and derivatives of the kernels'
own results (the forward's residuals, the backward's gradients) use the reference's arithmetic
in ``jnp`` (``_forward_reference``, ``_backward_reference``), not a kernel.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import threading

import jax
import jax.numpy as jnp
import numpy as np

from kernels.activations import ACTIVATIONS
from kernels.autodiff import linear_map, with_reference_jvp
from kernels.numba_cpu import _batching

_PREFIX = "jaxnet_numba_fused_dense"
# The blocking that ``use_blocking`` puts in force for the calls traced inside it.
_forced = contextvars.ContextVar("jaxnet_numba_blocking", default=None)
_lock = threading.Lock()
# Registered handlers (cfuncs) by (kind, dtype, activation), kept referenced for the life of the process: XLA holds only
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


def _target(kind: str, dtype: str, activation: str) -> str:
    """The FFI target name for ``kind`` ("forward"/"backward"), ``dtype`` and ``activation``,
    compiling and registering that handler on first use."""
    key = (kind, dtype, activation)
    name = f"{_PREFIX}_{kind}_{dtype}_{activation}"
    if key not in _REGISTERED:
        with _lock:
            if key not in _REGISTERED:
                from kernels.numba_cpu import _ffi, _handlers

                handler = _handlers.handler(kind, dtype, activation)
                _ffi.register(name, handler)
                _REGISTERED[key] = handler
    return name


def precompile(dtypes=("float32", "float64"), kinds=("forward", "backward"), activations=tuple(ACTIVATIONS)) -> None:
    """Compiles (or loads from Numba's cache) and registers the handlers of ``kinds`` x ``dtypes``
    x ``activations`` now rather than at their first call: e.g. to fill Numba's on-disk cache
    once before several processes start (the test suite does, see tests/conftest.py). Nothing
    else calls it.
    """
    for dtype in dtypes:
        for activation in activations:
            for kind in kinds:
                _target(kind, dtype, activation)


def _varying(a) -> frozenset:
    """The mesh axes ``a`` varies over inside ``jax.shard_map`` (empty elsewhere)."""
    mat = getattr(jax.typeof(a), "manual_axis_type", None)
    return frozenset() if mat is None else mat.varying


def _match_varying(*arrays):
    """Marks every array as varying over the union of the arrays' varying mesh axes.

    Inside ``shard_map`` the FFI call needs operands of one manual-axis type, and the backward
    pass then produces cotangents of that type; doing the cast here, outside the custom rules,
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


def blocking(dtype="float32"):
    """The ``blocking.Blocking`` that calls of ``dtype`` traced now carry: ``use_blocking``'s, else
    ``blocking.chosen(dtype)`` (tuned on this machine, or derived)."""
    from kernels.numba_cpu import blocking as _blocking

    return _forced.get() or _blocking.chosen(str(dtype))


@contextlib.contextmanager
def use_blocking(value):
    """Calls traced inside use the ``blocking.Blocking`` ``value`` (checked): tuning, tests."""
    token = _forced.set(value.validate())
    try:
        yield value
    finally:
        _forced.reset(token)


def _attributes(m, k, n, dtype):
    """The FFI call's attributes but ``act``: the blocking, and ``share``: 1 when the problem is
    big enough to share with XLA's thread pool, else 0."""
    blk = blocking(dtype)
    return {**blk.attributes(), "share": share_attribute(m, k, n, blk)}


def share_attribute(m, k, n, blk=None):
    """The ``share`` attribute for an [M, K] x [K, N] problem under the blocking ``blk`` (default:
    float32's in force): 1 from its ``parallel_min_macs`` multiply-adds on."""
    return np.int64(1 if m * k * n >= (blk or blocking()).parallel_min_macs else 0)


def int8_share_attribute(m, k, n):
    """The ``share`` attribute of an int8 kernel call (``quantized``): 1 from the machine model's
    threshold (``blocking.derive``) on, or from the tuned one where that is lower. The tuned
    threshold was timed on the float32 forward+backward step, one call at a time; above the
    model's it is that step's answer (or a slow spell's, which it keeps), and in a model's int8
    forward, where every layer but a small one shares, that layer's call alone keeping to the
    calling thread made the forward slower than sharing none (docs/benchmarks.md, session 31).
    A tuned "sharing won at no size timed" is the machine's answer and holds here too; a
    blocking put in force by ``use_blocking`` is used as it is."""
    from kernels.numba_cpu import blocking as _blocking

    blk = _forced.get()
    if blk is None:
        blk = blocking()
        if blk.parallel_min_macs <= _blocking.THRESHOLD_MAX_MACS:
            blk = blk.replace(parallel_min_macs=min(blk.parallel_min_macs, _derived_threshold()))
    return share_attribute(m, k, n, blk)


@functools.cache
def _derived_threshold() -> int:
    """``parallel_min_macs`` of the machine model (``blocking.derive``) for this machine."""
    from kernels.machine import describe
    from kernels.numba_cpu import blocking as _blocking

    return _blocking.derive(describe()).parallel_min_macs


def _forward(x2, w, b, activation, save):
    """FFI forward on ``x2: [M, K]``; returns ``(y, s)`` with ``s`` None unless ``save``: then
    ``s`` is z ``[M, N]``, or for relu its tie flag ``[1]`` (see ``_kernels``' module docstring)."""
    res = _forward_call(x2, w, *(() if b is None else (b,)), activation=activation, save=save)
    return res[0], (res[1] if save else None)


def _forward_call(x2, w, *b, activation, save):
    """The forward's results (a list) for operands ``(x2, w[, b])``. Under vmap with w and b
    unbatched, x's batch folds into M (one call); otherwise ``_batching.unfolded``."""
    m, n = x2.shape[0], w.shape[1]
    out = _result((m, n), x2)
    relu = activation == "relu"
    outs = (out, _result((1,), x2) if relu else out) if save else (out,)
    ffi = functools.partial(jax.ffi.ffi_call(_target("forward", x2.dtype.name, activation), outs,
                                             vmap_method="broadcast_all"),
                            act=np.int64(ACTIVATIONS[activation].code), **_attributes(m, x2.shape[1], n, x2.dtype))
    again = functools.partial(_forward_call, activation=activation, save=save)
    per_row = (True, not relu)[:len(outs)]  # relu's tie flag: one for the whole (folded) call

    def rule(axis_size, in_batched, *ops):
        if any(in_batched[1:]):
            return _batching.unfolded(ffi, again, 1, in_batched, ops)
        res = again(_batching.rows(ops[0], True, axis_size), *ops[1:])
        return ([_batching.unrows(a, axis_size, ops[0].shape[1]) if f else a for a, f in zip(res, per_row)],
                list(per_row))
    return _batching.call(ffi, (x2, w, *b), rule)


def _forward_reference(activation, save, x2, w, b):
    """``_forward`` in ``jnp``: its derivatives (relu's tie flag has none)."""
    z = jnp.matmul(x2, w, precision="highest") + (0 if b is None else b)
    y = ACTIVATIONS[activation].fn(z)
    if not save:
        return y, None
    return y, (jnp.any(z == 0).astype(z.dtype)[None] if activation == "relu" else z)


_forward_d = with_reference_jvp(lambda activation, save, x2, w, b: _forward(x2, w, b, activation, save),
                                _forward_reference, nondiff_argnums=(0, 1))


def _residuals(activation, x2, w, b):
    """``y`` and what the backward reads (a flat list of arrays; see ``_backward``)."""
    kind = ACTIVATIONS[activation].saves
    relu = activation == "relu"
    y, s = _forward_d(activation, kind == "z" or relu, x2, w, b)
    r = {"z": s, "y": y, "none": None}[kind]
    return y, [x2, w] + ([] if r is None else [r]) + ([s] if relu else []) + ([] if b is None else [b])


def _unpack(activation, has_bias, res):
    """``_residuals``' list back to ``(x2, w, r, ties, b)`` (None where absent)."""
    x2, w, *rest = res
    r = rest.pop(0) if ACTIVATIONS[activation].saves != "none" else None
    ties = rest.pop(0) if activation == "relu" else None
    return x2, w, r, ties, (rest.pop(0) if has_bias else None)


def _backward(activation, has_bias, *args):
    """The fused backward: ``args = (*residuals, dy)`` -> ``[dx, dw(, db)]``."""
    x2, w, r, ties, b = _unpack(activation, has_bias, args[:-1])
    dy = args[-1]
    operands = [dy, x2, w, dy if r is None else r]  # identity: dy stands in for r (not read)
    if activation == "relu":  # the tie flag, and b to recompute z when there were ties
        operands += [ties] + ([b] if has_bias else [])
    return _backward_call(*operands, activation=activation, has_bias=has_bias)


def _backward_reference(activation, has_bias, *args):
    """``_backward`` in ``jnp``: its derivatives (second order)."""
    x2, w, r, ties, b = _unpack(activation, has_bias, args[:-1])
    g = _dz(args[-1], x2, w, r, ties, b, activation=activation)  # (M, N)
    grads = [jnp.matmul(g, w.T, precision="highest"), jnp.matmul(x2.T, g, precision="highest")]
    return grads + ([g.sum(0)] if has_bias else [])


_backward_d = with_reference_jvp(_backward, _backward_reference, nondiff_argnums=(0, 1))


def _tangent(activation, has_bias, *args):
    """The forward-mode tangent ``act'(z) * (dx @ w + x @ dw + db)`` in ``jnp``; ``args`` are
    ``(*residuals, dx, dw(, db))``."""
    n_lin = 3 if has_bias else 2
    res, lin = args[:-n_lin], args[-n_lin:]
    x2, w, r, ties, b = _unpack(activation, has_bias, res)
    dz = jnp.matmul(lin[0], w, precision="highest") + jnp.matmul(x2, lin[1], precision="highest")
    if has_bias:
        dz = dz + lin[2]
    return [_dz(dz, x2, w, r, ties, b, activation=activation)]


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _dense(activation, x2, w, b):
    return _forward(x2, w, b, activation, save=False)[0]


@_dense.defjvp
def _dense_jvp(activation, primals, tangents):
    """Tangent in ``jnp`` (forward mode); its transpose is the fused backward (reverse mode)."""
    x2, w, b = primals
    has_bias = b is not None
    y, res = _residuals(activation, x2, w, b)
    lin = list(tangents[:2]) + ([tangents[2]] if has_bias else [])
    fun = functools.partial(_tangent, activation, has_bias)
    fun_t = functools.partial(_backward_d, activation, has_bias)
    return y, linear_map(fun, fun_t, res, lin, [jax.typeof(y)])[0]


def _backward_call(dy, x2, w, r, *rest, activation, has_bias):
    """The backward's results ``[dx, dw(, db)]`` for operands ``(dy, x2, w, r[, t[, b]])``.

    Under vmap with w (and relu's t and b) unbatched, dx folds into one call on the
    ``[B*M, ...]`` rows. dw and db are per element under vmap (``vmap(grad(...))`` returns them;
    for ``grad(vmap(...))`` JAX batches this backward and then sums them): they come from XLA,
    an ``einsum`` of x and ``g = dy * act'(z)``, which XLA fuses with that sum (M = 1) or drops
    when unused, where the kernel's per-element outputs would always be a ``[B, K, N]`` array.
    The folded call's own dw and db (sums over the batch) are discarded. Other batchings:
    ``_batching.unfolded``.
    """
    m, k, n = x2.shape[0], x2.shape[1], w.shape[1]
    outs = [_result((m, k), x2), _result((k, n), x2)] + ([_result((n,), x2)] if has_bias else [])
    ffi = functools.partial(jax.ffi.ffi_call(_target("backward", x2.dtype.name, activation), tuple(outs),
                                             vmap_method="broadcast_all"),
                            act=np.int64(ACTIVATIONS[activation].code), **_attributes(m, k, n, x2.dtype))
    again = functools.partial(_backward_call, activation=activation, has_bias=has_bias)

    def rule(axis_size, in_batched, *ops):
        if in_batched[2] or any(in_batched[4:]):  # w, relu's tie flag or b
            return _batching.unfolded(ffi, again, 2, in_batched, ops)
        dy, x, w, r, *rest = ops
        if not in_batched[0]:  # (B, M, N): the cotangent is per element from here on
            dy = jnp.broadcast_to(dy, (axis_size, *dy.shape))
        dx = again(_batching.rows(dy, True, axis_size), _batching.rows(x, in_batched[1], axis_size), w,
                   _batching.rows(r, in_batched[3], axis_size), *rest)[0]
        g = _dz(dy, x, w, r, *rest, activation=activation)  # (B, M, N)
        grads = [_batching.unrows(dx, axis_size, x.shape[-2]),
                 jnp.einsum("bmk,bmn->bkn" if in_batched[1] else "mk,bmn->bkn", x, g, precision="highest")]
        return grads + ([g.sum(1)] if has_bias else []), [True] * (len(grads) + has_bias)
    return _batching.call(ffi, (dy, x2, w, r, *rest), rule)


def _dz(dy, x, w, r, ties=None, b=None, *, activation):
    """``dy * act'(z)`` in XLA from the forward's residual r (z, y, or dy itself for identity).

    dy: ``[B, M, N]``, r: ``[B, M, N]`` or ``[M, N]``, x: ``[B, M, K]`` or ``[M, K]``; relu's
    tie flag ``ties: [1]`` and b only for relu, whose z is computed again when the forward met a
    z exactly 0 (relu'(0) = 1/2, as in ``_kernels``).
    """
    act = ACTIVATIONS[activation]
    if act.saves == "none":
        return dy
    if act.saves == "z":
        return dy * act.grad(r)
    if activation != "relu":
        return dy * act.grad_from_y(r)

    def z_again():
        z = jnp.matmul(x, w, precision="highest") + (0 if b is None else b)
        return jnp.broadcast_to(act.grad(z), dy.shape)
    return dy * jax.lax.cond(ties[0] != 0, z_again, lambda: jnp.broadcast_to(act.grad_from_y(r), dy.shape))


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
    y = _dense(activation, x2, w, b)
    return jnp.reshape(y, (*lead, n)).astype(x.dtype)
