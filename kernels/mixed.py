"""Dense layers and einsums on XLA with a custom VJP laid out for the CPU's fast path: mixed
precision (bfloat16/float16 operands, float32 accumulation, forward and backward), and float32
dense layers.

Used by ``jaxnet.nn.FusedDense`` (backend "xla", bfloat16/float16/float32 inputs) and the
transformer's attention and output matmuls; ``kernels.fused_dense(backend="xla")`` stays
``kernels.reference``.

Autodiff of ``dot(x_bf16, w_bf16, preferred_element_type=float32)`` hands the backward an f32
cotangent, so its two dots are f32 x bf16: XLA upcasts the bf16 side and they run at f32 speed
(on this AVX-512-BF16 CPU, ~2x slower than bf16 x bf16 -> f32). ``einsum`` here has a custom VJP
that rounds the cotangent once to the operands' dtype and runs the backward dots like the forward
one: low-precision operands, f32 accumulation, each gradient cast to its operand's dtype — what
PyTorch autocast and mixed-precision training in general do. The one extra rounding of ``dz`` is
inside the tolerance model's ``eps(out)`` term (``jaxnet.testing.tolerances``, "a possible rounding
of dz to out before the matmul").

Products of two bf16 (or f16) values are exact in f32 (8 + 8 <= 24 significant bits), so the
default dot precision with ``preferred_element_type=float32`` differs from the reference's
``Precision.HIGHEST`` only in summation order; on the CPU the two give bit-identical results (checked
on 4096x192 @ 192x768, 64x1000 @ 1000x64 and 4096x768 @ 768x192). ``kernels.reference`` is unchanged
(its autodiff is the plain one).

Float32 dense layers (``fused_dense``; ``FusedDense(backend="xla")`` with float32 inputs) take
the same custom VJP at ``Precision.HIGHEST``, for its layout, not its precision: XLA's autodiff of
the reference ran the weight gradients ``x.T @ dz`` on Eigen behind transposing copies (with
dropout's mask recomputed inside them), where this backward hands every dot to the CPU's fast
path in the layout it takes (``_einsum_f32``). The f32 TransformerLM step went from ~249 to
~190 ms (same-session A/B; HIGHEST and the default precision measured the same on the CPU and
HIGHEST keeps f32 semantics on GPUs). Float32 einsums (``einsum``: attention) stay plain
``jnp.einsum`` (no gain measured through the custom VJP), as do float64 operands (not measured).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels import activations

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
        raise ValueError(f"mixed.einsum: unsupported spec {spec!r} (two operands, every index shared, no '...')")
    return a, b, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_vjp(spec: str, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32, precision=_precision(a.dtype))


def _einsum_fwd(spec, a, b):
    return _einsum_vjp(spec, a, b), (a, b)


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
    if _swap_operands(batch + free_a + free_b, batch + free_b + free_a, list(so)):
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
    return jnp.transpose(out, [got.index(i) for i in so])


def _einsum_bwd(spec, res, g):
    a, b = res
    sa, sb, so = _parse(spec)
    # The one rounding of the cotangent (none for f32): both backward dots then run like the forward.
    g = g.astype(a.dtype)
    ga = _einsum_f32(so, sb, sa, g, b).astype(a.dtype)
    gb = _einsum_f32(so, sa, sb, g, a).astype(b.dtype)
    return ga, gb


_einsum_vjp.defvjp(_einsum_fwd, _einsum_bwd)


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
        raise TypeError(f"mixed.einsum: operands must share a dtype, got {a.dtype} and {b.dtype}")
    if is_low_precision(a.dtype):
        _parse(spec)
        return _einsum_vjp(spec, a, b)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.promote_types(a.dtype, jnp.float32))


def fused_dense(x, w, b=None, *, activation: str = "relu"):
    """``act(x @ w + b)``: the reference's forward; a backward whose dots run like the forward.

    ``x: [..., K]``, ``w: [K, N]``, ``b: [N]`` or None, one dtype of ``DENSE_DTYPES`` (bfloat16,
    float16: low-precision dots with f32 accumulation; float32: f32 dots at HIGHEST). The bias and
    activation run in float32 (so their derivatives do too); the result is cast to x's dtype.
    Arguments are assumed checked (``kernels.checks``).
    """
    act = activations.get(activation)
    lead = x.shape[:-1]
    if jnp.dtype(x.dtype) not in DENSE_DTYPES:
        raise TypeError(f"mixed.fused_dense: x dtype {x.dtype} is not one of {DENSE_DTYPES}")
    z = _einsum_vjp("mk,kn->mn", x.reshape(-1, x.shape[-1]), w)  # (M, N) float32
    if b is not None:
        z = z + b.astype(jnp.float32)
    return act(z).astype(x.dtype).reshape(*lead, w.shape[1])
