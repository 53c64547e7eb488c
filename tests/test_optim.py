"""Optimisers and schedules: updates against hand-written float64 NumPy formulas, per Optax's conventions.

Each optimiser runs three steps on a small tree (a kernel and a bias) with fixed gradients, and
every update is compared with the formula below. The updates are a handful of float32 operations
each (Adam: ~10, including a sqrt and a divide), compounded over three steps; 64 ulps relative
covers that with room, and is still a thousand times smaller than any of the mistakes it guards
against (a wrong bias correction or a missing decay changes updates by percents).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnet import optim
from jaxnet.optim import OptimizerConfig, make_optimizer, make_schedule

EPS = float(np.finfo(np.float32).eps)
RTOL = 64 * EPS
STEPS = 3


def _tree(rng, scale=1.0):
    return {"dense": {"kernel": (scale * rng.normal(size=(3, 2))).astype(np.float32),
                      "bias": (scale * rng.normal(size=(2,))).astype(np.float32)}}


def _leaves(tree):
    return {"kernel": np.asarray(tree["dense"]["kernel"], np.float64),
            "bias": np.asarray(tree["dense"]["bias"], np.float64)}


def reference_updates(config, params, grads_per_step):
    """Hand-computed updates for `config`, in float64: one dict {leaf: update} per step."""
    lr = config.learning_rate  # constant schedule in these tests
    p = _leaves(params)
    state = {k: {"m": np.zeros_like(v), "v": np.zeros_like(v)} for k, v in p.items()}
    out = []
    for t, grads in enumerate(grads_per_step, start=1):
        g_all = _leaves(grads)
        step = {}
        for k, g in g_all.items():
            s = state[k]
            if config.name == "sgd":
                direction = g
            elif config.name in ("momentum", "nesterov"):
                s["m"] = g + config.momentum * s["m"]  # optax.trace: m ← g + β m
                direction = g + config.momentum * s["m"] if config.name == "nesterov" else s["m"]
            elif config.name in ("adam", "adamw"):
                s["m"] = config.b1 * s["m"] + (1 - config.b1) * g
                s["v"] = config.b2 * s["v"] + (1 - config.b2) * g**2
                m_hat = s["m"] / (1 - config.b1**t)
                v_hat = s["v"] / (1 - config.b2**t)
                direction = m_hat / (np.sqrt(v_hat) + config.eps)
            elif config.name == "rmsprop":
                s["v"] = config.rms_decay * s["v"] + (1 - config.rms_decay) * g**2
                direction = g / np.sqrt(s["v"] + config.eps)  # eps inside the sqrt, no bias correction
            else:
                raise AssertionError(config.name)
            if k == "kernel":  # decoupled decay, on weights only
                direction = direction + config.weight_decay * p[k]
            step[k] = -lr * direction
            p[k] = p[k] + step[k]
        out.append(step)
    return out


def run_steps(config, params, grads_per_step):
    tx = make_optimizer(config)
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for grads in grads_per_step:
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        out.append(_leaves(updates))
    return out


@pytest.mark.parametrize("config", [
    OptimizerConfig(name="sgd", learning_rate=0.1),
    OptimizerConfig(name="sgd", learning_rate=0.1, weight_decay=0.05),
    OptimizerConfig(name="momentum", learning_rate=0.1, momentum=0.9),
    OptimizerConfig(name="momentum", learning_rate=0.1, momentum=0.8, weight_decay=0.01),
    OptimizerConfig(name="nesterov", learning_rate=0.1, momentum=0.9),
    OptimizerConfig(name="adam", learning_rate=1e-2),
    OptimizerConfig(name="adamw", learning_rate=1e-2, weight_decay=0.1),
    OptimizerConfig(name="rmsprop", learning_rate=1e-2, rms_decay=0.9),
], ids=lambda c: f"{c.name}-wd{c.weight_decay}")
def test_updates_equal_hand_computed_formulas(config):
    rng = np.random.default_rng(0)
    params = _tree(rng)
    grads = [_tree(rng) for _ in range(STEPS)]
    got = run_steps(config, params, grads)
    expect = reference_updates(config, params, grads)
    for step, (g, e) in enumerate(zip(got, expect)):
        for leaf in ("kernel", "bias"):
            np.testing.assert_allclose(g[leaf], e[leaf], rtol=RTOL, atol=RTOL * config.learning_rate,
                                       err_msg=f"{config.name}, step {step}, {leaf}")


def test_adamw_is_optax_adamw_with_the_weight_mask():
    rng = np.random.default_rng(1)
    params, grads = _tree(rng), _tree(rng)
    ours = make_optimizer(OptimizerConfig(name="adamw", learning_rate=1e-3, weight_decay=0.1))
    mask = {"dense": {"kernel": True, "bias": False}}
    theirs = optax.adamw(1e-3, weight_decay=0.1, mask=mask)
    u_ours, _ = ours.update(grads, ours.init(params), params)
    u_theirs, _ = theirs.update(grads, theirs.init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=4 * EPS, atol=0), u_ours, u_theirs)


def test_clipping_caps_the_global_norm():
    rng = np.random.default_rng(2)
    params = _tree(rng)
    config = OptimizerConfig(name="sgd", learning_rate=1.0, clip_norm=0.5)
    tx = make_optimizer(config)
    big = jax.tree.map(lambda x: 100 * x, _tree(rng))
    small = jax.tree.map(lambda x: x / (10 * optax.tree.norm(_tree(rng))), _tree(rng))  # norm 0.1
    u_big, _ = tx.update(big, tx.init(params), params)
    # One rescale by 0.5/‖g‖ and a norm over 8 numbers: a few ulps.
    np.testing.assert_allclose(optax.tree.norm(u_big), 0.5, rtol=8 * EPS)
    direction = jax.tree.map(lambda u, g: u / g, u_big, big)  # a single common factor
    np.testing.assert_allclose(jnp.concatenate([x.ravel() for x in jax.tree.leaves(direction)]),
                               -0.5 / optax.tree.norm(big), rtol=8 * EPS)
    u_small, _ = tx.update(small, tx.init(params), params)
    jax.tree.map(lambda u, g: np.testing.assert_array_equal(u, -g), u_small, small)


def test_clipping_comes_before_momentum():
    rng = np.random.default_rng(3)
    params, grads = _tree(rng), jax.tree.map(lambda x: 1e3 * x, _tree(rng))
    config = OptimizerConfig(name="momentum", learning_rate=1.0, clip_norm=1.0)
    u, _ = make_optimizer(config).update(grads, make_optimizer(config).init(params), params)
    np.testing.assert_allclose(optax.tree.norm(u), 1.0, rtol=8 * EPS)  # first trace = clipped grad


# --- schedules ----------------------------------------------------------------------------------

def _values(config, steps):
    schedule = make_schedule(config)
    return np.array([float(schedule(s)) for s in steps])


def test_constant_schedule():
    np.testing.assert_allclose(_values(OptimizerConfig(learning_rate=0.3), [0, 10, 10_000]), 0.3, rtol=EPS)


def test_step_schedule_staircase_and_boundaries():
    base = OptimizerConfig(learning_rate=1.0, schedule="step", decay_rate=0.5)
    np.testing.assert_allclose(_values(base.replace(decay_every=10), [0, 9, 10, 19, 20, 35]),
                               [1, 1, 0.5, 0.5, 0.25, 0.125], rtol=2 * EPS)
    np.testing.assert_allclose(_values(base.replace(boundaries=(5, 20)), [0, 4, 5, 19, 20, 100]),
                               [1, 1, 0.5, 0.5, 0.25, 0.25], rtol=2 * EPS)


def test_cosine_schedule():
    config = OptimizerConfig(learning_rate=2.0, schedule="cosine", total_steps=100, final_lr_fraction=0.1)
    expect = [2.0 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(t, 100) / 100))) for t in (0, 25, 50, 100, 300)]
    np.testing.assert_allclose(_values(config, [0, 25, 50, 100, 300]), expect, rtol=8 * EPS)


def test_warmup_cosine_schedule():
    config = OptimizerConfig(learning_rate=1.0, schedule="warmup_cosine", warmup_steps=10, total_steps=110)
    steps = [0, 5, 10, 60, 110, 200]
    expect = [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]  # linear up over 10, cosine down over the other 100
    np.testing.assert_allclose(_values(config, steps), expect, rtol=8 * EPS, atol=8 * EPS)


def test_optimizer_follows_its_schedule():
    rng = np.random.default_rng(4)
    params, grads = _tree(rng), _tree(rng)
    config = OptimizerConfig(name="sgd", learning_rate=1.0, schedule="step", decay_every=2, decay_rate=0.1)
    tx = make_optimizer(config)
    state = tx.init(params)
    for lr in [1.0, 1.0, 0.1, 0.1, 0.01]:
        updates, state = tx.update(grads, state, params)
        jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -lr * g, rtol=2 * EPS), updates, grads)


# --- configuration ------------------------------------------------------------------------------

def test_config_is_frozen_and_replace_validates():
    config = OptimizerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.name = "adam"  # type: ignore[misc]
    assert config.replace(name="adam").name == "adam" and config.name == "sgd"
    with pytest.raises(ValueError, match="rmsprop"):
        config.replace(name="lion")


@pytest.mark.parametrize("changes,fragment", [
    ({"name": "adagrad"}, "sgd, momentum, nesterov, adam, adamw, rmsprop"),
    ({"schedule": "linear"}, "constant, step, cosine, warmup_cosine"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"momentum": 1.0}, "momentum"),
    ({"weight_decay": -1.0}, "weight_decay"),
    ({"name": "adam", "weight_decay": 0.1}, "adamw"),
    ({"clip_norm": 0.0}, "clip_norm"),
])
def test_bad_config_raises(changes, fragment):
    with pytest.raises(ValueError, match=fragment):
        OptimizerConfig(**changes)


def test_a_momentum_that_is_not_a_number_is_named():
    with pytest.raises(TypeError, match="momentum must be a number, got '0.9'"):
        OptimizerConfig(momentum="0.9")


@pytest.mark.parametrize("changes,fragment", [
    ({"schedule": "step"}, "exactly one of decay_every or boundaries"),
    ({"schedule": "step", "decay_every": 5, "boundaries": (10,)}, "exactly one"),
    ({"schedule": "step", "boundaries": (10, 5)}, "strictly increasing"),
    ({"schedule": "step", "decay_every": 0}, "decay_every"),
    ({"schedule": "cosine"}, "total_steps"),
    ({"schedule": "warmup_cosine", "total_steps": 10, "warmup_steps": 10}, "warmup_steps"),
])
def test_bad_schedule_raises(changes, fragment):
    with pytest.raises(ValueError, match=fragment):
        make_schedule(OptimizerConfig(**changes))


def test_every_name_builds_and_runs_under_jit():
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}
    for name in optim.OPTIMIZERS:
        tx = make_optimizer(OptimizerConfig(name=name, schedule="warmup_cosine", warmup_steps=1, total_steps=10,
                                            clip_norm=1.0, weight_decay=0.0 if name == "adam" else 1e-4))
        updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
        assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates)), name
