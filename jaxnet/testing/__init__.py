"""Property-test verification for kernels: strategies, a tolerance model and a harness.

Verify a fused-dense kernel of your own in one call::

    from jaxnet.testing import assert_matches_reference
    import kernels

    assert_matches_reference(my_fused_dense, kernels.reference.fused_dense)

See docs/verifying-kernels.md. Public names:

- ``assert_matches_reference`` / ``verify``: hunt for a counterexample (raise / return a report).
- ``check_bad_inputs``: malformed calls, each in a subprocess, must raise a Python exception.
- ``strategies``: Hypothesis strategies (shapes, dtypes, activations, values, fused-dense calls).
- ``tolerances``: the dtype- and K-aware tolerance model, derived in its docstring.
- ``profiles``: the "ci" and "thorough" Hypothesis profiles.
- ``mutants``: deliberately broken kernels the harness must reject.
"""
from jaxnet.testing import profiles, strategies, tolerances
from jaxnet.testing.bad_inputs import BadCall, BadInputsReport, check_bad_inputs, default_bad_calls
from jaxnet.testing.harness import Report, assert_matches_reference, verify
from jaxnet.testing.strategies import Call, fused_dense_calls, make_fused_dense_call

__all__ = [
    "BadCall", "BadInputsReport", "Call", "Report", "assert_matches_reference", "check_bad_inputs",
    "default_bad_calls", "fused_dense_calls", "make_fused_dense_call", "profiles", "strategies",
    "tolerances", "verify",
]
