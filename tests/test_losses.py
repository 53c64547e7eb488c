"""Losses against float64 NumPy references, their defining properties, gradients and bad input.

Tolerances are derived, not tuned: the losses compute in float32, where each rounding costs at
most EPS/2 relative. A sum of n non-negative terms is then good to about n·EPS relative; a
log-sum-exp over C classes of logits up to M in size is good to about (M + C)·EPS absolute
(the shift by the max and the exp/log each cost a few ulps of their operands). The factors of
4-8 below cover the few extra operations (divide by the count, weights) on top of those bounds.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.test_util import check_grads

from jaxnet import losses

EPS = float(np.finfo(np.float32).eps)


# --- float64 references -------------------------------------------------------------------------

def ref_reduce(per_example, reduction, weights=None, mask=None):
    """The module's reduction rule, in float64."""
    per_example = np.asarray(per_example, np.float64)
    w = np.ones_like(per_example)
    if weights is not None:
        w = w * np.asarray(weights, np.float64)
    if mask is not None:
        w = np.where(np.asarray(mask, bool), w, 0.0)
        per_example = np.where(np.asarray(mask, bool), per_example, 0.0)
    if reduction == "none":
        return w * per_example
    if reduction == "sum":
        return np.sum(w * per_example)
    return np.sum(w * per_example) / np.sum(w) if np.sum(w) != 0 else 0.0


def ref_mean_features(x):
    return x.mean(axis=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def ref_log_softmax(logits):
    x = np.asarray(logits, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def ref_cross_entropy(logits, probs):
    return -(np.asarray(probs, np.float64) * ref_log_softmax(logits)).sum(axis=-1)


def ref_bce(logits, targets):
    x, y = np.asarray(logits, np.float64), np.asarray(targets, np.float64)
    return np.logaddexp(0.0, x) - x * y  # softplus(x) - x·y, exact in float64 for |x| <= 1e4


def ref_sigmoid(x):
    return 0.5 * (1 + np.tanh(np.float64(x) / 2))  # no overflow for any x


def one_hot(labels, num_classes):
    return np.eye(num_classes, dtype=np.float32)[labels]


# --- strategies ---------------------------------------------------------------------------------

# Values on a 1/16 grid: differences are never subnormal, so "MSE > 0 unless equal" is exact.
grid_floats = st.integers(-1600, 1600).map(lambda k: k / 16)


@st.composite
def regression_pairs(draw):
    """Predictions and targets ``[B, *feature_shape]`` on the 1/16 grid, sometimes identical."""
    batch = draw(st.integers(1, 6))
    feature_shape = draw(st.sampled_from([(), (1,), (3,), (2, 3)]))
    shape = (batch, *feature_shape)
    predictions = draw(hnp.arrays(np.float32, shape, elements=grid_floats))
    if draw(st.booleans()):
        targets = predictions.copy()
    else:
        targets = draw(hnp.arrays(np.float32, shape, elements=grid_floats))
    return predictions, targets


@st.composite
def example_weighting(draw, batch):
    """Optional weights in [0, 4] and an optional mask, both ``[batch]``."""
    weights = draw(st.none() | hnp.arrays(np.float32, (batch,), elements=st.sampled_from([0.0, 0.5, 1.0, 4.0])))
    mask = draw(st.none() | hnp.arrays(np.bool_, (batch,)))
    return weights, mask


@st.composite
def classification_batch(draw, max_scale=1e4):
    """Logits ``[*lead, C]`` with magnitude up to a drawn scale (as large as 1e4), integer labels."""
    lead = draw(st.sampled_from([(1,), (4,), (2, 3)]))
    num_classes = draw(st.sampled_from([2, 5]))
    scale = draw(st.sampled_from([s for s in (1.0, 30.0, 1e4) if s <= max_scale]))
    unit = hnp.arrays(np.float32, (*lead, num_classes),
                      elements=st.floats(-1, 1, width=32, allow_subnormal=False))
    logits = draw(unit) * np.float32(scale)
    labels = draw(hnp.arrays(np.int32, lead, elements=st.integers(0, num_classes - 1)))
    return logits, labels, scale


def ce_atol(scale, num_classes, count=1):
    # log-sum-exp over C terms of size <= scale (see the module docstring), summed over `count`.
    return 8 * EPS * (scale + num_classes) * count


# --- elementwise losses -------------------------------------------------------------------------

@pytest.mark.parametrize("name,ref", [("mse", np.square), ("mae", np.abs)])
@given(data=regression_pairs())
def test_elementwise_losses_match_float64_reference(name, ref, data):
    predictions, targets = data
    fn = losses.get(name)
    ref_none = ref_mean_features(ref(predictions.astype(np.float64) - targets))
    n = predictions.size
    got_none = fn(predictions, targets, reduction="none")
    assert got_none.shape == (predictions.shape[0],)
    np.testing.assert_allclose(got_none, ref_none, rtol=4 * EPS * (n + 3), atol=0)
    np.testing.assert_allclose(fn(predictions, targets), ref_none.mean(), rtol=4 * EPS * (n + 3), atol=0)
    np.testing.assert_allclose(fn(predictions, targets, reduction="sum"), ref_none.sum(),
                               rtol=4 * EPS * (n + 3), atol=0)


@given(data=regression_pairs())
def test_mse_is_nonnegative_and_zero_only_at_equality(data):
    predictions, targets = data
    value = float(losses.mse(predictions, targets))
    assert value >= 0
    assert (value == 0) == np.array_equal(predictions, targets)
    per_example = np.asarray(losses.mse(predictions, targets, reduction="none"))
    rows_equal = (predictions == targets).reshape(len(predictions), -1).all(axis=1)
    np.testing.assert_array_equal(per_example == 0, rows_equal)


def test_mae_gradient_is_sign_and_zero_at_equality():
    predictions, targets = jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[0.0, 2.0, 5.0]])
    grad = jax.grad(losses.mae)(predictions, targets)
    np.testing.assert_allclose(grad, [[1 / 3, 0.0, -1 / 3]], rtol=EPS, atol=0)  # 1/3 rounded to float32


