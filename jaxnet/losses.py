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
  mask ``[B, T]`` applies per token). ``attention_transfer`` compares attention probabilities
  ``[..., H, S, L]`` per query: per-example shape ``[..., S]``; ``hidden_state_transfer`` compares
  hidden states ``[..., C]`` per position: per-example shape ``[...]``.

Losses compute in at least float32 (bfloat16/float16 inputs are upcast; float64 stays float64),
and are finite for logits as large as ±1e4. Shape and dtype errors raise eagerly with the shapes
named, also under ``jit`` (shapes and dtypes are static).

Values are checked where they are concrete: NumPy arrays, JAX arrays outside ``jit``, and Python,
NumPy or JAX scalars. Integer labels must lie in ``[0, C)``, binary targets in ``[0, 1]``,
``weights`` be finite and >= 0 (everywhere, masked or not), ``mask`` hold 0/1, ``label_smoothing``
lie in ``[0, 1]`` and ``temperature`` be finite and > 0; anything else raises ``ValueError`` naming
the argument, the first bad index and its value. Labels and targets of masked examples are not
checked (padding may hold anything). Inside ``jit``/``vmap`` the values are tracers and nothing is
checked on the host (so nothing runs per step): an invalid label then makes its example's loss
*and* gradient NaN, so training stops on it instead of skipping it; traced ``label_smoothing``,
``temperature``, ``weights``, ``mask`` and binary targets are used as given (check them before
``jit``). Targets are not checked against a traced mask either (which examples are padding is
unknown on the host).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import xlogy

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


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _concrete(x) -> np.ndarray | None:
    """``x`` as a NumPy array when its values are known now; None for a tracer (jit, vmap, grad)."""
    if isinstance(x, jax.core.Tracer) or not getattr(x, "is_fully_addressable", True):
        return None
    return np.asarray(x)


def _refuse_bad(fn: str, name: str, values: np.ndarray, bad: np.ndarray, expected: str) -> None:
    """Raises naming ``name``, how many entries are ``bad`` and the first one's index and value."""
    if bad.any():
        index = tuple(int(i) for i in np.unravel_index(np.argmax(bad), bad.shape))
        raise ValueError(f"{fn}: {name} must be {expected}; {int(bad.sum())} of {bad.size} are not, "
                         f"first at index {index} = {_short(values[index].item())}")


def _check_scalar(fn: str, name: str, value, ok: Callable[[float], bool], expected: str) -> None:
    """Checks a scalar argument given as a Python, NumPy or JAX number; a traced one only for shape."""
    x = value if isinstance(value, jax.core.Tracer) else np.asarray(value)
    if x.ndim != 0 or not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise TypeError(f"{fn}: {name} must be a real scalar, got {_short(value)}")
    if isinstance(x, np.ndarray) and not ok(float(x)):
        raise ValueError(f"{fn}: {name} must be {expected}, got {_short(x.item())}")


def _check_broadcast(fn: str, name: str, x_shape: tuple[int, ...], shape: tuple[int, ...]) -> None:
    try:
        grown = jnp.broadcast_shapes(x_shape, shape)
    except ValueError:
        grown = None
    if grown != shape:
        raise ValueError(f"{fn}: {name} of shape {x_shape} does not broadcast to the per-example loss shape {shape}")


