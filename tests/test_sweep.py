"""fit_many: model i of a sweep is a single fit of its seed and hyperparameters (both modes, with
early stopping), the hyperparameters reach their own models, chunks change nothing, and what a
sweep cannot honour is refused by name."""
import functools
import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnet import losses
from jaxnet.models import MLP
from jaxnet.train import FitResult, TrainState, fit, fit_many, fused, sweep

RNG = np.random.default_rng(0)
X = RNG.normal(size=(20, 3)).astype(np.float32)
Y = (np.sin(X[:, :1]) + 0.3 * RNG.normal(size=(20, 1))).astype(np.float32)
XV = RNG.normal(size=(7, 3)).astype(np.float32)
YV = (np.sin(XV[:, :1]) + 0.3 * RNG.normal(size=(7, 1))).astype(np.float32)
MODEL = MLP((6, 1))
# One transformation for every model: each state carries its own rate in opt_state, so the single
# fits below share compiled programs (a new tx per call would compile each one afresh).
TX = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)
SEEDS, RATES = [0, 1], [0.03, 0.3]
EPOCHS = 16


def state_fn(seed, learning_rate):
    state = TrainState.create(model=MODEL, tx=TX, sample_x=X[:1], seed=seed)
    hyper = dict(state.opt_state.hyperparams, learning_rate=jnp.asarray(learning_rate, jnp.float32))
    return state.replace(opt_state=state.opt_state._replace(hyperparams=hyper))


def options(batch_size):
    return dict(loss_fn=losses.mse, epochs=EPOCHS, batch_size=batch_size, val_data=(XV, YV), patience=2,
                progress=False)


def assert_close(got, want, steps, what, scale=None):
    """Within ``sweep.tolerance(steps)`` relative, of ``scale`` (default: each leaf's own largest
    magnitude)."""
    tol = sweep.tolerance(steps)
    for path, a, b in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got), jax.tree.leaves(want)):
        b = np.asarray(b, np.float64)
        size = max(np.abs(b).max(), 1e-30) if scale is None else scale
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol * size,
                                   err_msg=f"{what} {jax.tree_util.keystr(path[0])}")


@pytest.mark.parametrize("batch_size", [None, 8], ids=["full_batch", "minibatch"])
def test_each_model_is_a_single_fit_of_its_seed_and_rate_with_early_stopping(batch_size):
    runs = fit_many(state_fn, (X, Y), seeds=SEEDS, hparams={"learning_rate": RATES}, **options(batch_size))
    grid = sweep.model_grid(SEEDS, {"learning_rate": RATES})
    assert [(s, hp["learning_rate"]) for s, hp in grid] == [(0, 0.03), (0, 0.3), (1, 0.03), (1, 0.3)]
    # The models stop at different epochs, so each model's own stop (the masked update) is exercised.
    assert len({len(r.history) for r in runs}) > 1 and any(r.stopped_early for r in runs)
    steps_per_epoch = 1 if batch_size is None else 3
    for (seed, hp), run in zip(grid, runs):
        one = fit(state_fn(seed, **hp), (X, Y), **options(batch_size))
        assert (len(run.history), run.best_epoch, run.stopped_early) == (len(one.history), one.best_epoch,
                                                                          one.stopped_early), (seed, hp)
        steps = len(one.history) * steps_per_epoch
        # The whole state: a model that stopped must not have trained on (restore_best alone would
        # hide that in the parameters, not in the step count or the momentum).
        assert (int(run.state.step), int(run.state.epoch)) == (int(one.state.step), int(one.state.epoch))
        assert_close(run.state.params, one.state.params, steps, f"params of seed {seed}, {hp}:")
        # The momentum is a sum of gradients whose terms cancel (a bias's is a mean of residuals of
        # both signs): its rounding is on the scale of the gradients, the largest entry of the
        # trace, not of a small entry itself (jax 0.12.1: 2.6e-5 relative in a 0.0086 entry).
        trace = jax.tree.leaves(one.state.opt_state.inner_state[0].trace)
        assert_close(run.state.opt_state, one.state.opt_state, steps, f"optimizer state of seed {seed}, {hp}:",
                     scale=max(float(np.abs(np.asarray(t)).max()) for t in trace))
        for name in ("loss", "grad_norm", "val_loss"):
            assert_close(run.column(name), one.column(name), steps, f"{name} of seed {seed}, {hp}:")
        assert [set(r) for r in run.history] == [set(r) for r in one.history]
        assert [(r["epoch"], r["step"]) for r in run.history] == [(r["epoch"], r["step"]) for r in one.history]
        assert float(run.state.opt_state.hyperparams["learning_rate"]) == np.float32(hp["learning_rate"])
    # Same seed, other rate: far apart, so the equalities above could not hold with one rate for all.
    gap = np.abs(np.asarray(runs[0].state.params["layers_0"]["kernel"]) - runs[1].state.params["layers_0"]["kernel"])
    assert gap.max() > 1e3 * sweep.tolerance(EPOCHS * steps_per_epoch)