@pytest.mark.parametrize("x", [1e4, -1e4, 1e3, -1e3, 88.0, -104.0, 0.0])
@pytest.mark.parametrize("y", [0.0, 1.0, 0.5])
def test_bce_is_finite_and_exact_at_extreme_logits(x, y):
    logits, targets = np.full((2, 1), x, np.float32), np.full((2, 1), y, np.float32)
    value = losses.binary_cross_entropy(logits, targets, reduction="none")
    grad = jax.grad(lambda z: losses.binary_cross_entropy(z, targets))(logits)
    assert np.all(np.isfinite(value)) and np.all(np.isfinite(grad))
    # softplus(x) - x·y = |x|·(stuff) + log1p(exp(-|x|)): good to a few ulps of |x| + 1.
    np.testing.assert_allclose(value, ref_bce(logits, targets)[:, 0], rtol=0, atol=4 * EPS * (abs(x) + 1))
    # d/dx = sigmoid(x) - y, over a batch of 2 averaged.
    np.testing.assert_allclose(grad, (ref_sigmoid(x) - y) / 2, rtol=0, atol=4 * EPS)


@given(data=classification_batch(), soft=st.booleans())
def test_bce_matches_float64_reference(data, soft):
    logits, labels, scale = data
    targets = (labels % 2).astype(np.float32)
    if soft:
        targets = targets * 0.5 + 0.25
    logits = logits[..., 0] if logits.ndim > 1 else logits
    targets = targets.reshape(logits.shape)
    expect = ref_mean_features(ref_bce(logits, targets))
    got = losses.binary_cross_entropy(logits, targets, reduction="none")
    n = logits.size
    np.testing.assert_allclose(got, expect, rtol=4 * EPS * (n + 3), atol=4 * EPS * (scale + 1))


def test_bce_accepts_bool_and_integer_targets():
    logits = np.array([[2.0, -1.0], [0.5, 3.0]], np.float32)
    targets = np.array([[1, 0], [0, 1]])
    expect = losses.binary_cross_entropy(logits, targets.astype(np.float32))
    np.testing.assert_array_equal(losses.binary_cross_entropy(logits, targets), expect)
    np.testing.assert_array_equal(losses.binary_cross_entropy(logits, targets.astype(bool)), expect)


# --- categorical losses -------------------------------------------------------------------------