def _check_weighting(fn: str, shape: tuple[int, ...], reduction: str, weights, mask) -> np.ndarray | None:
    """Checks ``reduction``, ``weights`` and ``mask`` against the per-example loss ``shape``.

    Dtypes and shapes always (static, so also under ``jit``); values where concrete: weights finite
    and >= 0, mask 0/1. Returns which examples count, NumPy bool ``shape`` (all without a mask), or
    None when the mask is traced.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {REDUCTIONS}, got {_short(reduction)}")
    host = {}
    for name, x in (("weights", weights), ("mask", mask)):
        if x is None:
            continue
        host[name] = _concrete(x)
        x = x if host[name] is None else host[name]
        _check_real(f"{fn}: {name}", x)
        _check_broadcast(fn, name, tuple(x.shape), shape)
    w, m = host.get("weights"), host.get("mask")
    if w is not None:
        _refuse_bad(fn, "weights", w, ~(np.isfinite(w) & (w >= 0)), "finite and >= 0")
    if mask is None:
        return np.ones(shape, bool)
    if m is None:
        return None
    _refuse_bad(fn, "mask", m, (m != 0) & (m != 1), "0/1 or bool")
    return np.broadcast_to(m != 0, shape)


def _check_targets(fn: str, name: str, targets, keep: np.ndarray | None,
                   ok: Callable[[np.ndarray], np.ndarray], expected: str) -> bool:
    """Refuses concrete ``targets`` ``[*keep.shape, ...]`` where ``ok`` is False, masked ones excepted.

    Returns whether they were checked (False when ``targets`` or the mask is traced).
    """
    values = None if keep is None else _concrete(targets)
    if values is None:
        return False
    bad = ~ok(values) & keep.reshape(keep.shape + (1,) * (values.ndim - keep.ndim))
    _refuse_bad(fn, name, values, bad, expected)
    return True


def _reduce(per_example: jax.Array, reduction: str, weights, mask, valid=None) -> jax.Array:
    """Applies the module's weighting/masking/reduction rule to ``per_example: [...]``.

    Arguments are checked beforehand by ``_check_weighting``. ``valid``: bool ``[...]`` or None;
    kept examples where it is False get a NaN loss and a NaN gradient.
    """
    shape = tuple(per_example.shape)
    w = jnp.ones(shape, per_example.dtype)
    if weights is not None:
        w = w * jnp.broadcast_to(jnp.asarray(weights), shape).astype(per_example.dtype)
    keep = None
    if mask is not None:
        keep = jnp.broadcast_to(jnp.asarray(mask), shape).astype(bool)
        w = jnp.where(keep, w, 0)
        # `where`, not a product: a masked example's loss may be inf/NaN (padding), 0 * inf is NaN.
        per_example = jnp.where(keep, per_example, 0)
    if valid is not None:
        # A product, not a `where`: a `where` gives NaN loss but a zero (finite) gradient, and
        # training would go on without the bad example. Masked examples stay exempt.
        bad = ~valid if keep is None else keep & ~valid
        per_example = per_example * jnp.where(bad, jnp.nan, 1).astype(per_example.dtype)
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
      weights: per-example weights broadcastable to ``[B]``, finite and >= 0, or None.
      mask: per-example bool/0-1 broadcastable to ``[B]``, or None.

    Raises:
      TypeError, ValueError: for bad shapes or dtypes, and for bad concrete values (see the module
        docstring), naming the argument, the first bad index and its value.

    Returns:
      A scalar, or ``[B]`` for ``reduction="none"``.
    """
    d = _difference("mse", predictions, targets)
    _check_weighting("mse", tuple(d.shape[:1]), reduction, weights, mask)
    return _reduce(_mean_over_features(jnp.square(d)), reduction, weights, mask)


