"""assert_matches_reference: accepts correct kernels, rejects every mutant, explains why."""
import functools
import math
import re

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

import kernels
from jaxnet.testing import assert_matches_reference, mutants, verify
from jaxnet.testing.harness import compare

FEW = 8  # examples per search here; the "ci" profile (20) and "thorough" (400) are for kernels' own tests


def test_accepts_the_reference():
    report = assert_matches_reference(kernels.reference.fused_dense, kernels.reference.fused_dense, max_examples=FEW)
    assert report.ok and set(report.results) == {"forward", "jit", "vmap", "grad_x", "grad_w", "grad_b"}
    assert all(r.examples > 0 for r in report.results.values())


@pytest.mark.parametrize("name", sorted(mutants.CONTROLS))
def test_accepts_correct_kernels_written_differently(name):
    report = assert_matches_reference(mutants.CONTROLS[name], kernels.reference.fused_dense, max_examples=5)
    assert max(r.worst_ratio for r in report.results.values()) <= 1.0


def test_accepts_the_xla_backend():
    assert_matches_reference(functools.partial(kernels.fused_dense, backend="xla"), kernels.reference.fused_dense,
                             max_examples=4, check_vmap=False)


@pytest.mark.parametrize("backend", [b for b in kernels.available_backends() if b != "xla"])
def test_every_backend_goes_through_the_harness(backend):
    """The default run puts every registered backend through the harness on a few drawn calls
    (values, jit, vmap and the three gradients); the slow variant below draws the full profile."""
    assert_matches_reference(functools.partial(kernels.fused_dense, backend=backend), kernels.reference.fused_dense,
                             max_examples=6)


@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in kernels.available_backends() if b != "xla"])
def test_accepts_available_backend(backend):
    """Each backend's own tests run the harness too; here every registered one, ci profile."""
    assert_matches_reference(functools.partial(kernels.fused_dense, backend=backend), kernels.reference.fused_dense)


# Each mutant and the check that must catch it (it may be caught by others too).
EXPECTED = {
    "bias_wrong_axis": "forward",
    "relu_grad_at_zero": "grad_x",
    "tail_dropped": "forward",
    "low_precision_acc": "forward",
    "no_grad_b": "grad_b",
    "jit_only": "forward",
}


def test_every_mutant_has_an_expectation():
    assert set(EXPECTED) == set(mutants.MUTANTS)


@pytest.mark.parametrize("name", sorted(mutants.MUTANTS))
def test_rejects_mutant(name):
    only = {"activations": ("relu",)} if name == "relu_grad_at_zero" else {}  # it differs only there
    report = verify(mutants.MUTANTS[name], kernels.reference.fused_dense, shrink=0, keep_going=False, **only)
    assert not report.ok, f"the harness passed the broken kernel {name}"
    failed = {f.check for f in report.failures}
    assert EXPECTED[name] in failed or (name == "bias_wrong_axis" and "grad_b" in failed) or (name == "relu_grad_at_zero" and failed & {"grad_w", "grad_b"}), failed
    if name == "jit_only":
        assert failed == {"forward"}  # right under jit, vmap and grad: only the eager check sees it
    if name == "low_precision_acc":
        assert "float16[" in report.failures[0].call.describe()  # right in float32: found in bf16/f16


def test_relu_derivative_at_zero_is_checked_exactly():
    """Only exact-zero pre-activations tell ``z >= 0`` from the reference's convention."""
    report = verify(mutants.relu_grad_at_zero, activations=("relu",), check_vmap=False, shrink=0, keep_going=False)
    f = report.failures[0]
    assert f.check.startswith("grad_") and any(s in repr(f.call) for s in ("values='zeros'", "values='kink'", "probe_call"))