def test_chunks_from_a_tiny_memory_budget_give_the_unchunked_results(monkeypatch):
    planned = []
    plan = sweep.plan_chunks
    monkeypatch.setattr(sweep, "plan_chunks", lambda *a: planned.append(plan(*a)) or planned[-1])
    # The first test's sweep (its compiled programs are reused), then one model per chunk.
    kwargs = dict(seeds=SEEDS, hparams={"learning_rate": RATES}, **options(None))
    whole = fit_many(state_fn, (X, Y), **kwargs)
    chunked = fit_many(state_fn, (X, Y), memory_budget=1, **kwargs)
    assert [len(p) for p in planned] == [1, 4]  # one chunk of 4, then 4 of one model each
    for a, b in zip(chunked, whole):
        assert (len(a.history), a.best_epoch) == (len(b.history), b.best_epoch)
        assert_close((a.state.params, a.state.opt_state), (b.state.params, b.state.opt_state), EPOCHS, "state:")
        assert_close(a.column("val_loss"), b.column("val_loss"), EPOCHS, "val_loss:")


def test_results_built_on_demand_behave_as_fit_s():
    """fit_many builds a result's state and history when first read: they are then plain values
    (a list of dicts that JSON takes, arrays of one model), read once; ``column`` reads the same
    values without building the history; ``dataclasses.replace`` still makes a FitResult."""
    import dataclasses

    runs = fit_many(state_fn, (X, Y), seeds=SEEDS, hparams={"learning_rate": RATES}, **options(8))
    run = runs[1]
    names = ["loss", "grad_norm", "skipped", "val_loss", "epoch", "step", "no_such_metric"]
    columns = {name: run.column(name) for name in names}  # read before the history is built
    assert columns == {name: [r[name] for r in run.history if name in r] for name in names}
    assert len(columns["loss"]) == len(run.history) and columns["val_loss"] and not columns["no_such_metric"]
    assert isinstance(run, FitResult) and type(run.history) is list and run.history is run.history
    assert json.loads(json.dumps(run.history)) == run.history
    assert run.state is run.state and run.state.params["layers_0"]["kernel"].shape == (3, 6)
    other = dataclasses.replace(run, best_epoch=None)
    assert isinstance(other, FitResult) and other.best_epoch is None and other.history == run.history
    assert other.state is run.state and (other.stopped_early, other.wall_s) == (run.stopped_early, run.wall_s)


def test_plan_chunks_balances_and_always_trains():
    assert sweep.plan_chunks(10, 100, 50, 10_000) == [range(0, 10)]
    assert sweep.plan_chunks(10, 100, 50, 450) == [range(0, 4), range(4, 8), range(8, 10)]  # 4 fit, 3 chunks
    assert sweep.plan_chunks(3, 100, 50, 1) == [range(0, 1), range(1, 2), range(2, 3)]


