"""Training: the pure step, fit in both modes, exact resume, early stopping, logs, bad input."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnet import losses, metrics, optim
from jaxnet.data import make_regression
from jaxnet.models import MLP, SimpleNet
from jaxnet.train import TrainState, evaluate, fit, make_eval_step, make_train_step, predict


def _sgd(lr=0.01):
    return optim.make_optimizer(optim.OptimizerConfig(name="sgd", learning_rate=lr))


def _adam(lr=1e-2):
    return optim.make_optimizer(optim.OptimizerConfig(name="adam", learning_rate=lr))


def _same(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda u, v: bool(jnp.array_equal(u, v)), a, b)))


@pytest.fixture(scope="module")
def data():
    d = make_regression(96, 10, seed=1)
    return d.x, d.y


def test_one_sgd_step_equals_the_hand_computed_update(data):
    """Backpropagation through Linear-ReLU-Linear and MSE, written out in float64 NumPy."""
    x, y = data
    lr = 0.05
    state = TrainState.create(model=SimpleNet(), tx=_sgd(lr), sample_x=x[:1], seed=4)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), state.params)
    step = jax.jit(make_train_step(losses.mse))
    new, metrics = step(state, {"x": x, "y": y}, state.rng)

    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    z1 = x64 @ p["fc1"]["kernel"] + p["fc1"]["bias"]
    h = np.maximum(z1, 0)
    out = h @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    loss = np.mean((out - y64) ** 2)
    d_out = 2 * (out - y64) / out.size
    d_h = d_out @ p["fc2"]["kernel"].T
    d_z1 = d_h * (z1 > 0)
    grads = {"fc1": {"kernel": x64.T @ d_z1, "bias": d_z1.sum(0)},
             "fc2": {"kernel": h.T @ d_out, "bias": d_out.sum(0)}}
    expected = jax.tree.map(lambda w, g: w - lr * g, p, grads)
    # float32 forward/backward over 96 rows: relative error a few hundred ulps at most.
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6), new.params, expected)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    gnorm = np.sqrt(sum(np.sum(g**2) for g in jax.tree.leaves(grads)))
    np.testing.assert_allclose(metrics["grad_norm"], gnorm, rtol=1e-4)
    np.testing.assert_allclose(metrics["update_norm"], lr * gnorm, rtol=1e-4)
    assert int(new.step) == 1


def test_train_step_is_pure(data):
    x, y = data
    state = TrainState.create(model=MLP((16, 1), dropout_rate=0.2), tx=_adam(), sample_x=x[:1])
    step = jax.jit(make_train_step(losses.mse, l2=1e-3))  # no donation: the state is reused
    batch = {"x": x, "y": y}
    a, ma = step(state, batch, state.rng)
    b, mb = step(state, batch, state.rng)
    assert _same(a.params, b.params) and _same(ma, mb)
    c, _ = step(a, batch, state.rng)  # the next step folds in its own step number: new dropout mask
    assert not _same(jax.tree.map(lambda u, v: u - v, c.params, a.params),
                     jax.tree.map(lambda u, v: u - v, a.params, state.params))


def test_train_step_eager_equals_jitted(data):
    x, y = data
    state = TrainState.create(model=MLP((16, 1), dropout_rate=0.2), tx=_adam(), sample_x=x[:1])
    step = make_train_step(losses.mse, l1=1e-4)
    batch = {"x": x, "y": y}
    (eager, m_eager), (jitted, m_jit) = step(state, batch, state.rng), jax.jit(step)(state, batch, state.rng)
    # Same arithmetic, possibly fused differently by XLA: float32 rounding only.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), eager.params, jitted.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), m_eager, m_jit)


@pytest.mark.parametrize("batch_size", [None, 16, 25])
def test_fit_lowers_the_loss(data, batch_size):
    x, y = data
    state = TrainState.create(model=MLP((32, 1)), tx=_adam(), sample_x=x[:1])
    result = fit(state, (x, y), loss_fn=losses.mse, epochs=30, batch_size=batch_size, progress=False)
    curve = result.column("loss")
    assert curve[-1] < 0.5 * curve[0]
    steps_per_epoch = 1 if batch_size is None else -(-len(x) // batch_size)
    assert int(result.state.step) == 30 * steps_per_epoch and int(result.state.epoch) == 30


def test_scan_chunking_does_not_change_the_result(data):
    x, y = data
    runs = []
    for per_call in (1, 7, 30):
        state = TrainState.create(model=SimpleNet(), tx=_sgd(), sample_x=x[:1])
        runs.append(fit(state, (x, y), loss_fn=losses.mse, epochs=30, epochs_per_call=per_call, progress=False))
    for other in runs[1:]:
        assert _same(runs[0].state.params, other.state.params)
        assert runs[0].column("loss") == other.column("loss")


@pytest.mark.parametrize("batch_size", [None, 20])
def test_resume_is_exact(data, batch_size):
    """Shuffling, dropout and optimiser state all continue from the state: 3+3 epochs == 6 epochs."""
    x, y = data
    make = lambda: TrainState.create(model=MLP((16, 1), dropout_rate=0.3), tx=_adam(), sample_x=x[:1], seed=7)
    kw = dict(loss_fn=losses.mse, batch_size=batch_size, progress=False)
    straight = fit(make(), (x, y), epochs=6, **kw)
    half = fit(make(), (x, y), epochs=3, **kw)
    resumed = fit(half.state, (x, y), epochs=6, **kw)
    assert _same(straight.state.params, resumed.state.params)
    assert _same(straight.state.opt_state, resumed.state.opt_state)
    assert straight.column("loss")[3:] == resumed.column("loss")


def test_mid_epoch_position_is_part_of_the_state(data):
    """A state stopped after some batches of an epoch finishes that epoch's remaining batches."""
    x, y = data
    make = lambda: TrainState.create(model=MLP((8, 1)), tx=_sgd(0.05), sample_x=x[:1], seed=2)
    straight = fit(make(), (x, y), loss_fn=losses.mse, epochs=2, batch_size=20, progress=False)
    from jaxnet.train.loop import _runners  # the per-batch step fit uses

    _, epoch_order, minibatch_step, _, _ = _runners(losses.mse, 0.0, 0.0, None, (), len(x), 20, True)
    state = make()
    data_dev = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    order = epoch_order(state.rng, state.epoch)
    for _ in range(2):  # two of the epoch's five batches
        state, _ = minibatch_step(state, data_dev, order)
    assert int(state.batch_in_epoch) == 2 and int(state.epoch) == 0
    resumed = fit(state, (x, y), loss_fn=losses.mse, epochs=2, batch_size=20, progress=False)
    assert _same(straight.state.params, resumed.state.params)


