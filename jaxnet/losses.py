"""Loss functions: per-example losses with one shared reduction, weighting and masking rule.

Every loss here takes ``reduction``, ``weights`` and ``mask`` and treats them the same way:

- The loss first computes a *per-example* loss ``l`` (its shape is given by each function).
- ``weights`` (float) and ``mask`` (bool or 0/1) must broadcast to ``l.shape`` without growing it.
  The effective weight of an example is ``w = weights * mask`` (missing ones count as 1).
- ``reduction="none"`` returns ``w * l`` with shape ``l.shape`` (masked examples are exactly 0,
  even if their raw loss is not finite, so padding may hold any value);
  ``"sum"`` returns ``sum(w * l)``;
  ``"mean"`` returns ``sum(w * l) / sum(w)``: the weighted mean over the unmasked examples.
  A batch whose total weight is 0 (e.g. all masked) gives 0, not NaN, and a zero gradient.

So ``sum == mean * sum(w)`` always holds, and without weights or mask ``mean`` is the plain mean.

Two families differ in what "an example" is:

- *Elementwise* losses (``mse``, ``mae``, ``binary_cross_entropy``): predictions and targets have
  the same shape ``[B, ...]``; the per-example loss is the mean over every axis after the first,
  so it has shape ``[B]`` (a scalar for 0-d inputs).
- *Categorical* losses (``cross_entropy``, ``distillation``): logits ``[..., C]``; the per-example
  loss has shape ``[...]`` (every leading axis, e.g. ``[B, T]`` for a sequence model, so a padding
  mask ``[B, T]`` applies per token).

Losses compute in at least float32 (bfloat16/float16 inputs are upcast; float64 stays float64),
and are finite for logits as large as ±1e4. Shape and dtype errors raise eagerly with the shapes
named, also under ``jit`` (shapes and dtypes are static). Values cannot be checked under ``jit``:
see ``cross_entropy`` for what out-of-range labels do.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

REDUCTIONS = ("mean", "sum", "none")


# --- shared helpers -----------------------------------------------------------------------------

def _compute_dtype(x: jax.Array) -> jnp.dtype:
    """At least float32: low-precision logits lose too much in exp/log to accumulate in place."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _check_floating(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array, got dtype {x.dtype} with shape {tuple(x.shape)}")


def _check_real(name: str, x: jax.Array) -> None:
    # Integers and bools are fine as values (0/1 targets); complex or object arrays are not.
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)
            or x.dtype == jnp.bool_):
        raise TypeError(f"{name} must be a real numeric array, got dtype {x.dtype} with shape {tuple(x.shape)}")


def _check_same_shape(fn: str, predictions: jax.Array, targets: jax.Array) -> None:
    # No broadcasting: [B, 1] predictions against [B] targets would silently give a [B, B] loss.
    if predictions.shape != targets.shape:
        raise ValueError(
            f"{fn}: predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} must have "
            "the same shape (no broadcasting; reshape one of them)"
        )


def _mean_over_features(elementwise: jax.Array) -> jax.Array:
    """``[B, ...] -> [B]``: the per-example loss of an elementwise loss."""
    return jnp.mean(elementwise, axis=tuple(range(1, elementwise.ndim))) if elementwise.ndim > 1 else elementwise


def _broadcast_to_examples(name: str, fn: str, x, shape: tuple[int, ...]) -> jax.Array:
    x = jnp.asarray(x)
    try:
        grown = jnp.broadcast_shapes(x.shape, shape)
    except ValueError:
        grown = None
    if grown != shape:
        raise ValueError(
            f"{fn}: {name} of shape {tuple(x.shape)} does not broadcast to the per-example loss "
            f"shape {shape}"
        )
    return jnp.broadcast_to(x, shape)