@given(data=classification_batch())
def test_cross_entropy_is_minus_log_softmax_at_the_label(data):
    logits, labels, scale = data
    num_classes = logits.shape[-1]
    expect = -np.take_along_axis(ref_log_softmax(logits), labels[..., None], axis=-1)[..., 0]
    got = losses.cross_entropy(logits, labels, reduction="none")
    assert got.shape == labels.shape and np.all(np.isfinite(got))
    np.testing.assert_allclose(got, expect, rtol=0, atol=ce_atol(scale, num_classes))
    np.testing.assert_allclose(losses.cross_entropy(logits, labels), expect.mean(),
                               rtol=4 * EPS * labels.size, atol=ce_atol(scale, num_classes))


@given(data=classification_batch(), shift=st.sampled_from([-1e3, -7.5, 0.0, 3.0, 1e3]))
def test_cross_entropy_is_invariant_to_shifting_logits(data, shift):
    logits, labels, scale = data
    shifted = logits + np.float32(shift)
    # float32 rounding of `logits + shift` itself moves each logit by up to EPS·(|logit| + |shift|).
    atol = ce_atol(scale + abs(shift), logits.shape[-1])
    np.testing.assert_allclose(losses.cross_entropy(shifted, labels, reduction="none"),
                               losses.cross_entropy(logits, labels, reduction="none"), rtol=0, atol=atol)


@given(data=classification_batch(), smoothing=st.sampled_from([0.0, 0.1, 0.5, 1.0]))
def test_integer_labels_equal_one_hot_probabilities(data, smoothing):
    logits, labels, scale = data
    num_classes = logits.shape[-1]
    by_label = losses.cross_entropy(logits, labels, label_smoothing=smoothing, reduction="none")
    by_probs = losses.cross_entropy(logits, one_hot(labels, num_classes), label_smoothing=smoothing,
                                    reduction="none")
    smoothed = (1 - smoothing) * one_hot(labels, num_classes).astype(np.float64) + smoothing / num_classes
    expect = ref_cross_entropy(logits, smoothed)
    np.testing.assert_allclose(by_label, by_probs, rtol=0, atol=ce_atol(scale, num_classes))
    np.testing.assert_allclose(by_label, expect, rtol=0, atol=ce_atol(scale, num_classes))


@given(data=classification_batch())
def test_label_smoothing_limits(data):
    logits, labels, scale = data
    num_classes = logits.shape[-1]
    plain = losses.cross_entropy(logits, labels, reduction="none")
    # ε = 0: (1 - 0)·nll - 0·mean is the same float operations' result as plain CE, bit for bit.
    np.testing.assert_array_equal(losses.cross_entropy(logits, labels, label_smoothing=0.0, reduction="none"),
                                  plain)
    uniform = np.full(logits.shape, 1.0 / num_classes, np.float32)
    np.testing.assert_allclose(losses.cross_entropy(logits, labels, label_smoothing=1.0, reduction="none"),
                               losses.cross_entropy(logits, uniform, reduction="none"),
                               rtol=0, atol=ce_atol(scale, num_classes))


@given(data=classification_batch(), temperature=st.sampled_from([0.5, 1.0, 4.0]))
def test_distillation_matches_float64_reference(data, temperature):
    student, _, scale = data
    teacher = np.roll(student, 1, axis=-1) * np.float32(0.5)
    p = np.exp(ref_log_softmax(teacher / temperature))
    expect = temperature**2 * (p * (ref_log_softmax(teacher / temperature)
                                    - ref_log_softmax(student / temperature))).sum(-1)
    got = losses.distillation(student, teacher, temperature=temperature, reduction="none")
    # Logits are divided by T before the log-sum-exp, so the error scales with (scale / T + C)·T².
    atol = 2 * ce_atol(scale / temperature, student.shape[-1]) * temperature**2
    np.testing.assert_allclose(got, expect, rtol=0, atol=atol)
    np.testing.assert_allclose(losses.distillation(student, student + 3.0, temperature=temperature),
                               0.0, atol=atol)


def test_distillation_sends_no_gradient_to_the_teacher():
    student = jnp.array([[1.0, -2.0, 0.5]])
    g = jax.grad(losses.distillation, argnums=1)(student, jnp.array([[0.0, 1.0, 2.0]]))
    np.testing.assert_array_equal(g, 0.0)