def test_model_grid_orders_seeds_then_combinations():
    hp = {"learning_rate": [1e-3, 3e-3], "weight_decay": [0, 1e-4]}
    assert sweep.model_grid([7], hp) == [(7, {"learning_rate": 1e-3, "weight_decay": 0}),
                                         (7, {"learning_rate": 1e-3, "weight_decay": 1e-4}),
                                         (7, {"learning_rate": 3e-3, "weight_decay": 0}),
                                         (7, {"learning_rate": 3e-3, "weight_decay": 1e-4})]
    assert sweep.model_grid([1, 2], hp, combine="zip") == [
        (1, {"learning_rate": 1e-3, "weight_decay": 0}), (1, {"learning_rate": 3e-3, "weight_decay": 1e-4}),
        (2, {"learning_rate": 1e-3, "weight_decay": 0}), (2, {"learning_rate": 3e-3, "weight_decay": 1e-4})]
    assert sweep.model_grid(range(2)) == [(0, {}), (1, {})]


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(hparams={"learning_rate": [0.1, 0.2], "momentum": [0.9]}, combine="zip"), ValueError,
     "combine='zip' needs lists of one length, got lengths {'learning_rate': 2, 'momentum': 1}"),
    (dict(hparams={"lr": [0.1]}), ValueError, "takes no hyperparameter 'lr'"),
    (dict(hparams={"learning_rate": []}), ValueError, "hparams['learning_rate'] is empty"),
    (dict(hparams={"learning_rate": ["fast"]}), TypeError, "hparams['learning_rate'][0] must be a number"),
    (dict(seeds=[]), ValueError, "seeds is empty"),
    (dict(seeds=[0, 1.5]), TypeError, "seeds[1] must be an integer"),
    (dict(checkpoint_dir="ckpt"), ValueError, "fit_many does not take checkpoint_dir='ckpt'"),
    (dict(mesh="data=2"), ValueError, "fit_many does not take mesh='data=2': fit_many runs on one device"),
    (dict(workdir="runs/x"), ValueError, "fit_many does not take workdir="),
    (dict(epoch=3), TypeError, "unexpected keyword argument 'epoch'"),
    (dict(combine="outer"), ValueError, "combine must be one of ['product', 'zip']"),
])
def test_bad_arguments_are_refused_by_name(kwargs, error, message):
    call = dict(seeds=[0], hparams={"learning_rate": [0.1]}, loss_fn=losses.mse, epochs=1, progress=False)
    with pytest.raises(error) as info:
        fit_many(state_fn, (X, Y), **{**call, **kwargs})
    assert message in str(info.value)


def test_a_hyperparameter_the_optimiser_state_does_not_carry_is_refused():
    def baked_in(seed, **hp):  # the rate closed over, not injected: every model would get the same
        return TrainState.create(model=MODEL, tx=optax.sgd(0.1), sample_x=X[:1], seed=seed)

    with pytest.raises(ValueError, match="'learning_rate' is not in the optimiser state state_fn builds"):
        fit_many(baked_in, (X, Y), seeds=[0], hparams={"learning_rate": [0.1]}, loss_fn=losses.mse, epochs=1,
                 progress=False)


def test_every_fit_argument_is_honoured_or_refused():
    fit_args = {n for n, p in inspect.signature(fit).parameters.items() if p.kind is p.KEYWORD_ONLY}
    assert set(sweep.HONOURED) | set(sweep.REFUSED) == fit_args
    assert not set(sweep.HONOURED) & set(sweep.REFUSED)


def test_a_state_fn_that_gives_every_model_the_first_value_is_refused():
    def first_rate_only(seed, learning_rate):  # injected, but not this model's value
        return state_fn(seed, RATES[0])

    with pytest.raises(ValueError, match=r"asked learning_rate=0.3 but its optimiser state holds 0.03"):
        fit_many(first_rate_only, (X, Y), seeds=[0], hparams={"learning_rate": RATES}, loss_fn=losses.mse, epochs=1,
                 progress=False)


def test_not_one_program_names_what_only_fit_does():
    assert sweep.not_one_program(100, checkpoint_every=1000) is None  # only the final weights: a study saves them
    assert sweep.not_one_program(100, checkpoint_every=0) is None
    why = sweep.not_one_program(100, mesh=object(), resume=True, checkpoint_every=10)
    assert why == "mesh, resume, checkpoint_every asked for (fit_many does not take them)"


