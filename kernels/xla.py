"""The "xla" backend of ``kernels.fused_dense`` (the default of every model) and the einsums of
the transformer: XLA ops with custom derivative rules whose backward dots run like the forward
one (a ``custom_jvp`` whose tangent transposes to ``_einsum_bwd``, see ``kernels.autodiff``; so
forward mode and second derivatives work too).

- ``fused_dense``: the reference's forward (``act(x @ w + b)``, f32 accumulation, bias and
  activation in f32); its backward rounds the cotangent of ``x @ w`` once to the operands' dtype
  and runs both gradient dots as low-precision x low-precision -> f32 for bfloat16/float16 (what
  mixed-precision training does; autodiff of the reference would run them f32 x bf16, at f32
  speed), and at ``Precision.HIGHEST`` for float32, laid out for XLA's CPU fast path. That one
  extra rounding is inside the tolerance model's ``eps(out)`` term (``jaxnet.testing.tolerances``).
  Other dtypes (float64) and mixed-dtype calls run ``kernels.reference.fused_dense`` itself.
- ``einsum``: two-operand contractions accumulated in (at least) f32, with the same backward for
  bfloat16/float16 operands (attention scores and values, the tied output head).

Products of two bf16 (or f16) values are exact in f32 (8 + 8 <= 24 significant bits), so the
default dot precision with ``preferred_element_type=float32`` differs from the reference's
``Precision.HIGHEST`` only in summation order. The measurements behind each choice are in
docs/benchmarks.md ("Mixed precision").
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from kernels import activations, reference
from kernels.autodiff import linear_map
from kernels.dispatch import batched_models, register_backend

LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# dtypes whose dense layer runs through ``fused_dense``'s custom VJP.
DENSE_DTYPES = (*LOW_PRECISION, jnp.dtype(jnp.float32))


def is_low_precision(dtype) -> bool:
    return jnp.dtype(dtype) in LOW_PRECISION


def _precision(dtype):
    """HIGHEST for float32 operands (no TF32 or bf16 passes on GPUs); the default for bf16/f16,
    whose products are exact in the f32 accumulator anyway."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _parse(spec: str) -> tuple[str, str, str]:
    inputs, out = spec.replace(" ", "").split("->")
    a, b = inputs.split(",")
    if "." in spec or any(i not in b + out for i in a) or any(i not in a + out for i in b):
        # The transpose rule below (grad_a = einsum("out,b->a")) needs every index of one operand
        # to appear in the other or in the output; no ellipsis.
        raise ValueError(f"kernels.xla.einsum: unsupported spec {spec!r} (two operands, every index shared, no '...')")
    return a, b, out


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _einsum_lp(spec: str, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32, precision=_precision(a.dtype))


def _einsum_tangent(spec, a, b, da, db):
    """Forward mode: ``einsum(da, b) + einsum(a, db)``, dots like the forward's."""
    return [_einsum_lp(spec, da, b) + _einsum_lp(spec, a, db)]


@_einsum_lp.defjvp
def _einsum_jvp(spec, primals, tangents):
    """The tangent's transpose (reverse mode) is ``_einsum_bwd``, through ``kernels.autodiff.linear_map``."""
    a, b = primals
    y = _einsum_lp(spec, a, b)
    return y, linear_map(functools.partial(_einsum_tangent, spec), functools.partial(_einsum_bwd, spec),
                         (a, b), tangents, [jax.typeof(y)])[0]


def _transposed_copy(a, perm):
    """``jnp.transpose(a, perm)`` that reaches the dot as a row-major copy.

    XLA's CPU pipeline gives a plain transpose a permuted layout and, seeing a column-major
    operand, upcasts the dot to f32 before layout assignment (its "operand_upcaster" pass;
    ``optimization_barrier`` is expanded away before it). Transposing behind a leading unit axis
    and squeezing it off yields an operand in the default layout (checked on jax 0.10 by
    ``test_compiled_gradient_dots_take_bfloat16_operands``).
    """
    moved = jnp.transpose(a[None], (0, *(p + 1 for p in perm)))
    return jax.lax.squeeze(moved, (0,))