def mae(predictions, targets, *, reduction: str = "mean", weights=None, mask=None) -> jax.Array:
    """Mean absolute error, ``mean(|predictions - targets|)`` per example.

    Same arguments and shapes as ``mse``. The gradient at exact equality is 0 (``sign(0)``).
    """
    d = _difference("mae", predictions, targets)
    _check_weighting("mae", tuple(d.shape[:1]), reduction, weights, mask)
    # d·sign(d) is |d| exactly, with gradient sign(d) and 0 at d = 0, where jnp.abs's would be 1.
    return _reduce(_mean_over_features(d * jnp.sign(d)), reduction, weights, mask)


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
      targets: ``[B, ...]`` in [0, 1] (bool, 0/1 integers or soft float targets), same shape;
        checked where concrete (NaN and values outside [0, 1] raise), except for masked examples.
      reduction, weights, mask: as ``mse`` (per-example shape ``[B]``).

    Returns:
      A scalar, or ``[B]`` for ``reduction="none"``.
    """
    given = targets
    logits, targets = jnp.asarray(logits), jnp.asarray(targets)
    _check_floating("binary_cross_entropy: logits", logits)
    _check_real("binary_cross_entropy: targets", targets)
    _check_same_shape("binary_cross_entropy", logits, targets)
    keep = _check_weighting("binary_cross_entropy", tuple(logits.shape[:1]), reduction, weights, mask)
    # NaN compares False both ways, so it is refused too.
    _check_targets("binary_cross_entropy", "targets", given, keep, lambda y: (y >= 0) & (y <= 1), "in [0, 1]")
    dtype = _compute_dtype(logits)
    x, y = logits.astype(dtype), targets.astype(dtype)
    elementwise = -(y * jax.nn.log_sigmoid(x) + (1 - y) * jax.nn.log_sigmoid(-x))
    return _reduce(_mean_over_features(elementwise), reduction, weights, mask)


# --- categorical losses -------------------------------------------------------------------------

def cross_entropy(logits, targets, *, label_smoothing: float = 0.0, reduction: str = "mean",
                  weights=None, mask=None) -> jax.Array:
    """Softmax cross-entropy ``-sum_c p_c log softmax(logits)_c``, per example.

    Targets are either integer class labels or probability vectors, told apart by dtype:

    - integer ``[...]`` (``logits.shape[:-1]``): class indices in ``[0, C)``. Concrete labels
      out of range raise ``ValueError`` with the first bad index and value; traced ones (under
      ``jit``) give that example a NaN loss *and* a NaN gradient, so training cannot go on past
      it. Masked examples may hold any label (e.g. -1 padding).
    - floating ``[..., C]`` (``logits.shape``): a distribution over classes per example (rows
      should sum to 1; not checked). Float labels of shape ``[...]`` are refused: cast them to int.

    Label smoothing mixes the target with the uniform distribution, ``(1 - ε) p + ε / C``:
    ε = 0 is plain cross-entropy, ε = 1 is cross-entropy against the uniform distribution.

    Args:
      logits: ``[..., C]`` floating, finite (±1e4 is fine: computed with ``log_softmax``).
      targets: integer ``[...]`` or floating ``[..., C]``, as above.
      label_smoothing: ε in [0, 1], a Python, NumPy or JAX scalar (a traced one is not checked).
      reduction, weights, mask: see the module docstring; per-example shape ``[...]``.

    Returns:
      A scalar, or ``[...]`` for ``reduction="none"``.
    """
    given = targets
    logits, targets = jnp.asarray(logits), jnp.asarray(targets)
    _check_floating("cross_entropy: logits", logits)
    if logits.ndim < 1:
        raise ValueError(f"cross_entropy: logits need a class axis [..., C], got shape {tuple(logits.shape)}")
    _check_scalar("cross_entropy", "label_smoothing", label_smoothing, lambda e: 0.0 <= e <= 1.0, "in [0, 1]")
    num_classes = logits.shape[-1]
    log_p = jax.nn.log_softmax(logits.astype(_compute_dtype(logits)), axis=-1)  # (..., C)
    if jnp.issubdtype(targets.dtype, jnp.integer):
        if targets.shape != logits.shape[:-1]:
            raise ValueError(
                f"cross_entropy: integer labels must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
                f"got {tuple(targets.shape)} (logits {tuple(logits.shape)}); "
                "for probability targets pass a float array of the logits' shape"
            )
        keep = _check_weighting("cross_entropy", tuple(targets.shape), reduction, weights, mask)
        checked = _check_targets("cross_entropy", "targets", given, keep,
                                 lambda t: (t >= 0) & (t < num_classes), f"class labels in [0, {num_classes})")
        # Labels checked on the host need no NaN guard (so eager calls do no extra work).
        in_range = None if checked else (targets >= 0) & (targets < num_classes)
        safe = jnp.clip(targets, 0, num_classes - 1)
        nll = -jnp.take_along_axis(log_p, safe[..., None], axis=-1)[..., 0]  # (...)
        # Smoothing by linearity: (1-ε)·(-log p_y) + ε·mean_c(-log p_c), no [..., C] target built.
        per_example = (1 - label_smoothing) * nll - label_smoothing * jnp.mean(log_p, axis=-1)
        return _reduce(per_example, reduction, weights, mask, valid=in_range)
    if jnp.issubdtype(targets.dtype, jnp.floating):
        if targets.shape != logits.shape:
            raise ValueError(
                f"cross_entropy: probability targets must have the logits' shape {tuple(logits.shape)}, "
                f"got {tuple(targets.shape)}; class labels must be an integer array of shape "
                f"{tuple(logits.shape[:-1])}"
            )
        _check_weighting("cross_entropy", tuple(logits.shape[:-1]), reduction, weights, mask)
        p = targets.astype(log_p.dtype)
        p = (1 - label_smoothing) * p + label_smoothing / num_classes
        return _reduce(-jnp.sum(p * log_p, axis=-1), reduction, weights, mask)
    raise TypeError(
        f"cross_entropy: targets must be integer labels or floating probabilities, got dtype "
        f"{targets.dtype} with shape {tuple(targets.shape)}"
    )


def _floating_pair(fn: str, names: tuple[str, str], a, b, min_ndim: int, layout: str):
    """``a`` and ``b`` as arrays, or an error naming both: floating, one shape of at least
    ``min_ndim`` axes (``layout``)."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    _check_floating(f"{fn}: {names[0]}", a)
    _check_floating(f"{fn}: {names[1]}", b)
    if a.shape != b.shape or a.ndim < min_ndim:
        raise ValueError(f"{fn}: {names[0]} {tuple(a.shape)} and {names[1]} {tuple(b.shape)} must have the same "
                         f"shape {layout}")
    return a, b