def test_write_logs_writes_what_fit_would_into_the_folder(tmp_path):
    history = [{"epoch": 1, "step": 2, "loss": 0.5, "time_s": 0.1},
               {"epoch": 2, "step": 4, "loss": 0.25, "val_loss": 0.3, "time_s": 0.2}]
    result = FitResult(None, history, 2, False, 0.2, {})
    files = sweep.write_logs(result, tmp_path / "seed0", title="t", plot=False)
    lines = (tmp_path / "seed0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == history
    assert not (tmp_path / "seed0" / "loss_curve.png").exists() and "loss_curve" not in files


def test_a_diverging_model_stops_the_sweep_naming_it():
    with pytest.raises(FloatingPointError, match=r"^model 1 \(seed 0, \{'learning_rate': 1000000.0\}\): training "
                                                 r"diverged: loss became"):
        fit_many(state_fn, (X, Y), seeds=SEEDS, hparams={"learning_rate": [0.03, 1e6]}, **options(None))


# --- The fused engine (jaxnet.train.fused): plain full-batch SGD of dense stacks in one kernel ------------------

PLAIN = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
DEEP = MLP((6, 4, 1), activation="tanh")


def plain_state_fn(seed, learning_rate, model=DEEP, tx=PLAIN):
    state = TrainState.create(model=model, tx=tx, sample_x=X[:1], seed=seed)
    hyper = dict(state.opt_state.hyperparams, learning_rate=jnp.asarray(learning_rate, jnp.float32))
    return state.replace(opt_state=state.opt_state._replace(hyperparams=hyper))


def test_fused_engine_models_are_single_fits_with_early_stopping():
    runs = fit_many(plain_state_fn, (X, Y), seeds=SEEDS, hparams={"learning_rate": RATES}, engine="fused",
                    **options(None))
    auto = fit_many(plain_state_fn, (X, Y), seeds=SEEDS, hparams={"learning_rate": RATES}, **options(None))
    assert {r.engine for r in runs} == {r.engine for r in auto} == {"fused"}
    assert len({len(r.history) for r in runs}) > 1 and any(r.stopped_early for r in runs)
    for (seed, hp), run in zip(sweep.model_grid(SEEDS, {"learning_rate": RATES}), runs):
        one = fit(plain_state_fn(seed, **hp), (X, Y), **options(None))
        assert (len(run.history), run.best_epoch, run.stopped_early) == (len(one.history), one.best_epoch,
                                                                          one.stopped_early), (seed, hp)
        steps = len(one.history)
        assert (int(run.state.step), int(run.state.epoch)) == (int(one.state.step), int(one.state.epoch))
        assert_close((run.state.params, run.state.opt_state), (one.state.params, one.state.opt_state), steps,
                     f"state of seed {seed}, {hp}:")
        for name in ("loss", "grad_norm", "update_norm", "penalty", "val_loss"):
            assert_close(run.column(name), one.column(name), steps, f"{name} of seed {seed}, {hp}:")
        assert [set(r) for r in run.history] == [set(r) for r in one.history]
        assert [(r["epoch"], r["step"]) for r in run.history] == [(r["epoch"], r["step"]) for r in one.history]
    gap = np.abs(np.asarray(runs[0].state.params["layers_0"]["kernel"]) - runs[1].state.params["layers_0"]["kernel"])
    assert gap.max() > 1e3 * sweep.tolerance(EPOCHS)


@pytest.mark.parametrize("tx", [optax.sgd(optax.linear_schedule(0.3, 0.01, EPOCHS)),
                                optax.inject_hyperparams(optax.sgd)(learning_rate=optax.cosine_decay_schedule(0.3, 8))],
                         ids=["sgd_linear_schedule", "injected_cosine_schedule"])
def test_fused_engine_trains_each_epoch_at_its_scheduled_rate(tx):
    def state_fn(seed):
        return TrainState.create(model=DEEP, tx=tx, sample_x=X[:1], seed=seed)

    # No validation: the program's one call runs all the epochs, each at its own rate.
    kwargs = dict(loss_fn=losses.mse, epochs=EPOCHS, progress=False)
    runs = fit_many(state_fn, (X, Y), seeds=SEEDS, engine="fused", **kwargs)
    for seed, run in zip(SEEDS, runs):
        one = fit(state_fn(seed), (X, Y), **kwargs)
        steps = len(one.history)
        assert_close((run.state.params, run.state.opt_state), (one.state.params, one.state.opt_state), steps,
                     f"state of seed {seed}:")
        assert_close(run.column("update_norm"), one.column("update_norm"), steps, f"update_norm of seed {seed}:")
    # At the schedule's first rate throughout, the parameters end far away: the schedule was followed.
    constant = fit_many(lambda seed: TrainState.create(model=DEEP, tx=optax.sgd(0.3), sample_x=X[:1], seed=seed),
                        (X, Y), seeds=SEEDS[:1], engine="fused", **kwargs)
    gap = np.abs(np.asarray(constant[0].state.params["layers_0"]["kernel"]) -
                 runs[0].state.params["layers_0"]["kernel"])
    assert gap.max() > 1e3 * sweep.tolerance(EPOCHS)


class _Doubled(MLP):
    """Claims its parent's dense stack but doubles the output: the forward check must catch it."""

    def __call__(self, x, train: bool = False):
        return 2.0 * super().__call__(x, train)


def _noisy(learning_rate):
    return optax.chain(optax.add_noise(0.01, 0.55, key=jax.random.key(0)), optax.sgd(learning_rate))


def _clipped(learning_rate):
    return optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(learning_rate))