def _reduce(fn: str, per_example: jax.Array, reduction: str, weights, mask) -> jax.Array:
    """Applies the module's weighting/masking/reduction rule to ``per_example: [...]``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    shape = tuple(per_example.shape)
    w = jnp.ones(shape, per_example.dtype)
    if weights is not None:
        weights = jnp.asarray(weights)
        _check_real(f"{fn}: weights", weights)
        w = w * _broadcast_to_examples("weights", fn, weights, shape).astype(per_example.dtype)
    if mask is not None:
        mask = jnp.asarray(mask)
        _check_real(f"{fn}: mask", mask)
        keep = _broadcast_to_examples("mask", fn, mask, shape).astype(bool)
        w = jnp.where(keep, w, 0)
        # `where`, not a product: a masked example's loss may be inf/NaN (padding), 0 * inf is NaN.
        per_example = jnp.where(keep, per_example, 0)
    weighted = w * per_example
    if reduction == "none":
        return weighted
    total = jnp.sum(weighted)
    if reduction == "sum":
        return total
    denom = jnp.sum(w)
    # Double `where` keeps the all-masked case at 0 with a zero (not NaN) gradient.
    nonzero = denom != 0
    return jnp.where(nonzero, total / jnp.where(nonzero, denom, 1), 0)


# --- elementwise losses -------------------------------------------------------------------------

def mse(predictions, targets, *, reduction: str = "mean", weights=None, mask=None) -> jax.Array:
    """Mean squared error, ``mean((predictions - targets)**2)`` per example.

    Args:
      predictions: ``[B, ...]`` floating.
      targets: ``[B, ...]`` real (same shape; cast to the compute dtype).
      reduction: "mean", "sum" or "none" (see the module docstring).
      weights: per-example weights broadcastable to ``[B]``, or None.
      mask: per-example bool/0-1 broadcastable to ``[B]``, or None.

    Returns:
      A scalar, or ``[B]`` for ``reduction="none"``.
    """
    d = _difference("mse", predictions, targets)
    return _reduce("mse", _mean_over_features(jnp.square(d)), reduction, weights, mask)


def mae(predictions, targets, *, reduction: str = "mean", weights=None, mask=None) -> jax.Array:
    """Mean absolute error, ``mean(|predictions - targets|)`` per example.

    Same arguments and shapes as ``mse``. The gradient at exact equality is 0 (``sign(0)``).
    """
    d = _difference("mae", predictions, targets)
    # d·sign(d) is |d| exactly, with gradient sign(d) and 0 at d = 0, where jnp.abs's would be 1.
    return _reduce("mae", _mean_over_features(d * jnp.sign(d)), reduction, weights, mask)


def _difference(fn: str, predictions, targets) -> jax.Array:
    predictions, targets = jnp.asarray(predictions), jnp.asarray(targets)
    _check_floating(f"{fn}: predictions", predictions)
    _check_real(f"{fn}: targets", targets)
    _check_same_shape(fn, predictions, targets)
    dtype = _compute_dtype(predictions)
    return predictions.astype(dtype) - targets.astype(dtype)


def binary_cross_entropy(logits, targets, *, reduction: str = "mean", weights=None, mask=None) -> jax.Array:
    """Binary cross-entropy from logits: ``-(y log σ(x) + (1 - y) log(1 - σ(x)))``, per example.

    Computed as ``-(y * log_sigmoid(x) + (1 - y) * log_sigmoid(-x))``, which never forms σ(x):
    finite (and exact to float rounding) for logits of any finite size, where ``log(sigmoid(x))``
    would give ``log(0) = -inf`` from |x| ≈ 90 in float32.

    Args:
      logits: ``[B, ...]`` floating, one logit per binary decision.
      targets: ``[B, ...]`` in [0, 1] (bool, 0/1 integers or soft float targets), same shape.
      reduction, weights, mask: as ``mse`` (per-example shape ``[B]``).

    Returns:
      A scalar, or ``[B]`` for ``reduction="none"``.
    """
    logits, targets = jnp.asarray(logits), jnp.asarray(targets)
    _check_floating("binary_cross_entropy: logits", logits)
    _check_real("binary_cross_entropy: targets", targets)
    _check_same_shape("binary_cross_entropy", logits, targets)
    dtype = _compute_dtype(logits)
    x, y = logits.astype(dtype), targets.astype(dtype)
    elementwise = -(y * jax.nn.log_sigmoid(x) + (1 - y) * jax.nn.log_sigmoid(-x))
    return _reduce("binary_cross_entropy", _mean_over_features(elementwise), reduction, weights, mask)


# --- categorical losses -------------------------------------------------------------------------

def cross_entropy(logits, targets, *, label_smoothing: float = 0.0, reduction: str = "mean",
                  weights=None, mask=None) -> jax.Array:
    """Softmax cross-entropy ``-sum_c p_c log softmax(logits)_c``, per example.

    Targets are either integer class labels or probability vectors, told apart by dtype:

    - integer ``[...]`` (``logits.shape[:-1]``): class indices in ``[0, C)``. Values cannot be
      checked under ``jit``; an out-of-range label gives a NaN loss for its example, so the error
      shows instead of passing silently. Masked examples may hold any label (e.g. -1 padding).
    - floating ``[..., C]`` (``logits.shape``): a distribution over classes per example (rows
      should sum to 1; not checked). Float labels of shape ``[...]`` are refused: cast them to int.

    Label smoothing mixes the target with the uniform distribution, ``(1 - ε) p + ε / C``:
    ε = 0 is plain cross-entropy, ε = 1 is cross-entropy against the uniform distribution.

    Args:
      logits: ``[..., C]`` floating, finite (±1e4 is fine: computed with ``log_softmax``).
      targets: integer ``[...]`` or floating ``[..., C]``, as above.
      label_smoothing: ε in [0, 1].
      reduction, weights, mask: see the module docstring; per-example shape ``[...]``.

    Returns:
      A scalar, or ``[...]`` for ``reduction="none"``.
    """
    logits, targets = jnp.asarray(logits), jnp.asarray(targets)
    _check_floating("cross_entropy: logits", logits)
    if logits.ndim < 1:
        raise ValueError(f"cross_entropy: logits need a class axis [..., C], got shape {tuple(logits.shape)}")
    if isinstance(label_smoothing, (int, float)) and not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    num_classes = logits.shape[-1]
    log_p = jax.nn.log_softmax(logits.astype(_compute_dtype(logits)), axis=-1)  # (..., C)
    if jnp.issubdtype(targets.dtype, jnp.integer):
        if targets.shape != logits.shape[:-1]:
            raise ValueError(
                f"cross_entropy: integer labels must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
                f"got {tuple(targets.shape)} (logits {tuple(logits.shape)}); "
                "for probability targets pass a float array of the logits' shape"
            )
        in_range = (targets >= 0) & (targets < num_classes)
        safe = jnp.clip(targets, 0, num_classes - 1)
        nll = -jnp.take_along_axis(log_p, safe[..., None], axis=-1)[..., 0]  # (...)
        # Smoothing by linearity: (1-ε)·(-log p_y) + ε·mean_c(-log p_c), no [..., C] target built.
        per_example = (1 - label_smoothing) * nll - label_smoothing * jnp.mean(log_p, axis=-1)
        per_example = jnp.where(in_range, per_example, jnp.nan)
    elif jnp.issubdtype(targets.dtype, jnp.floating):
        if targets.shape != logits.shape:
            raise ValueError(
                f"cross_entropy: probability targets must have the logits' shape {tuple(logits.shape)}, "
                f"got {tuple(targets.shape)}; class labels must be an integer array of shape "
                f"{tuple(logits.shape[:-1])}"
            )
        p = targets.astype(log_p.dtype)
        p = (1 - label_smoothing) * p + label_smoothing / num_classes
        per_example = -jnp.sum(p * log_p, axis=-1)
    else:
        raise TypeError(
            f"cross_entropy: targets must be integer labels or floating probabilities, got dtype "
            f"{targets.dtype} with shape {tuple(targets.shape)}"
        )
    return _reduce("cross_entropy", per_example, reduction, weights, mask)


def distillation(student_logits, teacher_logits, *, temperature: float = 1.0, reduction: str = "mean",
                 weights=None, mask=None) -> jax.Array:
    """Knowledge-distillation loss ``T² · KL(softmax(teacher/T) || softmax(student/T))``, per example.

    The ``T²`` factor (Hinton et al., 2015) keeps the gradient's scale independent of T, so the
    loss can be mixed with a hard-label cross-entropy without retuning its weight. The teacher is
    a fixed target: no gradient flows into ``teacher_logits``.

    Args:
      student_logits: ``[..., C]`` floating.
      teacher_logits: ``[..., C]`` floating, same shape.
      temperature: T > 0; larger T softens both distributions.
      reduction, weights, mask: see the module docstring; per-example shape ``[...]``.

    Returns:
      A scalar, or ``[...]`` for ``reduction="none"``. Zero when the two logits agree up to a
      per-example constant shift.
    """
    student_logits, teacher_logits = jnp.asarray(student_logits), jnp.asarray(teacher_logits)
    _check_floating("distillation: student_logits", student_logits)
    _check_floating("distillation: teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape or student_logits.ndim < 1:
        raise ValueError(
            f"distillation: student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape [..., C]"
        )
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"distillation: temperature must be > 0, got {temperature}")
    dtype = _compute_dtype(student_logits)
    log_q = jax.nn.log_softmax(student_logits.astype(dtype) / temperature, axis=-1)
    log_p = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(dtype) / temperature, axis=-1)
    # exp(log_p) underflows to exactly 0 for far-off classes; both logs stay finite, so no 0·inf.
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return _reduce("distillation", temperature**2 * kl, reduction, weights, mask)


# --- lookup by name -----------------------------------------------------------------------------

_LOSSES: dict[str, Callable[..., jax.Array]] = {
    "mse": mse,
    "mae": mae,
    "cross_entropy": cross_entropy,
    "binary_cross_entropy": binary_cross_entropy,
    "distillation": distillation,
}


def get(name: str) -> Callable[..., jax.Array]:
    """Returns the loss function called ``name`` (e.g. from a config string).

    Raises:
      ValueError: for an unknown name, listing the known ones.
    """
    try:
        return _LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(_LOSSES)}") from None