def test_partial_last_batch_is_masked_not_dropped():
    """n=10, batch 4: the third batch holds 2 real examples and its loss is their mean alone."""
    d = make_regression(10, 10, seed=3)
    state = TrainState.create(model=SimpleNet(), tx=_sgd(0.0 + 1e-9), sample_x=d.x[:1])
    params0 = jax.tree.map(jnp.copy, state.params)
    result = fit(state, (d.x, d.y), loss_fn=losses.mse, epochs=1, batch_size=4, shuffle=False, progress=False)
    assert int(result.state.step) == 3
    pred = SimpleNet().apply({"params": params0}, d.x)
    per_example = np.asarray(jnp.mean((pred - d.y) ** 2, axis=-1))
    # The epoch's loss is the example-weighted mean of the batch means: the plain mean over all 10.
    np.testing.assert_allclose(result.history[0]["loss"], per_example.mean(), rtol=1e-5)


def test_validation_early_stopping_restores_the_best(data):
    x, y = data
    xv, yv = x[:32], -y[:32]  # validation targets the model can only get worse on
    state = TrainState.create(model=MLP((32, 1)), tx=_adam(3e-2), sample_x=x[:1])
    result = fit(state, (x, y), val_data=(xv, yv), loss_fn=losses.mse, epochs=200, batch_size=32,
                 patience=3, progress=False)
    assert result.stopped_early and len(result.history) < 200
    val = result.column("val_loss")
    assert min(val) == val[result.best_epoch - 1]
    eval_step = jax.jit(make_eval_step(losses.mse))
    restored = evaluate(result.state, {"x": jnp.asarray(xv), "y": jnp.asarray(yv)}, eval_step)
    np.testing.assert_allclose(restored["loss"], min(val), rtol=1e-6)


