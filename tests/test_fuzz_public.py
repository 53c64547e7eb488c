"""Fuzzing the public surface with bad input (issue 20, point 8): hypothesis draws malformed
calls to ``kernels.fused_dense``, the losses and ``fit``; each must either return (when the call
is valid) or raise ``ValueError``/``TypeError`` with a message -- never another exception, a
crash or a hang. (The loaders' fuzz tests are in tests/test_loaders_strict.py; malformed kernel
calls that could crash a process are in tests/test_testing_bad_inputs.py.)"""
import datetime

import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from jaxnet import losses
from jaxnet.models import MLP
from jaxnet.train import TrainState, fit

FUZZ = settings(max_examples=25, deadline=datetime.timedelta(seconds=60), derandomize=True)
DTYPES = ("float32", "float16", "int32", "bool", "complex64", "float64")


def _refused_or_fine(call):
    """Runs ``call``; returns True if it raised ValueError/TypeError with a message, False if it
    returned. Any other exception fails the test."""
    try:
        call()
    except (ValueError, TypeError) as e:
        assert str(e).strip(), f"{type(e).__name__} without a message"
        assert len(str(e)) < 2000, f"a {len(str(e))}-character message"
        return True
    return False


shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
arrays = st.tuples(shapes, st.sampled_from(DTYPES)).map(lambda sd: np.ones(sd[0], sd[1]))


@pytest.mark.parametrize("backend", [b for b in ("xla", "numba") if b in kernels.available_backends()])
@FUZZ
@given(x=arrays, w=arrays, b=st.one_of(st.none(), arrays),
       activation=st.sampled_from(("relu", "gelu", "nope", "", None, 3)))
def test_fused_dense_refuses_malformed_calls_as_the_reference_does(backend, x, w, b, activation):
    ref_refused = _refused_or_fine(lambda: kernels.reference.fused_dense(x, w, b, activation=activation))
    got_refused = _refused_or_fine(lambda: kernels.fused_dense(x, w, b, activation=activation, backend=backend))
    assert got_refused == ref_refused, (x.shape, x.dtype, w.shape, w.dtype, None if b is None else b.shape, activation)


scalars = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3), st.none(), st.booleans(),
                    st.just("0.5"), st.just(np.float32(1.5)), st.just(np.array([0.1, 0.2])))
LOSSES = ("mse", "mae", "binary_cross_entropy", "cross_entropy", "distillation")


@FUZZ
@given(name=st.sampled_from(LOSSES), pred=arrays, target=arrays, reduction=st.sampled_from(("mean", "sum", "none", "avg")),
       extra=st.sampled_from(("weights", "mask", "label_smoothing", "temperature", None)), value=st.one_of(scalars, arrays))
def test_losses_return_or_refuse_with_a_message(name, pred, target, reduction, extra, value):
    kwargs = {"reduction": reduction}
    if extra == "label_smoothing" and name == "cross_entropy" or extra == "temperature" and name == "distillation":
        kwargs[extra] = value
    elif extra in ("weights", "mask"):
        kwargs[extra] = value
    fn = losses.get(name)
    _refused_or_fine(lambda: fn(pred, target, **kwargs))


X = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
Y = X[:, :1].copy()
STATE = TrainState.create(model=MLP((4, 1)), tx=optax.sgd(0.1), sample_x=X[:1], seed=0)
# Arguments fit checks, and values none of them accept (each fails before anything compiles).
INT_ARGS = ("epochs", "batch_size", "eval_every", "patience", "epochs_per_call", "log_every", "checkpoint_every",
            "keep", "accumulate")
BAD_INTS = (-1, -7, 1.5, float("nan"), "3", True, [2], 2 ** 70 * -1)


@FUZZ
@given(arg=st.sampled_from(INT_ARGS + ("l1", "l2")), bad=st.sampled_from(BAD_INTS + (float("inf"), -0.5)))
def test_fit_refuses_bad_scalar_arguments_by_name(arg, bad):
    if arg in ("l1", "l2") and isinstance(bad, (int, float)) and not isinstance(bad, bool) and bad >= 0 \
            and bad != float("inf"):
        return  # a valid penalty
    if arg not in ("l1", "l2") and bad == -0.5:
        bad = 0.25
    kwargs = {"loss_fn": losses.mse, "epochs": 1, "progress": False, arg: bad}
    if arg == "patience":
        kwargs["val_data"] = (X, Y)
    if arg in ("checkpoint_every", "keep"):
        kwargs["checkpoint_dir"] = "/nonexistent/never-written"
    with pytest.raises((ValueError, TypeError), match=arg):
        fit(STATE, (X, Y), **kwargs)
