"""How a fused kernel meets every JAX transformation: forward mode, reverse mode, both, and vmap.

``jax.custom_vjp`` keeps the fused backward kernel for ``jax.grad`` but refuses ``jax.jvp``;
``jax.custom_jvp`` allows both, but ``jax.grad`` then transposes the JVP rule's own arithmetic, so
the fused backward would never run. The backends therefore define the op as a ``custom_jvp``
(``fused_op``) whose tangent is a ``linear_map``: a primitive that evaluates a plain ``jnp``
tangent (forward mode) and whose transpose is the fused backward kernel (reverse mode).

- ``linear_map(fun, fun_t, res, lin, out_avals)``: ``fun(*res, *lin)``, linear in ``lin``, with
  ``fun_t(*res, *cts)`` as its transpose. Unlike ``jax.custom_derivatives.linear_call`` it has a
  batching rule (``vmap`` of both functions, cotangents of unbatched inputs summed) and a JVP in
  ``res`` (``jax.jvp`` of ``fun``), which ``jax.jacfwd``, ``jax.hessian`` and Hessian-vector
  products need.
- ``with_reference_jvp(fused, reference)``: runs ``fused`` (a kernel with no derivative of its
  own), differentiates through ``reference`` (the same function in ``jnp``). The kernels' forward
  and backward calls are wrapped in it, so second derivatives use the reference's arithmetic.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

_linear_map_p = Primitive("jaxnet_linear_map")
_linear_map_p.multiple_results = True


def linear_map(fun: Callable, fun_t: Callable, res: Sequence, lin: Sequence, out_avals: Sequence) -> list:
    """``fun(*res, *lin)`` (a list), linear in ``lin``, transposed by ``fun_t(*res, *cts)``.

    ``out_avals``: the results' avals (``jax.typeof`` of arrays of the same shape, dtype and
    mesh-axis variance). ``fun_t`` returns one cotangent per ``lin`` entry, of its aval. Both must
    be differentiable in ``res`` (plain ``jnp``, or wrapped in ``with_reference_jvp``).
    """
    return _linear_map_p.bind(*res, *lin, fun=fun, fun_t=fun_t, num_res=len(res), out_avals=tuple(out_avals))


def _impl(*args, fun, fun_t, num_res, out_avals):
    del fun_t, out_avals
    return list(fun(*args[:num_res], *args[num_res:]))


def _jvp(primals, tangents, *, fun, fun_t, num_res, out_avals):
    res, lin = primals[:num_res], primals[num_res:]
    d_res, d_lin = tangents[:num_res], tangents[num_res:]
    out = linear_map(fun, fun_t, res, lin, out_avals)
    # Linear in lin: the same map on lin's tangents; plus, if the residuals move, fun's own JVP in them.
    t_out = linear_map(fun, fun_t, res, [ad.instantiate_zeros(t) for t in d_lin], out_avals)
    if not all(type(t) is ad.Zero for t in d_res):
        d_res = [ad.instantiate_zeros(t) for t in d_res]
        moved = jax.jvp(lambda *r: list(fun(*r, *lin)), list(res), d_res)[1]
        t_out = [a + b for a, b in zip(t_out, moved)]
    return out, t_out


def _transpose(cts, *args, fun, fun_t, num_res, out_avals):
    res, lin = args[:num_res], args[num_res:]
    if any(ad.is_undefined_primal(r) for r in res):
        raise NotImplementedError("kernels.autodiff.linear_map: transposed in a residual; it is linear only in lin")
    cts = [ad.instantiate_zeros(c) if type(c) is ad.Zero else c for c in cts]
    lin_avals = [a.aval if ad.is_undefined_primal(a) else jax.typeof(a) for a in lin]
    return [None] * num_res + linear_map(fun_t, fun, res, cts, lin_avals)


def _batched_aval(aval, size: int):
    """``aval`` with a leading batch axis of ``size`` (unsharded, same mesh-axis variance)."""
    shape = (size, *aval.shape)
    return aval.update(shape=shape, sharding=aval.sharding.update(spec=jax.P(*([None] * len(shape)))))


def _sum_unbatched(fun_t, res_axes, lin_axes, *args):
    """The transpose of ``vmap(fun)``: ``vmap(fun_t)``, with the cotangent of a ``lin`` entry
    that was not batched (broadcast over the batch) summed over it."""
    cts = jax.vmap(lambda *a: list(fun_t(*a)), in_axes=(*res_axes, *([0] * (len(args) - len(res_axes)))))(*args)
    return [c if axis == 0 else c.sum(0) for c, axis in zip(cts, lin_axes)]


def _batch(args, dims, *, fun, fun_t, num_res, out_avals):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    args = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
    axes = tuple(None if d is None else 0 for d in dims)
    res_axes, lin_axes = axes[:num_res], axes[num_res:]
    fun_b = jax.vmap(lambda *a: list(fun(*a)), in_axes=axes, out_axes=0)
    fun_t_b = functools.partial(_sum_unbatched, fun_t, res_axes, lin_axes)
    out = linear_map(fun_b, fun_t_b, args[:num_res], args[num_res:], [_batched_aval(a, size) for a in out_avals])
    return out, [0] * len(out)


_linear_map_p.def_impl(_impl)
_linear_map_p.def_abstract_eval(lambda *_, out_avals, **__: list(out_avals))
ad.primitive_jvps[_linear_map_p] = _jvp
ad.primitive_transposes[_linear_map_p] = _transpose
batching.primitive_batchers[_linear_map_p] = _batch
mlir.register_lowering(_linear_map_p, mlir.lower_fun(_impl, multiple_results=True))


def with_reference_jvp(fused: Callable, reference: Callable, nondiff_argnums: tuple[int, ...] = ()) -> Callable:
    """``fused`` for values, ``reference`` (same signature and results, in ``jnp``) for derivatives."""
    fn = jax.custom_jvp(fused, nondiff_argnums=nondiff_argnums)

    def rule(*args):
        *static, primals, tangents = args
        return fn(*static, *primals), jax.jvp(functools.partial(reference, *static), primals, tangents)[1]
    fn.defjvp(rule)
    return fn