def test_early_stopping_without_validation_data_is_refused(data):
    x, y = data
    state = TrainState.create(model=SimpleNet(), tx=_sgd(), sample_x=x[:1])
    with pytest.raises(ValueError, match="patience=3 needs val_data"):
        fit(state, (x, y), loss_fn=losses.mse, epochs=5, patience=3, progress=False)


def test_evaluate_is_independent_of_batch_size(data):
    x, y = data
    state = TrainState.create(model=MLP((8, 1)), tx=_sgd(), sample_x=x[:1])
    metrics = {"abs_err": lambda p, t: jnp.mean(jnp.abs(p - t), axis=-1)}
    eval_step = jax.jit(make_eval_step(losses.mse, metrics))
    dev = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    whole, chunked = evaluate(state, dev, eval_step), evaluate(state, dev, eval_step, batch_size=7)
    for k in whole:
        np.testing.assert_allclose(whole[k], chunked[k], rtol=1e-5)


def test_workdir_gets_jsonl_and_png(data, tmp_path):
    x, y = data
    state = TrainState.create(model=SimpleNet(), tx=_sgd(), sample_x=x[:1])
    result = fit(state, (x, y), val_data=(x[:10], y[:10]), loss_fn=losses.mse, epochs=12, eval_every=4,
                 progress=False, workdir=tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, 13))
    assert [r["epoch"] for r in lines if "val_loss" in r] == [4, 8, 12]
    assert lines == result.history
    png = (tmp_path / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_progress_bar_and_log_lines(data, capsys):
    x, y = data
    state = TrainState.create(model=SimpleNet(), tx=_sgd(), sample_x=x[:1])
    fit(state, (x, y), loss_fn=losses.mse, epochs=20, log_every=10, progress=False)
    out, err = capsys.readouterr()
    assert [line.split()[1] for line in out.splitlines()] == ["10", "20"] and err == ""
    state = TrainState.create(model=SimpleNet(), tx=_sgd(), sample_x=x[:1])
    fit(state, (x, y), loss_fn=losses.mse, epochs=5, batch_size=32, progress=True)
    assert "5/5" in capsys.readouterr().err


def test_no_recompilation_across_steps_and_fits(data):
    x, y = data
    traces = []

    def counting_mse(pred, target, **kw):
        traces.append(1)  # runs once per trace, never per step
        return losses.mse(pred, target, **kw)

    tx = _sgd()  # the optimiser is static in the state: a new optax object is a new program
    for seed in range(2):
        state = TrainState.create(model=SimpleNet(), tx=tx, sample_x=x[:1], seed=seed)
        fit(state, (x, y), loss_fn=counting_mse, epochs=4, batch_size=20, progress=False)
    assert len(traces) == 1


@pytest.mark.parametrize("batch_size", [None, 32])
def test_divergence_names_the_step(data, batch_size):
    x, y = data
    state = TrainState.create(model=MLP((32, 1)), tx=_sgd(1e4), sample_x=x[:1])
    with pytest.raises(FloatingPointError, match=r"at step \d+ \(epoch \d+\)"):
        fit(state, (x * 100, y), loss_fn=losses.mse, epochs=50, batch_size=batch_size, progress=False)


@pytest.mark.parametrize("make_bad, error, match", [
    (lambda x, y: (x.astype(np.int32), y), TypeError, r"train inputs: expected a floating-point array, got dtype int32"),
    (lambda x, y: (x.astype(object), y), TypeError, r"train inputs: .*dtype object"),
    (lambda x, y: (x, y.astype(np.int64)), TypeError,
     r"train targets are integers \(int64\) and the loss is 'mse': pass target_kind='labels'"),
    (lambda x, y: (x, y[:-1]), ValueError, r"same number of examples.*\(96, 10\).*\(95, 1\)"),
    (lambda x, y: (np.where(np.arange(96)[:, None] == 5, np.nan, x), y), ValueError, r"train inputs: 10 non-finite.*\(5, 0\)"),
    (lambda x, y: (x, np.where(np.arange(96)[:, None] == 7, np.inf, y)), ValueError, r"train targets: 1 non-finite.*\(7, 0\) = inf"),
    (lambda x, y: (x[:, :9], y), ValueError, r"expected inputs with 10 features.*\(96, 9\)"),
])
def test_bad_training_data_raises_clearly(data, make_bad, error, match):
    x, y = data
    state = TrainState.create(model=SimpleNet(), tx=_sgd(), sample_x=x[:1])
    with pytest.raises(error, match=match):
        fit(state, make_bad(x, y), loss_fn=losses.mse, epochs=1, progress=False)


def test_bad_validation_data_is_named(data):
    x, y = data
    state = TrainState.create(model=SimpleNet(), tx=_sgd(), sample_x=x[:1])
    with pytest.raises(ValueError, match="validation targets"):
        fit(state, (x, y), val_data=(x[:4], np.full((4, 1), np.nan, np.float32)), loss_fn=losses.mse,
            epochs=1, progress=False)


@pytest.mark.parametrize("k", [2, 4])
def test_gradient_accumulation_equals_one_big_batch(k):
    """90 examples in batches of 16 (the last one masked) with an L2 penalty: k micro-batches per
    update give the one-batch update up to reassociation. The gradient is the same sum taken in k
    parts (each part's mean weighted by its share of the batch), so it moves by at most
    ~16 eps |g| per step (Higham 4.2); momentum SGD (lr 0.05, factor <= 10) over T steps: the
    tolerance T * 10 * 0.05 * 16 * eps, with the terms' scale ~1 here."""
    d = make_regression(90, 16, seed=1)
    tx = optim.make_optimizer(optim.OptimizerConfig(name="momentum", learning_rate=0.05))
    make = lambda: TrainState.create(model=MLP((32, 1)), tx=tx, sample_x=d.x[:1], seed=0)
    one = fit(make(), (d.x, d.y), loss_fn=losses.mse, epochs=3, batch_size=16, progress=False, l2=1e-3)
    acc = fit(make(), (d.x, d.y), loss_fn=losses.mse, epochs=3, batch_size=16, progress=False, l2=1e-3,
              accumulate=k)
    tol = int(one.state.step) * 10 * 0.05 * 16 * np.finfo(np.float32).eps
    for a, b in zip(jax.tree.leaves(one.state.params), jax.tree.leaves(acc.state.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=tol)
    np.testing.assert_allclose(acc.column("loss"), one.column("loss"), rtol=1e-5)
    with pytest.raises(ValueError, match="batch of 16 examples does not split into 3 equal micro-batches"):
        fit(make(), (d.x, d.y), loss_fn=losses.mse, epochs=1, batch_size=16, progress=False, accumulate=3)


def _blobs(n=120, classes=3, seed=0):
    """Three separable Gaussian blobs in 4-D: ``x: [n, 4]`` float32, ``y: [n]`` int labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = (rng.standard_normal((n, 4)) + 3 * np.eye(classes, 4)[y]).astype(np.float32)
    return x, y


def test_integer_labels_with_cross_entropy_need_no_target_kind():
    x, y = _blobs()
    make = lambda: TrainState.create(model=MLP((16, 3)), tx=_adam(), sample_x=x[:1], seed=0)
    auto = fit(make(), (x, y), loss_fn=losses.cross_entropy, epochs=3, batch_size=32, progress=False)
    explicit = fit(make(), (x, y), loss_fn=losses.cross_entropy, epochs=3, batch_size=32, progress=False,
                   target_kind="labels")
    assert _same(auto.state.params, explicit.state.params)
    with pytest.raises(TypeError, match="pass target_kind='labels' if they are class labels .* or target_kind='float'"):
        fit(make(), (x, y), loss_fn=losses.mse, epochs=1, progress=False)


@pytest.mark.parametrize("where", ["train", "validation"])
def test_a_label_outside_the_classes_is_a_data_error_before_training(where):
    x, y = _blobs()
    bad = y.copy()
    bad[7] = 5
    train, val = ((x, bad), (x, y)) if where == "train" else ((x, y), (x, bad))
    state = TrainState.create(model=MLP((16, 3)), tx=_adam(), sample_x=x[:1], seed=0)
    with pytest.raises(ValueError, match=rf"{where} targets: label 5 at index 7 is outside \[0, 3\): the model has "
                                         r"3 outputs \(1 labels out of range in all\)"):
        fit(state, train, val_data=val, loss_fn=losses.cross_entropy, epochs=1, progress=False)
    assert int(state.step) == 0  # nothing trained (the state was not donated)


def test_evaluate_takes_what_fit_takes_and_predict_gives_the_outputs():
    x, y = _blobs()
    state = TrainState.create(model=MLP((16, 3)), tx=_adam(), sample_x=x[:1], seed=0)
    run = fit(state, (x[:90], y[:90]), val_data=(x[90:], y[90:]), loss_fn=losses.cross_entropy, epochs=4,
              batch_size=30, progress=False, metrics={"accuracy": metrics.accuracy})
    got = evaluate(run.state, (x[90:], y[90:]), loss_fn=losses.cross_entropy, metrics={"accuracy": metrics.accuracy},
                   batch_size=7)
    assert got["loss"] == pytest.approx(run.history[-1]["val_loss"], rel=1e-6)
    assert got["accuracy"] == pytest.approx(run.history[-1]["val_accuracy"], rel=1e-6)
    out = predict(run.state, x, batch_size=32)
    want = run.state.apply_fn(run.state.variables, x, train=False)
    assert out.shape == (120, 3) and isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, np.asarray(want), rtol=1e-6, atol=1e-6)


def test_early_stopping_can_watch_any_validation_metric():
    x, y = _blobs(seed=1)
    state = TrainState.create(model=MLP((16, 3)), tx=_adam(), sample_x=x[:1], seed=0)
    run = fit(state, (x[:90], y[:90]), val_data=(x[90:], y[90:]), loss_fn=losses.cross_entropy, epochs=12,
              batch_size=30, progress=False, metrics={"accuracy": metrics.accuracy}, patience=3,
              monitor="val_accuracy", mode="max")
    acc = run.column("val_accuracy")
    epochs = [r["epoch"] for r in run.history]
    assert run.best_epoch == epochs[int(np.argmax(acc))]  # the first epoch of the highest accuracy
    if run.stopped_early:
        assert len(acc) - 1 - int(np.argmax(acc)) == 3
    with pytest.raises(ValueError, match=r"monitor='val_f1' is not a validation figure of this run; choose one of "
                                         r"\['val_loss', 'val_accuracy'\]"):
        fit(run.state, (x, y), val_data=(x, y), loss_fn=losses.cross_entropy, epochs=1, progress=False,
            metrics={"accuracy": metrics.accuracy}, monitor="val_f1")


def test_a_model_without_a_train_argument_trains():
    import flax.linen as nn

    class Plain(nn.Module):  # no train=, no dropout: any Flax module
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(x)

    d = make_regression(64, 10, seed=3)
    state = TrainState.create(model=Plain(), tx=_adam(), sample_x=d.x[:1], seed=0)
    run = fit(state, (d.x, d.y), loss_fn=losses.mse, epochs=5, batch_size=16, progress=False)
    assert run.history[-1]["loss"] < run.history[0]["loss"]
    assert predict(run.state, d.x).shape == (64, 1)