def test_traced_out_of_range_labels_give_nan_loss_and_nan_gradient():
    # Under jit the labels are tracers: no host check, so the loss *and* the gradient must show it
    # (a NaN loss with a zero gradient for the row would let training go on without the example).
    def totals(z, y, w):  # one total per reduction, (3,)
        return jnp.stack([jnp.sum(losses.cross_entropy(z, y, reduction=r, weights=w)) for r in losses.REDUCTIONS])

    values_and_grads = jax.jit(lambda z, y, w: (totals(z, y, w), jax.jacrev(totals)(z, y, w)))
    logits, labels = jnp.zeros((3, 4)), jnp.array([1, 4, -1])
    # A zero weight does not hide the bad label either: 0 · NaN is NaN, for the loss and the gradient.
    for weights in (jnp.ones(3), jnp.array([1.0, 0.0, 1.0])):
        values, grads = values_and_grads(logits, labels, weights)  # (3,), (3, 3, 4)
        assert np.all(np.isnan(values))
        assert np.all(np.isfinite(grads[:, 0])) and np.all(np.isnan(grads[:, 1:]))
    per_example = jax.jit(losses.cross_entropy, static_argnames="reduction")(logits, labels, reduction="none")
    assert np.isfinite(per_example[0]) and np.all(np.isnan(per_example[1:]))


def test_masked_out_of_range_labels_are_padding():
    logits = jnp.zeros((3, 4))
    labels = jnp.array([1, 4, -1])
    mask = jnp.array([True, False, False])
    # Concrete labels: the host check skips masked ones (no error).
    np.testing.assert_allclose(losses.cross_entropy(logits, labels, mask=mask), np.log(4), rtol=4 * EPS)
    # Traced labels: the NaN guard skips masked ones (finite loss, zero gradient for them).
    value, grad = jax.jit(jax.value_and_grad(losses.cross_entropy))(logits, labels, mask=mask)
    np.testing.assert_allclose(value, np.log(4), rtol=4 * EPS)
    assert np.all(np.isfinite(grad)) and np.all(grad[1:] == 0)


@pytest.mark.parametrize("labels,index,value", [
    (np.array([1, 4, -1]), "(1,)", "4"),
    (jnp.array([[0, 1, 2], [3, 0, -7]]), "(1, 2)", "-7"),
    ([0, 1, 2, 3, 99], "(4,)", "99"),
])
def test_concrete_out_of_range_labels_raise_naming_index_and_value(labels, index, value):
    logits = jnp.zeros((*np.shape(labels), 4))
    pattern = rf"cross_entropy: targets .*\[0, 4\).* index {re.escape(index)} = {value}(?:\s|$)"
    with pytest.raises(ValueError, match=pattern):
        losses.cross_entropy(logits, labels)
    # Concrete labels under grad (logits traced, labels not) are checked too.
    with pytest.raises(ValueError, match=pattern):
        jax.grad(losses.cross_entropy)(logits, labels)


@pytest.mark.parametrize("make", [np.float32, np.float16, jnp.float32, jnp.bfloat16, np.array, jnp.array])
@pytest.mark.parametrize("fn,name,bad", [
    ("cross_entropy", "label_smoothing", 1.5),
    ("cross_entropy", "label_smoothing", -0.25),
    ("distillation", "temperature", -2.0),
    ("distillation", "temperature", 0.0),
    ("distillation", "temperature", float("inf")),
])
def test_numpy_and_jax_scalars_get_the_python_number_checks(make, fn, name, bad):
    x = jnp.ones((3, 4))
    y = jnp.zeros(3, jnp.int32) if fn == "cross_entropy" else x
    with pytest.raises(ValueError, match=rf"{fn}: {name} must be .*, got {bad}(?:\s|$)"):
        losses.get(fn)(x, y, **{name: make(bad)})


