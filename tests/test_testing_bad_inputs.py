"""check_bad_inputs: malformed calls in a subprocess; only a Python exception passes."""
import numpy as np
import pytest

import kernels
from jaxnet.testing import BadCall, check_bad_inputs, default_bad_calls


@pytest.mark.parametrize("call", default_bad_calls(), ids=lambda c: c.name)
def test_the_reference_refuses_every_default_bad_call(call):
    with pytest.raises((TypeError, ValueError)):
        kernels.reference.fused_dense(*call.args, **call.kwargs)


def test_reference_passes_in_subprocesses():
    """A picklable callable (here a partial of the dispatcher) is imported by the worker."""
    import functools
    report = check_bad_inputs(functools.partial(kernels.fused_dense, backend="xla"))
    assert report.ok and report.passed == len(default_bad_calls()) and "backend='xla'" in report.candidate
    assert all(r.outcome == "raised" for r in report.results)


def test_silent_results_crashes_and_hangs_are_failures():
    """A crash or a hang costs a worker; the calls after it still run in a fresh one."""
    order = ("int_x", "b_rank2", "wrong_K", "unknown_activation")
    by_name = {c.name: c for c in default_bad_calls()}
    with pytest.raises(AssertionError) as info:
        check_bad_inputs("jaxnet.testing.mutants:unsafe_native", [by_name[n] for n in order], timeout=3)
    lines = str(info.value).splitlines()
    assert "0/4 refused with an exception" in lines[0]
    outcomes = {ln.split()[1]: ln.split()[2] for ln in lines[1:]}
    assert outcomes == {"int_x": "crashed", "b_rank2": "returned", "wrong_K": "hung", "unknown_activation": "returned"}
    assert "signal SIGSEGV" in lines[1] and "no answer within 3s" in lines[3]


def test_unimportable_candidate_is_an_error_not_a_pass():
    with pytest.raises(RuntimeError, match="worker failed to start"):
        check_bad_inputs("no_such_module_xyz:fn", default_bad_calls()[:1])