def _decayed(learning_rate, weight_decay):
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate))


@pytest.mark.parametrize("state_kwargs, fit_kwargs, message", [
    (dict(tx=optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)), {}, "is not plain SGD"),
    (dict(tx=optax.inject_hyperparams(optax.adam)(learning_rate=0.1)), {}, "is not plain SGD"),
    (dict(tx=optax.inject_hyperparams(_noisy)(learning_rate=0.1)), {}, "is not plain SGD"),
    (dict(tx=optax.inject_hyperparams(_clipped)(learning_rate=0.1)), {}, "is not plain SGD"),
    (dict(model=MLP((6, 1), dropout_rate=0.1)), {}, "does not describe itself as a stack"),
    (dict(model=MLP((6, 1), activation="gelu")), {}, "activation 'gelu'"),
    (dict(model=_Doubled((6, 1))), {}, "forward pass is not the stack"),
    ({}, dict(batch_size=8), "full-batch only"),
    ({}, dict(l2=1e-3), "l2=0.0 only"),
    ({}, dict(loss_fn=losses.mae), "jaxnet.losses.mse"),
])
def test_fused_engine_refuses_what_it_cannot_train_and_auto_falls_back(state_kwargs, fit_kwargs, message):
    def state_fn(seed, learning_rate):
        return plain_state_fn(seed, learning_rate, **state_kwargs)

    kwargs = dict(seeds=[0], hparams={"learning_rate": [0.05]}, **{**options(None), "epochs": 2, **fit_kwargs})
    with pytest.raises(ValueError, match=f"fit_many\\(engine='fused'\\) cannot train these models: .*{message}"):
        fit_many(state_fn, (X, Y), engine="fused", **kwargs)
    assert [r.engine for r in fit_many(state_fn, (X, Y), **kwargs)] == ["vmap"]


def test_fused_engine_probes_every_model_s_optimiser():
    """Weight decay 0 makes model 0 plain SGD and model 1 not: the refusal names model 1."""
    tx = optax.inject_hyperparams(_decayed)(learning_rate=0.1, weight_decay=0.0)

    def state_fn(seed, weight_decay):
        state = TrainState.create(model=DEEP, tx=tx, sample_x=X[:1], seed=seed)
        hyper = dict(state.opt_state.hyperparams, weight_decay=jnp.asarray(weight_decay, jnp.float32))
        return state.replace(opt_state=state.opt_state._replace(hyperparams=hyper))

    kwargs = dict(seeds=[0], hparams={"weight_decay": [0.0, 0.1]}, loss_fn=losses.mse, epochs=2, progress=False)
    with pytest.raises(ValueError, match=r"model 1 of the chunk's optimiser is not plain SGD"):
        fit_many(state_fn, (X, Y), engine="fused", **kwargs)
    assert [r.engine for r in fit_many(state_fn, (X, Y), **kwargs)] == ["vmap", "vmap"]
    only_plain = fit_many(state_fn, (X, Y), engine="fused", **{**kwargs, "hparams": {"weight_decay": [0.0]}})
    assert only_plain[0].engine == "fused"


def test_a_diverging_model_of_the_fused_engine_stops_the_sweep_naming_it_and_its_parameter():
    with pytest.raises(FloatingPointError, match=r"^model 1 \(seed 0, \{'learning_rate': 1000000.0\}\): training "
                                                 r"diverged: .*layers_"):
        fit_many(functools.partial(plain_state_fn, model=MODEL), (X, Y), seeds=SEEDS,
                 hparams={"learning_rate": [0.03, 1e6]}, engine="fused",
                 **options(None))


def test_auto_leaves_wide_layers_to_the_vmapped_engine_and_fused_still_takes_them():
    wide = MLP((8, fused.AUTO_MAX_LAYER_WEIGHTS // 8 + 1, 1))  # one layer just past the limit
    kwargs = dict(seeds=[0], hparams={"learning_rate": [0.01]}, loss_fn=losses.mse, epochs=2, progress=False)
    state_fn = functools.partial(plain_state_fn, model=wide)
    assert fit_many(state_fn, (X, Y), **kwargs)[0].engine == "vmap"
    forced, vmapped = (fit_many(state_fn, (X, Y), engine=e, **kwargs)[0] for e in ("fused", "vmap"))
    assert forced.engine == "fused"
    assert_close(forced.state.params, vmapped.state.params, 2, "wide layers:")
