"""L1/L2 penalties: values against float64 sums, the gradient identities, and the default filter.

The gradient identities are exact, not approximate: d/dw 0.5·w² is computed as 0.5·(2·w), and
multiplying by powers of two does not round; d/dw |w| is sign(w).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxnet import regularizers
from jaxnet.models import SimpleNet

EPS = float(np.finfo(np.float32).eps)
TINY = float(np.finfo(np.float32).tiny)  # float32's smallest normal


@st.composite
def layer_params(draw):
    """A Flax-style two-layer tree: ``kernel [K, N]`` and ``bias [N]`` per layer, values in ±10."""
    # Few distinct shapes: each new one costs a compile.
    k, n = draw(st.sampled_from([1, 5])), draw(st.sampled_from([1, 3]))
    values = st.floats(-10, 10, width=32, allow_subnormal=False)  # includes exact zeros
    return {
        "dense_0": {"kernel": draw(hnp.arrays(np.float32, (k, n), elements=values)),
                    "bias": draw(hnp.arrays(np.float32, (n,), elements=values))},
        "dense_1": {"kernel": draw(hnp.arrays(np.float32, (n, 1), elements=values)),
                    "bias": draw(hnp.arrays(np.float32, (1,), elements=values))},
    }


grad_l1 = jax.jit(jax.grad(regularizers.l1))
grad_l2 = jax.jit(jax.grad(regularizers.l2))
grad_penalty = jax.jit(jax.grad(lambda p, a, b: regularizers.penalty(p, l1=a, l2=b)))


def kernels_of(params):
    return [params[layer]["kernel"].astype(np.float64) for layer in ("dense_0", "dense_1")]


@given(params=layer_params())
def test_values_match_float64_sums_over_kernels_only(params):
    kernels = kernels_of(params)
    n = sum(k.size for k in kernels)
    # A sum of n non-negative float32 terms: about n ulps relative at worst; and a square under
    # float32's smallest normal underflows (the thorough profile drew w = 1.2e-38): up to tiny each.
    np.testing.assert_allclose(regularizers.l2(params), 0.5 * sum((k**2).sum() for k in kernels),
                               rtol=2 * EPS * (n + 2), atol=n * TINY)
    np.testing.assert_allclose(regularizers.l1(params), sum(np.abs(k).sum() for k in kernels),
                               rtol=2 * EPS * (n + 2), atol=0)


@given(params=layer_params())
def test_gradient_identities(params):
    g2 = grad_l2(params)
    g1 = grad_l1(params)
    for layer in params:
        np.testing.assert_array_equal(g2[layer]["kernel"], params[layer]["kernel"])  # grad l2 = w
        np.testing.assert_array_equal(g1[layer]["kernel"], np.sign(params[layer]["kernel"]))  # grad l1 = sign w
        np.testing.assert_array_equal(g2[layer]["bias"], 0.0)
        np.testing.assert_array_equal(g1[layer]["bias"], 0.0)


@given(params=layer_params(), a=st.sampled_from([0.0, 1e-3, 0.5]), b=st.sampled_from([0.0, 1e-4, 2.0]))
def test_penalty_combines_l1_and_l2(params, a, b):
    expect = a * float(regularizers.l1(params)) + b * float(regularizers.l2(params))
    # A product under float32's smallest normal may be flushed to zero (XLA's CPU code flushes
    # subnormals; the thorough profile drew b * w = 1e-4 * 1.2e-38): up to TINY each.
    np.testing.assert_allclose(regularizers.penalty(params, l1=a, l2=b), expect, rtol=4 * EPS, atol=2 * TINY)
    grads = grad_penalty(params, a, b)
    kernel = params["dense_0"]["kernel"]
    np.testing.assert_allclose(grads["dense_0"]["kernel"], a * np.sign(kernel) + b * kernel,
                               rtol=4 * EPS, atol=4 * EPS * a + TINY)


def test_default_filter_rule():
    params = {
        "dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
        "norm": {"scale": jnp.ones(4), "bias": jnp.ones(4)},
        "embed": {"embedding": jnp.ones((10, 4))},
        "odd": {"kernel": jnp.ones(5), "w": jnp.ones((2, 2)), "temperature": jnp.ones(())},
        "stack": [jnp.ones((2, 3)), jnp.ones(3)],
    }
    mask = regularizers.weight_mask(params)
    assert mask == {
        "dense": {"kernel": True, "bias": False},
        "norm": {"scale": False, "bias": False},
        "embed": {"embedding": True},
        "odd": {"kernel": True, "w": True, "temperature": False},  # named kernel, or ndim >= 2
        "stack": [True, False],
    }
    assert float(regularizers.l2(params)) == 0.5 * (12 + 40 + 5 + 4 + 6)


def test_l1_gradient_is_zero_at_zero():
    np.testing.assert_array_equal(grad_l1({"kernel": jnp.array([[0.0, -3.0, 2.0]])})["kernel"], [[0.0, -1.0, 1.0]])


def test_custom_filter_and_empty_selection():
    params = {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 3.0)}
    everything = lambda path, leaf: True  # noqa: E731
    assert float(regularizers.l2(params, filter=everything)) == 0.5 * (4 * 4 + 2 * 9)
    assert float(regularizers.l1(params, filter=lambda path, leaf: False)) == 0.0
    assert float(regularizers.penalty({}, l1=1.0, l2=1.0)) == 0.0


def test_flax_model_params_penalise_both_kernels():
    variables = SimpleNet().init(jax.random.key(0), jnp.ones((1, 10)))
    params = variables["params"]
    expect = 0.5 * sum(float(jnp.sum(params[layer]["kernel"] ** 2)) for layer in ("fc1", "fc2"))
    np.testing.assert_allclose(regularizers.l2(variables), expect, rtol=8 * EPS * 55)
    mask = regularizers.weight_mask(variables)
    assert mask["params"]["fc1"] == {"kernel": True, "bias": False}


def test_low_precision_leaves_sum_in_float32():
    params = {"kernel": jnp.full((64, 64), 1.0 + 2**-7, jnp.bfloat16)}
    value = regularizers.l2(params)
    assert value.dtype == jnp.float32
    np.testing.assert_allclose(value, 0.5 * 64 * 64 * (1 + 2**-7) ** 2, rtol=4 * EPS * 64)


def test_jit_and_traced_coefficients():
    params = {"kernel": jnp.array([[1.0, -2.0]]), "bias": jnp.array([5.0])}
    f = jax.jit(lambda p, a, b: regularizers.penalty(p, l1=a, l2=b))
    np.testing.assert_allclose(f(params, 0.5, 2.0), 0.5 * 3 + 2.0 * 2.5, rtol=4 * EPS)


@pytest.mark.parametrize("fn", [regularizers.l1, regularizers.l2])
def test_float64_leaves_stay_float64(fn):
    with jax.enable_x64(True):
        assert fn({"kernel": jnp.ones((2, 2), jnp.float64)}).dtype == jnp.float64
