"""fit, fit_stream, evaluate and predict refuse what they cannot honour, before any step
(issue 20, points 3, 5 and 6): bad arguments, out-of-range labels and ids, donated states,
run directories that hold an earlier run, symbolic links."""
import os

import numpy as np
import optax
import pytest

from jaxnet import losses
from jaxnet.models import MLP
from jaxnet.models.recsys import MatrixFactorization
from jaxnet.train import TrainState, evaluate, fit, fit_stream, predict

X = np.random.default_rng(0).normal(size=(12, 3)).astype(np.float32)
Y = X[:, :1].copy()


def _state(model=None, sample_x=X[:1]):
    return TrainState.create(model=model or MLP((4, 1)), tx=optax.sgd(0.1), sample_x=sample_x, seed=0)


@pytest.mark.parametrize("kwargs, error, says", [
    (dict(log_every=-1), ValueError, "log_every must be >= 1"),
    (dict(epochs_per_call=-1), ValueError, "epochs_per_call must be >= 1"),
    (dict(batch_size=1.5), TypeError, "batch_size must be an integer"),
    (dict(batch_size=True), TypeError, "batch_size must be an integer"),
    (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
    (dict(patience=0, val_data=(X, Y)), ValueError, "patience must be >= 1"),
    (dict(val_data=(X[:0], Y[:0])), ValueError, "val_data has no examples"),
    (dict(epochs=-1), ValueError, "epochs must be >= 0"),
    (dict(l2=float("nan")), ValueError, "l2 must be finite"),
    (dict(l1=-0.1), ValueError, "l1 must be >= 0"),
    (dict(accumulate=0), ValueError, "accumulate must be >= 1"),
    (dict(keep=0, checkpoint_dir="ck"), ValueError, "keep must be >= 1"),
    (dict(on_nonfinite="ignore"), ValueError, "on_nonfinite must be one of"),
])
def test_fit_arguments_are_checked_by_name(kwargs, error, says):
    args = dict(loss_fn=losses.mse, epochs=2, progress=False) | kwargs
    with pytest.raises(error, match=says):
        fit(_state(), (X, Y), **args)


def test_numpy_integers_are_integers():
    run = fit(_state(), (X, Y), loss_fn=losses.mse, epochs=np.int64(1), batch_size=np.int32(4), progress=False)
    assert len(run.history) == 1


def test_a_donated_state_is_an_error_that_says_what_to_use():
    state = _state()
    run = fit(state, (X, Y), loss_fn=losses.mse, epochs=1, progress=False)
    for call in (lambda s: fit(s, (X, Y), loss_fn=losses.mse, epochs=1, progress=False),
                 lambda s: evaluate(s, (X, Y), loss_fn=losses.mse),
                 lambda s: predict(s, X)):
        with pytest.raises(ValueError, match=r"donated to an earlier fit.*use the state that call returned"):
            call(state)
    assert predict(run.state, X).shape == (12, 1)


def test_fit_stream_arguments_are_checked_by_name():
    from jaxnet.models.transformer import TransformerConfig, TransformerLM

    model = TransformerLM(TransformerConfig(vocab_size=8, block_size=4, embed_dim=8, num_heads=2, num_layers=1))
    state = TrainState.create(model=model, tx=optax.sgd(0.1), sample_x=np.zeros((1, 4), np.int32), seed=0)
    tokens = np.arange(64) % 8
    for kwargs, says in ((dict(log_every=0), "log_every must be >= 1"), (dict(batch_size=2.0), "batch_size must be"),
                         (dict(budget_s=float("inf")), "budget_s must be finite")):
        with pytest.raises((TypeError, ValueError), match=says):
            fit_stream(state, tokens, **(dict(steps=2, batch_size=2, block_size=4, progress=False) | kwargs))


@pytest.mark.parametrize("features", [(0, 1), (-3, 1), (4, 2.5)])
def test_mlp_widths_are_checked(features):
    with pytest.raises((TypeError, ValueError), match=r"MLP features\[\d\]"):
        _state(MLP(features))


def test_recommender_ids_past_the_tables_are_data_errors_before_training():
    ids = np.array([[0, 1], [2, 3], [4, 0]], np.int32)
    y = np.ones(3, np.float32)
    model = MatrixFactorization(num_users=4, num_items=5, dim=2)
    state = _state(model, sample_x=ids[:1])
    with pytest.raises(ValueError, match=r"id 4 at row 2, column 0 is outside \[0, 4\)"):
        fit(state, (ids, y), loss_fn=losses.mse, epochs=1, x_kind="ids", progress=False)
    with pytest.raises(ValueError, match=r"validation inputs: id 9 at row 0, column 1 is outside \[0, 5\)"):
        fit(state, (ids[:2], y[:2]), val_data=(np.array([[0, 9]], np.int32), y[:1]), loss_fn=losses.mse,
            epochs=1, x_kind="ids", progress=False)
    with pytest.raises(ValueError, match=r"id 4 at row 2"):
        evaluate(state, (ids, y), loss_fn=losses.mse)


def test_evaluate_range_checks_class_labels():
    state = _state(MLP((4, 3)))
    labels = np.array([0, 2, 5, 1] * 3, np.int32)
    with pytest.raises(ValueError, match=r"label 5 at index 2 is outside \[0, 3\)"):
        evaluate(state, (X, labels), loss_fn=losses.cross_entropy)


def test_a_new_run_does_not_overwrite_an_earlier_runs_log(tmp_path):
    fit(_state(), (X, Y), loss_fn=losses.mse, epochs=1, progress=False, workdir=tmp_path, plot=False)
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match="metrics.jsonl exists: it holds an earlier run's metrics"):
        fit(_state(), (X, Y), loss_fn=losses.mse, epochs=1, progress=False, workdir=tmp_path, plot=False)
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_run_files_are_never_written_through_a_symlink(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(target, run / "metrics.jsonl")
    with pytest.raises(ValueError, match="is a symbolic link"):
        fit(_state(), (X, Y), loss_fn=losses.mse, epochs=1, progress=False, workdir=run, plot=False)
    assert target.read_text() == "keep me\n"


def test_atomic_writes_replace_a_symlink_instead_of_writing_through_it(tmp_path):
    from jaxnet.files import write_atomic

    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    os.symlink(target, tmp_path / "result.json")
    write_atomic(tmp_path / "result.json", "{}\n")  # the rename replaces the link itself
    assert target.read_text() == "keep me\n" and (tmp_path / "result.json").read_text() == "{}\n"
    assert not (tmp_path / "result.json").is_symlink() and not list(tmp_path.glob(".*.tmp"))


def test_fit_stream_evaluates_a_model_without_a_train_argument():
    import flax.linen as nn

    class Bigram(nn.Module):  # ids [B, T] -> logits [B, T, V]; no `train` argument
        @nn.compact
        def __call__(self, ids):
            return nn.Embed(8, 8)(ids)

    state = TrainState.create(model=Bigram(), tx=optax.sgd(0.1), sample_x=np.zeros((1, 4), np.int32), seed=0)
    tokens = np.arange(64) % 8
    run = fit_stream(state, tokens, val_tokens=tokens, steps=2, batch_size=2, block_size=4, log_every=1,
                     eval_every=1, progress=False)
    assert np.isfinite(run.history[-1]["val_loss"])