def test_failure_message_shows_the_smallest_counterexample():
    with pytest.raises(AssertionError) as info:
        assert_matches_reference(mutants.no_grad_b, kernels.reference.fused_dense, shrink=200)
    msg = str(info.value)
    assert "does NOT match" in msg and "check: grad_b" in msg
    # Shrunk to a handful of elements: every call with a bias fails, and the smallest ones have 1 to
    # 3 (x [1], w [1, 1], b [1] in the "ci" profile; K = 0 leaves x and w empty: a thorough seed
    # found x [1, 1, 0], w [0, 2], b [2]).
    (call,) = re.findall(r"call: +(.*)", msg)
    shapes = {name: [int(d) for d in dims.split(",") if d.strip()]
              for name, dims in re.findall(r"(\w+): float32\[([\d, ]*)\]", call)}
    assert set(shapes) == {"x", "w", "b"} and sum(math.prod(s) for s in shapes.values()) <= 3, call
    assert "make_fused_dense_call(" in msg and "worst element: grad_b[0] = 0" in msg and "> tol" in msg


def test_keep_going_gives_a_verdict_per_check():
    report = verify(mutants.jit_only, max_examples=4, shrink=0, keep_going=True)
    assert report.results["forward"].failure is not None
    assert all(r.failure is None and r.examples for c, r in report.results.items() if c != "forward")
    assert "forward" in report.format() and "FAIL" in report.format()


def test_a_check_out_of_tolerance_without_its_own_counterexample_is_not_reported_ok():
    """A run that stops at the first failure keeps one check's counterexample; another check seen
    out of tolerance on a different example (x @ w scaled: its forward fails where w != 0, its
    grad_w even where w = 0) is FAIL in the table and the text, not "ok"."""
    from jaxnet.testing.harness import CheckResult, Report
    from jaxnet.testing.report import format_table

    failure = verify(mutants.no_grad_b, max_examples=1, shrink=0, keep_going=False).failures[0]
    results = {"forward": CheckResult("forward", examples=40, worst_ratio=126.0),
               "jit": CheckResult("jit", examples=40, worst_ratio=0.5),
               "grad_w": CheckResult("grad_w", examples=12, worst_ratio=126.0, failure=failure)}
    report = Report("scaled", "matmul", results, 52, 1.0)
    assert [r.status for r in results.values()] == ["FAIL", "ok", "FAIL"] and not report.ok
    text = report.format()
    assert "forward: FAIL on some examples too (worst |err|/tol 126)" in text and "jit: ok on 40 examples" in text
    row = format_table([("scaled", report, None)]).splitlines()[1].split()
    assert row[1:3] == ["FAIL", "ok"], row


def test_a_candidate_that_raises_fails_the_check():
    def refuses_bf16(x, w, b=None, *, activation="relu"):
        if x.dtype == jnp.bfloat16:
            raise NotImplementedError("bfloat16 is not supported yet")
        return kernels.reference.fused_dense(x, w, b, activation=activation)

    report = verify(refuses_bf16, dtypes=("bfloat16",), max_examples=2, shrink=0, keep_going=False)
    assert "raised NotImplementedError: bfloat16 is not supported yet" in report.failures[0].message


def test_custom_argument_strategy():
    """Another kernel, another strategy: softplus against its reference, generic tolerance."""
    def reference(x):
        return jnp.logaddexp(x, 0.0)

    def candidate(x):  # the inner where, not minimum(x, 20): that one halves the gradient at x = 20 exactly
        return jnp.where(x > 20, x, jnp.log1p(jnp.exp(jnp.where(x > 20, 0.0, x))))

    arrays = st.lists(st.floats(-30, 30, width=32), min_size=8, max_size=8).map(  # one shape: one compile
        lambda v: ((np.asarray(v, np.float32),), {}))
    report = assert_matches_reference(candidate, reference, args=arrays, max_examples=FEW, tolerance=4)
    assert {"forward", "jit", "vmap", "grad_arg0"} <= set(report.results)
    with pytest.raises(AssertionError, match="check: forward"):
        assert_matches_reference(lambda x: jnp.log(1 + jnp.exp(x)) * 1.01, reference, args=arrays, max_examples=FEW,
                                 check_grads=False, check_vmap=False)


def test_compare_reports_shape_dtype_and_non_finite():
    e = np.ones((2, 3), np.float32)
    assert "shape" in compare("forward", np.ones((3, 2), np.float32), e, 1.0)[0]
    assert "dtype" in compare("forward", np.ones((2, 3), np.float16), e, 1.0)[0]
    got = e.copy()
    got[1, 2] = np.nan
    assert "non-finite where the reference is finite: forward[1, 2]" in compare("forward", got, e, 1.0)[0]
    ref = e.copy()
    ref[1, 2] = np.inf  # not compared where the reference itself overflowed
    assert compare("forward", got, ref, 1e-6)[0] is None