def _swap_operands(got: list, got_swapped: list, want: list) -> bool:
    """Whether a dot should take its operands the other way round to give the order ``want``.

    A transpose after the dot is either folded into its dimension numbers (the weight gradient
    ``x.T @ dz`` would become a dot contracting x's major axis, upcast to f32) or fused into the
    consumer, which then reads the result with a stride (the value gradient of attention came
    out as [B, H, D, T] for a [B, T, H, D] consumer). Best is no transpose; next best, one that
    keeps the minor axis, which moves contiguous rows.
    """
    if got == want:
        return False
    return got_swapped == want or (got[-1] != want[-1] and got_swapped[-1] == want[-1])


def _copy_bytes(sl: str, sr: str, so: str, left, right) -> int:
    """Bytes that ``_einsum_f32`` copies to run ``einsum(f"{sl},{sr}->{so}")`` with ``left`` as the
    dot's left operand, for a product without batch axes: ``left`` when its contracted axes are
    not its last (transposed to make them so), and the float32 result when it comes out in
    another order than ``so``. A weight gradient ``x.T @ dz`` [K, N] copies x [M, K] one way, dz
    [M, N] and the result the other: faster when K > N (docs/benchmarks.md, "Weight gradients:
    the smaller operand transposed")."""
    contracted = math.prod(int(left.shape[sl.index(i)]) for i in sl if i in sr)
    if contracted == 0:
        return 0
    lhs = [i for i in sl if i not in sr] + [i for i in sl if i in sr]
    out = [i for i in sl if i not in sr] + [i for i in sr if i not in sl]
    result_bytes = (left.size // contracted) * (right.size // contracted) * 4
    return (lhs != list(sl)) * left.size * left.dtype.itemsize + (out != list(so)) * result_bytes


def _einsum_f32(sa: str, sb: str, so: str, a, b):
    """``einsum(f"{sa},{sb}->{so}", a, b)`` in f32, with ``a``'s contracted axes made its last ones.

    XLA's CPU runtime sends a low-precision dot to its fast (YNNPACK) path only when the left
    operand contracts its minor axes and both operands are row-major; otherwise it upcasts the
    operands to f32 (weight gradients, ``x.T @ dz``) or, for batched dots, fails ("Unsupported
    element type for DotThunk"). The transpose is materialised (``_transposed_copy``); it is one
    pass over ``a``, small beside the dot.
    """
    batch = [i for i in sa if i in sb and i in so]
    free_a, free_b = [i for i in sa if i not in sb], [i for i in sb if i not in sa]
    # Not for float32 in a CPU sweep (``models_batched``): swapped, the dot takes the models' stacked
    # cotangent as [rows, models, n], a slower copy than unswapped (docs/benchmarks.md, "The weight
    # gradient's order in a sweep").
    # Low precision keeps the swap: XLA:CPU cannot run the batched bf16 dot of the other order.
    sweep_f32 = batched_models() and a.dtype == jnp.float32 and jax.default_backend() == "cpu"
    swap = not sweep_f32 and _swap_operands(batch + free_a + free_b, batch + free_b + free_a, list(so))
    # Without batch axes, the order that copies fewer bytes (``_copy_bytes``): a weight gradient
    # x.T @ dz [K, N] copies dz and the result instead of x when K > N.
    copy_out = False
    if not batch and not sweep_f32:
        kept, swapped = _copy_bytes(sa, sb, so, a, b), _copy_bytes(sb, sa, so, b, a)
        if kept != swapped:
            swap, copy_out = swapped < kept, True
    if swap:
        sa, sb, a, b = sb, sa, b, a
        free_a, free_b = free_b, free_a
    contracted = [i for i in sa if i in sb and i not in so]
    order_a = batch + free_a + contracted
    if list(sa) != order_a:
        a = _transposed_copy(a, [sa.index(i) for i in order_a])
    nb, nf = len(batch), len(free_a)
    dims = ((tuple(range(nb + nf, len(order_a))), tuple(sb.index(i) for i in contracted)),
            (tuple(range(nb)), tuple(sb.index(i) for i in batch)))
    out = jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32,
                              precision=_precision(a.dtype))  # (batch, free_a, free_b)
    got = batch + free_a + free_b
    if got == list(so):
        return out
    if copy_out:  # a plain transpose would be folded into the dot, back to the order not chosen
        return _transposed_copy(out, [got.index(i) for i in so])
    return jnp.transpose(out, [got.index(i) for i in so])


def _einsum_bwd(spec, a, b, g):
    """Reverse mode: ``[grad_a, grad_b]`` for the cotangent g of ``einsum(spec, a, b)``."""
    sa, sb, so = _parse(spec)
    # The one rounding of the cotangent (none for f32): both backward dots then run like the forward.
    g = g.astype(a.dtype)
    ga = _einsum_f32(so, sb, sa, g, b).astype(a.dtype)
    gb = _einsum_f32(so, sa, sb, g, a).astype(b.dtype)
    return [ga, gb]