def distillation(student_logits, teacher_logits, *, temperature: float = 1.0, reduction: str = "mean",
                 weights=None, mask=None) -> jax.Array:
    """Knowledge-distillation loss ``T² · KL(softmax(teacher/T) || softmax(student/T))``, per example.

    The ``T²`` factor (Hinton et al., 2015) keeps the gradient's scale independent of T, so the
    loss can be mixed with a hard-label cross-entropy without retuning its weight. The teacher is
    a fixed target: no gradient flows into ``teacher_logits``.

    Args:
      student_logits: ``[..., C]`` floating.
      teacher_logits: ``[..., C]`` floating, same shape.
      temperature: T > 0 and finite, a Python, NumPy or JAX scalar (a traced one is not checked);
        larger T softens both distributions.
      reduction, weights, mask: see the module docstring; per-example shape ``[...]``.

    Returns:
      A scalar, or ``[...]`` for ``reduction="none"``. Zero when the two logits agree up to a
      per-example constant shift.
    """
    student_logits, teacher_logits = _floating_pair("distillation", ("student_logits", "teacher_logits"),
                                                    student_logits, teacher_logits, 1, "[..., C]")
    _check_scalar("distillation", "temperature", temperature, lambda t: 0 < t < float("inf"), "finite and > 0")
    _check_weighting("distillation", tuple(student_logits.shape[:-1]), reduction, weights, mask)
    dtype = _compute_dtype(student_logits)
    log_q = jax.nn.log_softmax(student_logits.astype(dtype) / temperature, axis=-1)
    log_p = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(dtype) / temperature, axis=-1)
    # exp(log_p) underflows to exactly 0 for far-off classes; both logs stay finite, so no 0·inf.
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return _reduce(temperature**2 * kl, reduction, weights, mask)