def test_traced_scalar_arguments_are_used_unchecked():
    # Documented: a traced label_smoothing cannot be checked; in range it gives the eager result.
    logits, labels = jnp.array([[2.0, -1.0, 0.5]]), jnp.array([1])
    jitted = jax.jit(lambda e: losses.cross_entropy(logits, labels, label_smoothing=e))
    np.testing.assert_allclose(jitted(jnp.float32(0.25)), losses.cross_entropy(logits, labels, label_smoothing=0.25),
                               rtol=4 * EPS)
    with pytest.raises(TypeError, match="label_smoothing must be a real scalar"):
        losses.cross_entropy(logits, labels, label_smoothing=np.array([0.1, 0.2]))
    with pytest.raises(TypeError, match="temperature must be a real scalar"):
        losses.distillation(logits, logits, temperature="x" * 500)


_X = np.zeros((3, 2), np.float32)
_LABELS = np.zeros(3, np.int32)


@pytest.mark.parametrize("call,argument,index,value", [
    (lambda: losses.binary_cross_entropy(_X, np.array([[0, 1], [1, 1.5], [0, 0]])), "targets", "(1, 1)", "1.5"),
    (lambda: losses.binary_cross_entropy(_X, jnp.array([[0, 1], [1, 1], [-0.5, 0]])), "targets", "(2, 0)", "-0.5"),
    (lambda: losses.binary_cross_entropy(_X, np.array([[0, np.nan], [1, 1], [0, 0]])), "targets", "(0, 1)", "nan"),
    (lambda: losses.binary_cross_entropy(_X, np.array([[0, 1], [1, 2], [0, 0]], np.int32)), "targets", "(1, 1)", "2"),
    (lambda: losses.mse(_X, _X, weights=np.array([1.0, -1.0, 2.0])), "weights", "(1,)", "-1.0"),
    (lambda: losses.mae(_X, _X, weights=jnp.array([1.0, 1.0, jnp.nan])), "weights", "(2,)", "nan"),
    (lambda: losses.cross_entropy(_X, _LABELS, weights=np.array([np.inf])), "weights", "(0,)", "inf"),
    (lambda: losses.cross_entropy(_X, _LABELS, mask=np.array([1.0, 0.5, 0.0])), "mask", "(1,)", "0.5"),
    (lambda: losses.mse(_X, _X, mask=jnp.array([0, 1, 2])), "mask", "(2,)", "2"),
    (lambda: losses.distillation(_X, _X, mask=np.array([1.0, np.nan, 1.0])), "mask", "(1,)", "nan"),
])
def test_bad_concrete_values_raise_naming_argument_index_and_value(call, argument, index, value):
    with pytest.raises(ValueError, match=rf": {argument} must be .* index {re.escape(index)} = {value}(?:\s|$)") as e:
        call()
    assert len(str(e.value)) < 160


def test_masked_padding_targets_may_hold_anything():
    targets = np.array([[0.0, 1.0], [np.nan, 7.0], [0.5, 0.5]])
    mask = np.array([True, False, True])
    value = losses.binary_cross_entropy(_X, targets, mask=mask)
    np.testing.assert_allclose(value, np.log(2), rtol=4 * EPS)
    # A traced mask leaves the host unable to tell padding apart, so concrete targets pass too.
    jitted = jax.jit(lambda m: losses.binary_cross_entropy(_X, targets, mask=m))
    np.testing.assert_allclose(jitted(mask), np.log(2), rtol=4 * EPS)


def test_traced_values_are_not_checked_on_the_host():
    # Inside jit nothing host-side runs per step: bad traced values go through as given.
    jitted = jax.jit(lambda t, w: losses.binary_cross_entropy(_X, t, weights=w, reduction="sum"))
    value = jitted(jnp.full((3, 2), 1.5), jnp.array([1.0, -1.0, 1.0]))
    np.testing.assert_allclose(value, np.log(2), rtol=4 * EPS)  # (1 + (-1) + 1) · log 2, the 1.5 cancels


# --- reduction, weights and mask ----------------------------------------------------------------

