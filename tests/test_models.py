"""SimpleNet and MLP: shapes, fan-in initialisation, purity, dropout, and bad inputs."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnet.models import MLP, SimpleNet


def _init(model, k, seed=0):
    return model.init(jax.random.key(seed), jnp.zeros((2, k), jnp.float32))


def test_simple_net_has_the_seeds_layers():
    params = _init(SimpleNet(), 10)["params"]
    shapes = jax.tree.map(jnp.shape, params)
    assert shapes == {"fc1": {"kernel": (10, 5), "bias": (5,)}, "fc2": {"kernel": (5, 1), "bias": (1,)}}


def test_simple_net_computes_linear_relu_linear():
    variables = _init(SimpleNet(), 10, seed=3)
    p = jax.tree.map(np.asarray, variables["params"])
    x = np.random.default_rng(0).standard_normal((7, 10)).astype(np.float32)
    expected = np.maximum(x @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0) @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    np.testing.assert_allclose(SimpleNet().apply(variables, x), expected, rtol=1e-5, atol=1e-6)


def test_init_is_reproducible_from_the_seed():
    a, b, c = (_init(MLP((16, 3)), 8, seed=s) for s in (0, 0, 1))
    assert all(jax.tree.leaves(jax.tree.map(lambda u, v: bool(jnp.array_equal(u, v)), a, b)))
    assert not jnp.array_equal(a["params"]["layers_0"]["kernel"], c["params"]["layers_0"]["kernel"])


def test_torch_style_init_is_uniform_within_fan_in_bound():
    k = 400
    params = _init(MLP((300, 2)), k)["params"]["layers_0"]
    bound = 1 / math.sqrt(k)
    w = np.asarray(params["kernel"])
    assert np.abs(w).max() <= bound and np.abs(params["bias"]).max() <= bound
    # U(-a, a) has variance a^2/3; with 120k draws the sample variance is within ~1% (5 sigma < 2%).
    assert abs(w.var() / (bound**2 / 3) - 1) < 0.02


def test_lecun_init_has_fan_in_variance_and_zero_bias():
    k = 400
    params = _init(MLP((300, 2), init_scheme="lecun"), k)["params"]["layers_0"]
    assert abs(np.asarray(params["kernel"]).var() * k - 1) < 0.03  # truncated normal rescaled to 1/K
    assert not np.any(np.asarray(params["bias"]))


def test_apply_is_pure_and_dropout_draws_only_from_its_key():
    model = MLP((256, 256, 4), dropout_rate=0.5)
    variables = _init(model, 6)
    x = jnp.ones((3, 6))
    k1, k2 = jax.random.key(1), jax.random.key(2)
    eval_a, eval_b = model.apply(variables, x), model.apply(variables, x, train=False)
    assert jnp.array_equal(eval_a, eval_b)
    t1 = model.apply(variables, x, train=True, rngs={"dropout": k1})
    assert jnp.array_equal(t1, model.apply(variables, x, train=True, rngs={"dropout": k1}))
    assert not jnp.array_equal(t1, model.apply(variables, x, train=True, rngs={"dropout": k2}))


def test_dropout_zeroes_the_rate_and_keeps_the_mean():
    """Inverted dropout: a fraction ``rate`` of hidden units is zeroed, survivors scaled by 1/(1-rate)."""
    rate, width = 0.3, 4000
    model = MLP((width, width), dropout_rate=rate, activation="identity")
    variables = _init(model, 1)
    # An identity output layer makes the model's output the dropped-out hidden layer itself.
    variables["params"]["layers_1"] = {"kernel": jnp.eye(width), "bias": jnp.zeros(width)}
    first = variables["params"]["layers_0"]
    hidden = np.asarray(first["kernel"][0] + first["bias"])  # x = 1
    out = np.asarray(model.apply(variables, jnp.ones((1, 1)), train=True, rngs={"dropout": jax.random.key(0)})[0])
    zeroed = out == 0
    assert abs(zeroed.mean() - rate) < 0.03  # binomial sd is 0.007
    np.testing.assert_allclose(out[~zeroed], hidden[~zeroed] / (1 - rate), rtol=1e-5, atol=1e-6)


def test_wrong_feature_count_names_the_shapes():
    with pytest.raises(ValueError, match=r"expected inputs with 10 features.*\(2, 12\)"):
        _init(SimpleNet(), 12)
    variables = _init(MLP((5, 1)), 10)
    with pytest.raises(ValueError, match=r"K=12.*\(3, 12\).*K=10"):
        MLP((5, 1)).apply(variables, jnp.ones((3, 12)))


@pytest.mark.parametrize("kwargs, match", [
    ({"features": ()}, "at least one layer"),
    ({"features": (3, 1), "dropout_rate": 1.0}, "dropout_rate"),
    ({"features": (3, 1), "activation": "swish"}, "unknown activation"),
    ({"features": (3, 1), "init_scheme": "xavier"}, "init_scheme"),
])
def test_bad_mlp_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _init(MLP(**kwargs), 4)