def attention_transfer(student_probs, teacher_probs, *, reduction: str = "mean", weights=None,
                       mask=None) -> jax.Array:
    """Attention distillation (MiniLM, Wang et al., 2020): ``KL(teacher || student)`` between two
    attention distributions over the keys, averaged over the heads, per query.

    Args:
      student_probs: ``[..., H, S, L]`` floating: per head, each query's probabilities over L keys
        (a softmax's output, e.g. what ``CausalSelfAttention`` sows).
      teacher_probs: the same shape (the same number of heads); a fixed target: no gradient flows
        into it. Keys it gives probability 0 (masked) add nothing.
      reduction, weights, mask: see the module docstring; per-example shape ``[..., S]`` (one
        example per query: per token for a language model).

    Returns:
      A scalar, or ``[..., S]`` for ``reduction="none"``. Zero when the distributions agree.
    """
    student_probs, teacher_probs = _floating_pair("attention_transfer", ("student_probs", "teacher_probs"),
                                                  student_probs, teacher_probs, 3, "[..., H, S, L] (as many heads)")
    per_example = student_probs.shape[:-3] + student_probs.shape[-2:-1]
    _check_weighting("attention_transfer", tuple(per_example), reduction, weights, mask)
    dtype = _compute_dtype(student_probs)
    p = jax.lax.stop_gradient(teacher_probs).astype(dtype)
    # The student's probabilities floored at the smallest normal: a key the teacher weighs and the
    # student's softmax underflowed on costs a large, finite term instead of inf.
    q = jnp.maximum(student_probs.astype(dtype), jnp.finfo(dtype).tiny)
    kl = jnp.sum(xlogy(p, p) - xlogy(p, q), axis=-1)  # [..., H, S]
    return _reduce(jnp.mean(kl, axis=-2), reduction, weights, mask)


def hidden_state_transfer(student_states, teacher_states, *, reduction: str = "mean", weights=None,
                          mask=None) -> jax.Array:
    """Hidden-state distillation (TinyBERT, Jiao et al., 2020), scale-free: per position, the squared
    distance of the student's state to the teacher's over the teacher's squared norm,
    ``|s - t|^2 / |t|^2``.

    Args:
      student_states: ``[..., C]`` floating, the student's states already in the teacher's width
        (e.g. through a learned projection: ``WithTeacher(..., hidden=True)``).
      teacher_states: the same shape; a fixed target: no gradient flows into it. Where it is all
        zeros (no scale to compare against) the position adds the plain squared distance ``|s|^2``.
      reduction, weights, mask: see the module docstring; per-example shape ``[...]`` (per token for
        a language model).

    Returns:
      A scalar, or ``[...]`` for ``reduction="none"``. Zero when the states agree, 1 when the student's are zero.
    """
    student_states, teacher_states = _floating_pair("hidden_state_transfer", ("student_states", "teacher_states"),
                                                    student_states, teacher_states, 1, "[..., C]")
    _check_weighting("hidden_state_transfer", tuple(student_states.shape[:-1]), reduction, weights, mask)
    dtype = _compute_dtype(student_states)
    t = jax.lax.stop_gradient(teacher_states).astype(dtype)
    distance = jnp.sum(jnp.square(student_states.astype(dtype) - t), axis=-1)
    norm = jnp.sum(jnp.square(t), axis=-1)
    return _reduce(distance / jnp.where(norm > 0, norm, 1.0), reduction, weights, mask)


# --- lookup by name -----------------------------------------------------------------------------

_LOSSES: dict[str, Callable[..., jax.Array]] = {
    "mse": mse,
    "mae": mae,
    "cross_entropy": cross_entropy,
    "binary_cross_entropy": binary_cross_entropy,
    "distillation": distillation,
    "attention_transfer": attention_transfer,
    "hidden_state_transfer": hidden_state_transfer,
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