@given(data=regression_pairs(), weighting=st.data())
def test_reductions_weights_and_mask_are_consistent(data, weighting):
    predictions, targets = data
    weights, mask = weighting.draw(example_weighting(len(predictions)), label="weights, mask")
    kw = dict(weights=weights, mask=mask)
    none = np.asarray(losses.mse(predictions, targets, reduction="none", **kw))
    total = float(losses.mse(predictions, targets, reduction="sum", **kw))
    mean = float(losses.mse(predictions, targets, reduction="mean", **kw))
    w = np.ones(len(predictions)) if weights is None else weights.astype(np.float64)
    total_weight = np.sum(np.where(mask, w, 0.0)) if mask is not None else np.sum(w)
    per_example = ref_mean_features(np.square(predictions.astype(np.float64) - targets))
    rtol = 8 * EPS * (predictions.size + 3)
    assert none.shape == (len(predictions),)
    np.testing.assert_allclose(none, ref_reduce(per_example, "none", weights, mask), rtol=rtol, atol=0)
    np.testing.assert_allclose(total, ref_reduce(per_example, "sum", weights, mask), rtol=rtol, atol=0)
    np.testing.assert_allclose(mean, ref_reduce(per_example, "mean", weights, mask), rtol=rtol, atol=0)
    np.testing.assert_allclose(total, mean * total_weight, rtol=rtol, atol=0)


@pytest.mark.parametrize("name", ["mse", "mae", "binary_cross_entropy", "cross_entropy", "distillation",
                                  "hidden_state_transfer"])
def test_all_masked_batch_gives_zero_and_zero_gradient(name):
    x = jnp.array([[0.5, -1.0], [2.0, 0.0]])
    y = {"cross_entropy": jnp.array([0, 1]), "distillation": x[::-1], "hidden_state_transfer": x[::-1]}.get(
        name, jnp.ones_like(x))
    fn = losses.get(name)
    value, grad = jax.value_and_grad(fn)(x, y, mask=jnp.zeros(2, bool))
    assert float(value) == 0.0
    np.testing.assert_array_equal(grad, 0.0)
    assert float(fn(x, y, weights=jnp.zeros(2))) == 0.0


def test_mask_zeroes_non_finite_padding():
    predictions = jnp.array([1.0, jnp.nan, jnp.inf])
    targets = jnp.array([0.0, 0.0, 0.0])
    mask = jnp.array([1, 0, 0])
    np.testing.assert_array_equal(losses.mse(predictions, targets, mask=mask, reduction="none"), [1.0, 0, 0])
    assert float(losses.mse(predictions, targets, mask=mask)) == 1.0


def test_sequence_mask_applies_per_token():
    logits = jnp.zeros((2, 3, 5))  # (B, T, C)
    labels = jnp.zeros((2, 3), jnp.int32)
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    per_token = losses.cross_entropy(logits, labels, mask=mask, reduction="none")
    assert per_token.shape == (2, 3)
    np.testing.assert_allclose(losses.cross_entropy(logits, labels, mask=mask), np.log(5), rtol=4 * EPS)
    np.testing.assert_allclose(losses.cross_entropy(logits, labels, mask=mask, reduction="sum"),
                               3 * np.log(5), rtol=4 * EPS)


def test_jit_matches_eager():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 3)).astype(np.float32)
    labels = np.array([0, 2, 1, 1])
    weights = np.array([1.0, 0.5, 2.0, 0.0], np.float32)
    jitted = jax.jit(losses.cross_entropy, static_argnames=("reduction",))
    for reduction in losses.REDUCTIONS:
        np.testing.assert_allclose(jitted(logits, labels, label_smoothing=0.1, reduction=reduction, weights=weights),
                                   losses.cross_entropy(logits, labels, label_smoothing=0.1, reduction=reduction,
                                                        weights=weights), rtol=4 * EPS, atol=4 * EPS)


def test_low_precision_inputs_compute_in_float32():
    logits = jnp.array([[3.0, -2.0, 0.25]], jnp.bfloat16)
    got = losses.cross_entropy(logits, jnp.array([1]))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, -ref_log_softmax(np.asarray(logits, np.float64))[0, 1], rtol=4 * EPS)


# --- gradients ----------------------------------------------------------------------------------

