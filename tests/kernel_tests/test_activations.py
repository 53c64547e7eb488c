"""The activation table (``kernels.activations``) agrees with itself: every form of every entry.

Each entry is written several times (jnp, its derivative, a lowerable form, the derivative from y,
float64 NumPy), so the table is checked form against form on a grid, in float64 (x64 mode) where
the comparison is of formulas, not of roundings. Tolerances: two float64 evaluations of the same
function by different formulas differ by a few ulps of the largest intermediate term, at most
``1e-12`` relative here (|z| <= 12); the float32 lowerable forms are checked against float32
``fn``/``grad`` within 64 float32 ulps of their scale (the rational erf's own 4e-7 absolute error is
~4 ulps; exp/tanh differences a few more).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import activations

NAMES = activations.NAMES
Z = np.concatenate([np.linspace(-12, 12, 4801), [0.0, -0.0, 1e-30, -1e-30]])


def _close(got, want, rtol, scale=1.0):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want)
    bound = rtol * np.maximum(np.abs(want), scale)
    assert np.all(err <= bound), f"worst at z={Z[np.argmax(err / bound)]}: {got[np.argmax(err / bound)]} vs {want[np.argmax(err / bound)]}"


def test_codes_are_positions_and_names_are_unique():
    assert list(activations.CODES.values()) == list(range(len(NAMES)))
    assert [activations.get(n).code for n in NAMES] == list(range(len(NAMES)))
    with pytest.raises(ValueError, match="unknown activation 'swish'.*choose one of"):
        activations.get("swish")


@pytest.mark.parametrize("name", NAMES)
def test_derivative_is_autodiff_of_the_function(name):
    """``grad`` is what autodiff of ``fn`` (the reference's gradient) gives, relu's 1/2 at 0 included."""
    act = activations.get(name)
    with jax.enable_x64(True):
        z = jnp.asarray(Z)
        auto = jax.vmap(jax.grad(act.fn))(z)
        _close(act.grad(z), auto, 1e-12)
    if name == "relu":
        assert float(act.grad(jnp.float32(0.0))) == 0.5


@pytest.mark.parametrize("name", NAMES)
def test_numpy_forms_match_the_jax_forms(name):
    act = activations.get(name)
    with jax.enable_x64(True):
        z = jnp.asarray(Z)
        _close(act.np_fn(Z), act.fn(z), 1e-12)
        _close(act.np_grad(Z), act.grad(z), 1e-12)


@pytest.mark.parametrize("name", [n for n in NAMES if activations.get(n).saves == "y"])
def test_derivative_from_y_matches(name):
    """Activations that save y can rebuild act' from it (relu: wherever z is not exactly 0)."""
    act = activations.get(name)
    z = Z[Z != 0] if name == "relu" else Z
    with jax.enable_x64(True):
        zj = jnp.asarray(z)
        got = act.grad_from_y(act.fn(zj))
        want = act.grad(zj)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-9, atol=1e-12)


def test_saves_is_known_and_grad_from_y_present_when_needed():
    for name in NAMES:
        act = activations.get(name)
        assert act.saves in ("z", "y", "none"), name
        assert (act.grad_from_y is not None) == (act.saves == "y"), name


@pytest.mark.parametrize("name", NAMES)
def test_lowerable_forms_match_in_float32(name):
    act = activations.get(name)
    z = jnp.asarray(Z, jnp.float32)
    scale = max(act.d1, 1.0)
    _close(act.lowerable_fn(z), act.fn(z), 64 * 2.0**-23, scale=scale)
    _close(act.lowerable_grad(z), act.grad(z), 64 * 2.0**-23, scale=scale)


@pytest.mark.parametrize("name", NAMES)
def test_bounds_are_suprema_of_the_derivatives(name):
    """``d1 >= sup |act'|`` and ``d2 >= sup |act''|`` away from kinks, within 1% of the sup (tight)."""
    act = activations.get(name)
    z = np.linspace(-30, 30, 600001)
    d1 = np.max(np.abs(act.np_grad(z)))
    assert d1 <= act.d1 <= 1.01 * d1 + 1e-12
    away = np.all([np.abs(z - k) > 1e-3 for k in act.kinks], axis=0) if act.kinks else np.ones_like(z, bool)
    second = np.abs(np.gradient(act.np_grad(z), z))[away][1:-1]  # central differences, h = 1e-4
    d2 = second.max()
    assert d2 <= act.d2 * (1 + 1e-6) + 1e-9 and act.d2 <= 1.02 * d2 + 1e-6, (d2, act.d2)  # 1e-9: differencing noise