# --- the default run's strength: targeted probes, look-alikes -------------------------------

def test_probe_calls_cover_every_activation_and_dtype_on_an_exact_grid():
    from jaxnet.testing import strategies

    assert strategies.most_precise(("bfloat16", "float16", "float32")) == "float32"
    calls = strategies.probe_calls()
    assert {(c.kwargs["activation"], str(c.args[0].dtype)) for c in calls} == {
        (a, d) for a in strategies.ACTIVATIONS for d in strategies.DEFAULT_DTYPES}
    for call in calls:  # z = x @ w + b is the grid, exactly, in every dtype
        x, w, b = (np.asarray(a, np.float64) for a in call.args)
        assert w.shape == (1, 1) and w[0, 0] == 1 and b.shape == (1,) and b[0] != 0
        grid = x[:, 0] + b[0]
        assert np.array_equal(grid.astype(call.args[0].dtype).astype(np.float64), grid)
        assert grid.min() == -8 and grid.max() == 8 and 0.0 in grid and 1.0 in grid and -2.0 in grid
        assert np.all((np.abs(grid) >= 0.25) | (grid == 0))


@pytest.mark.parametrize("name", sorted(mutants.LOOKALIKE_MUTANTS))
def test_the_default_run_rejects_look_alike_activations(name):
    """An approximation of gelu or silu fails in values and gradients; the probes catch it when
    the search does not (the issue's gelu-as-tanh passed 20 random examples without them). The
    default run includes the probes: see the rewrite test below and test_cli_verify."""
    report = verify(mutants.LOOKALIKE_MUTANTS[name], check_jit=False, check_vmap=False, max_examples=1, shrink=0)
    failed = {f.check: f for f in report.failures}
    assert {"forward", "grad_x"} <= set(failed), report.format()
    if name.startswith("gelu"):
        assert repr(failed["forward"].call) == "probe_call('gelu', 'float32')"
    assert report.results["forward"].worst_ratio > 100  # the table's "worst" says how far out it is


def test_an_exactly_equal_rewrite_passes_the_probes():
    """tanh written as 2 sigmoid(2z) - 1: rounded differently, within tolerance on the probe grid."""
    report = assert_matches_reference(mutants.tanh_via_sigmoid, activations=("tanh",), max_examples=2)
    assert report.examples == 2 + 1 and max(r.worst_ratio for r in report.results.values()) <= 1.0


def test_python_runs_the_same_search_as_jaxnet_verify():
    """Without profile= or max_examples=, verify uses $JAXNET_HYPOTHESIS_PROFILE or "ci" -- what
    `jaxnet verify` uses -- whatever Hypothesis profile the caller has loaded."""
    from hypothesis import settings

    from jaxnet.testing import profiles

    calls = st.integers(0, 10**6).map(lambda i: ((np.full(2, i % 1000, np.float32),), {}))  # one shape
    settings.register_profile("jaxnet-test-other", max_examples=3)
    previous = settings.get_current_profile_name()
    settings.load_profile("jaxnet-test-other")
    try:
        report = verify(lambda x: x * 1, lambda x: x, args=calls, tolerance=1, check_vmap=False, check_grads=False)
    finally:
        settings.load_profile(previous)
    assert report.examples == profiles.get_profile().max_examples


def test_an_exit_or_a_non_array_result_is_a_failure_not_a_pass():
    import sys

    def exits(x, w, b=None, *, activation="relu"):
        sys.exit(0)

    def returns_list(x, w, b=None, *, activation="relu"):
        return [0.0]

    for fn, says in ((exits, "raised SystemExit"), (returns_list, "returned list, not an array")):
        report = verify(fn, dtypes=("float32",), activations=("relu",), check_vmap=False, check_grads=False,
                        max_examples=1, shrink=0)
        assert not report.ok and says in report.failures[0].message