def _gradient_cases():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3))
    # mae's kink at 0: keep predictions and targets at least 0.1 apart.
    y = x + rng.choice([-1.0, 1.0], size=x.shape) * rng.uniform(0.1, 1.0, size=x.shape)
    labels = np.array([0, 2, 1, 2])
    probs = np.exp(ref_log_softmax(rng.normal(size=(4, 3))))
    weights, mask = np.array([1.0, 0.5, 2.0, 1.0]), np.array([True, True, False, True])
    return {
        "mse": (losses.mse, x, y, {}),
        "mae": (losses.mae, x, y, {}),
        "bce": (losses.binary_cross_entropy, x, (y > 0).astype(np.float64), {}),
        "ce_labels": (losses.cross_entropy, x, labels, {"label_smoothing": 0.1}),
        "ce_probs": (losses.cross_entropy, x, probs, {}),
        "distillation": (losses.distillation, x, y, {"temperature": 2.0}),
        "mse_weighted_masked": (losses.mse, x, y, {"weights": weights, "mask": mask}),
        "ce_weighted_masked": (losses.cross_entropy, x, labels, {"weights": weights, "mask": mask}),
    }


@pytest.mark.parametrize("case", list(_gradient_cases()))
def test_gradients_match_finite_differences(case):
    fn, x, y, kw = _gradient_cases()[case]
    # float64 so that finite differences resolve the second order too. Reverse mode (what
    # training uses) to second order; forward mode would double the compile time of this test.
    with jax.enable_x64(True):
        x64 = jnp.asarray(x, jnp.float64)
        y64 = jnp.asarray(y)
        kw64 = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
        check_grads(jax.jit(lambda p: fn(p, y64, **kw64)), (x64,), order=2, modes=["rev"])


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("call,error,fragment", [
    (lambda: losses.mse(jnp.ones((3, 1)), jnp.ones(3)), ValueError, "(3, 1)"),
    (lambda: losses.mae(jnp.ones(3), jnp.ones(4)), ValueError, "(4,)"),
    (lambda: losses.binary_cross_entropy(jnp.ones((2, 1)), jnp.ones(2)), ValueError, "(2, 1)"),
    (lambda: losses.mse(jnp.ones(3, jnp.int32), jnp.ones(3)), TypeError, "int32"),
    (lambda: losses.mse(jnp.ones(3), jnp.ones(3, jnp.complex64)), TypeError, "complex64"),
    (lambda: losses.cross_entropy(jnp.ones((3, 4)), jnp.ones(3, jnp.int32)[:2]), ValueError, "(2,)"),
    (lambda: losses.cross_entropy(jnp.ones((3, 4)), jnp.ones((3, 4), jnp.int32)), ValueError, "(3, 4)"),
    (lambda: losses.cross_entropy(jnp.ones((3, 4)), jnp.ones(3)), ValueError, "integer"),
    (lambda: losses.cross_entropy(jnp.ones((3, 4)), jnp.ones(3, bool)), TypeError, "bool"),
    (lambda: losses.cross_entropy(jnp.ones(()), jnp.ones((), jnp.int32)), ValueError, "class axis"),
    (lambda: losses.cross_entropy(jnp.ones((3, 4)), jnp.zeros(3, jnp.int32), label_smoothing=1.5),
     ValueError, "label_smoothing"),
    (lambda: losses.distillation(jnp.ones((3, 4)), jnp.ones((3, 5))), ValueError, "(3, 5)"),
    (lambda: losses.distillation(jnp.ones((3, 4)), jnp.ones((3, 4)), temperature=0.0), ValueError, "temperature"),
    (lambda: losses.mse(jnp.ones(3), jnp.ones(3), reduction="avg"), ValueError, "'avg'"),
    (lambda: losses.mse(jnp.ones((3, 2)), jnp.ones((3, 2)), weights=jnp.ones(2)), ValueError, "(2,)"),
    (lambda: losses.mse(jnp.ones(3), jnp.ones(3), mask=jnp.ones((3, 3))), ValueError, "(3, 3)"),
    (lambda: losses.get("hinge"), ValueError, "cross_entropy"),
])
def test_bad_input_raises_naming_the_problem(call, error, fragment):
    with pytest.raises(error, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_shape_errors_raise_under_jit_too():
    with pytest.raises(ValueError, match="same shape"):
        jax.jit(losses.mse)(jnp.ones((3, 1)), jnp.ones(3))


def test_get_returns_every_loss():
    for name in ("mse", "mae", "cross_entropy", "binary_cross_entropy", "distillation", "attention_transfer",
                 "hidden_state_transfer"):
        assert losses.get(name) is getattr(losses, name)