def einsum(spec: str, a, b):
    """``jnp.einsum(spec, a, b)`` accumulated (and returned) in float32 at least.

    Args:
      spec: a two-operand spec such as ``"bshd,bthd->bhst"``; for low-precision operands every
        index must appear in the other operand or the output, and no ``...``.
      a, b: arrays of one dtype. bfloat16/float16 take the custom-VJP path (backward dots in that
        dtype with f32 accumulation, gradients in the operands' dtype).

    Returns:
      The contraction in ``promote(dtype, float32)``.
    """
    if a.dtype != b.dtype:
        raise TypeError(f"kernels.xla.einsum: operands must share a dtype, got {a.dtype} and {b.dtype}")
    if is_low_precision(a.dtype):
        _parse(spec)
        return _einsum_lp(spec, a, b)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.promote_types(a.dtype, jnp.float32))


def takes_custom_vjp(x, w, b=None) -> bool:
    """Whether ``fused_dense`` runs the custom VJP for these operands (one dtype of ``DENSE_DTYPES``)."""
    dtypes = {jnp.dtype(a.dtype) for a in (x, w, b) if a is not None}
    return len(dtypes) == 1 and dtypes <= set(DENSE_DTYPES)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _rounds_cotangent(z, dtype):
    """``z`` itself; in reverse mode its cotangent is rounded once to ``dtype``, before the bias
    gradient sums it and the weight-gradient dots take it (one rounding for both, and the f32
    cotangent is never written out: docs/benchmarks.md, "Mixed precision")."""
    return z


@_rounds_cotangent.defjvp
def _rounds_cotangent_jvp(dtype, primals, tangents):
    (z,), (dz,) = primals, tangents
    return z, linear_map(lambda t: [t], lambda g: [g.astype(dtype).astype(g.dtype)], (), [dz], [jax.typeof(z)])[0]


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _activate(name: str, z):
    """``act(z)`` whose derivative is the table's closed form ``act.grad(z)``, a map of z alone:
    reverse mode keeps z, where autodiff of ``act.fn`` kept each intermediate (gelu_tanh: seven
    [M, N] arrays, written out by the forward pass). XLA may still share a costly subexpression
    between the passes (gelu_tanh's tanh is computed once, in the forward)."""
    return activations.get(name)(z)


@_activate.defjvp
def _activate_jvp(name, primals, tangents):
    (z,), (dz,) = primals, tangents
    act = activations.get(name)

    def scaled(z, t):  # diagonal, so its own transpose
        return [act.grad(z) * t]
    return act(z), linear_map(scaled, scaled, [z], [dz], [jax.typeof(z)])[0]


def fused_dense(x, w, b=None, *, activation: str = "relu"):
    """``act(x @ w + b)``: the reference's forward; a backward whose dots run like the forward.

    ``x: [..., K]``, ``w: [K, N]``, ``b: [N]`` or None. Of one dtype of ``DENSE_DTYPES`` (bfloat16,
    float16: low-precision dots with f32 accumulation; float32: f32 dots at HIGHEST) they take the
    custom VJP; anything else runs ``kernels.reference.fused_dense``. The bias and activation run in
    float32 (so their derivatives do too, the activation's by its closed form, ``_activate``); the
    result is cast to x's dtype. Arguments are assumed checked (``kernels.checks``).
    """
    if not takes_custom_vjp(x, w, b):
        return reference.fused_dense(x, w, b, activation=activation)
    lead = x.shape[:-1]
    z = _einsum_lp("mk,kn->mn", x.reshape(math.prod(lead), x.shape[-1]), w)  # (M, N) float32; -1 fails at K=0
    if b is not None:
        z = z + b.astype(jnp.float32)
        if is_low_precision(x.dtype):
            z = _rounds_cotangent(z, x.dtype)
    y = z if activation == "identity" else _activate(activation, z)
    return y.astype(x.dtype).reshape(*lead, w.shape[1])


def _backend(x, w, b, activation):
    return fused_dense(x, w, b, activation=activation)


# Always there; "auto" takes it only when nothing faster is registered for the platform.
register_backend("xla", _backend, auto_rank={"cpu": 100, "gpu": 100, "tpu": 100})
