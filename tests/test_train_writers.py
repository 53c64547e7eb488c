"""Training logs: writers (JSONL, TensorBoard, a caller's own), the profiler window, and the
clock-fed learning-rate schedule of ``fit_stream``."""
import gzip
import json
import math
import struct
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnet import losses
from jaxnet.data import make_regression
from jaxnet.models import SimpleNet
from jaxnet.train import (JsonlWriter, ProfileTrace, TensorBoardWriter, TrainState, clock_factor, clock_schedule,
                          fit, fit_stream, set_clock_fraction)


@pytest.fixture(scope="module")
def data():
    d = make_regression(96, 10, seed=1)
    return d.x, d.y


_SGD = optax.sgd(0.01)  # one optimiser object: the state's programs compile once for the file


def _state(x, seed=0):
    return TrainState.create(model=SimpleNet(), tx=_SGD, sample_x=x[:1], seed=seed)


class _Recorder:
    """A caller's writer: keeps what it is given."""

    def __init__(self):
        self.calls = []

    def write_scalars(self, step, scalars):
        self.calls.append((step, dict(scalars)))


class _Bigram(nn.Module):
    """The smallest language model fit_stream can train: ids [B, T] -> logits [B, T, V]."""

    vocab: int = 11

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Embed(self.vocab, self.vocab)(x)


def _lm_state(tx):
    return TrainState.create(model=_Bigram(), tx=tx, sample_x=jnp.zeros((1, 8), jnp.int32), seed=0)


_TOKENS = np.arange(300) % 11


def _events(logdir) -> list:
    """Every event of every TensorBoard event file in ``logdir``, read back from the TFRecord
    framing (u64 length, u32 crc, data, u32 crc) with tensorboardX's protobuf."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        raw, i = path.read_bytes(), 0
        while i < len(raw):
            (length,) = struct.unpack("<Q", raw[i:i + 8])
            events.append(event_pb2.Event.FromString(raw[i + 12:i + 12 + length]))
            i += 12 + length + 4
    return events


def _scalars(logdir) -> dict:
    """``{(tag, step): value}`` of every scalar in ``logdir``'s event files."""
    return {(v.tag, e.step): v.simple_value for e in _events(logdir) for v in e.summary.value}


def _calls_traced(profile_dir, function: str) -> int:
    """How many calls of the jitted ``function`` the trace under ``profile_dir`` holds.

    A call shows as nested ``PjitFunction(name)`` events (Python and C++ levels): count the
    outermost ones.
    """
    (trace,) = profile_dir.glob("plugins/profile/*/*.trace.json.gz")
    events = sorted((e["ts"], e["ts"] + e["dur"]) for e in json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
                    if e.get("name") == f"PjitFunction({function})")
    calls, end = 0, -math.inf
    for start, stop in events:
        if start >= end:
            calls, end = calls + 1, stop
    return calls


def test_jsonl_writer_adds_a_missing_step_and_appends(tmp_path):
    path = tmp_path / "m.jsonl"
    w = JsonlWriter(path)
    w.write_scalars(3, {"loss": 0.5})
    w.write_scalars(4, {"step": 4, "loss": 0.25})
    w.close()
    w = JsonlWriter(path, append=True)
    w.write_scalars(5, {"loss": 0.125})
    w.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [{"loss": 0.5, "step": 3}, {"step": 4, "loss": 0.25}, {"loss": 0.125, "step": 5}]


def test_callers_writers_get_every_record_at_its_step(data):
    x, y = data
    mine = _Recorder()
    run = fit(_state(x), (x, y), val_data=(x[:10], y[:10]), loss_fn=losses.mse, epochs=4, batch_size=32,
              eval_every=2, progress=False, writers=[mine])
    assert mine.calls == [(r["step"], r) for r in run.history]
    assert [step for step, _ in mine.calls] == [3, 6, 9, 12] and "val_loss" in mine.calls[1][1]


@pytest.mark.parametrize("batch_size", [None, 32])
def test_tensorboard_holds_every_scalar_at_its_step_across_a_resume(data, tmp_path, batch_size):
    """3 + 3 epochs into one workdir: both calls' event files are there (a resumed run within
    the same second must not overwrite the first file) and every scalar reads back at its step."""
    x, y = data
    kw = dict(loss_fn=losses.mse, batch_size=batch_size, val_data=(x[:10], y[:10]), progress=False,
              workdir=tmp_path, tensorboard=True)
    first = fit(_state(x), (x, y), epochs=3, **kw)
    second = fit(first.state, (x, y), epochs=6, **kw)
    logdir = tmp_path / "tensorboard"
    assert second.files["tensorboard"] == str(logdir) and len(list(logdir.glob("events.out.tfevents.*"))) == 2
    history = first.history + second.history
    expected = {(k, r["step"]): np.float32(v) for r in history for k, v in r.items() if k != "step"}
    assert {"val_loss", "epoch", "loss", "grad_norm", "time_s"} <= {k for k, _ in expected}
    assert _scalars(logdir) == expected


def test_tensorboard_writers_started_in_the_same_second_keep_their_own_files(tmp_path, monkeypatch):
    import time

    monkeypatch.setattr(time, "time", lambda: 1.7e9)  # event file names hold the time in seconds
    for step in (1, 2):
        w = TensorBoardWriter(tmp_path)
        w.write_scalars(step, {"loss": step / 4})
        w.close()
    assert _scalars(tmp_path) == {("loss", 1): 0.25, ("loss", 2): 0.5}


def test_tensorboard_needs_a_workdir(data):
    x, y = data
    with pytest.raises(ValueError, match="tensorboard=True.*need a workdir"):
        fit(_state(x), (x, y), loss_fn=losses.mse, epochs=1, progress=False, tensorboard=True)


def test_tensorboard_without_tensorboardx_says_what_to_install(data, tmp_path, monkeypatch):
    x, y = data
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # what a missing package looks like to import
    with pytest.raises(ImportError, match=r"pip install 'jaxnet\[logs\]'"):
        fit(_state(x), (x, y), loss_fn=losses.mse, epochs=1, progress=False, workdir=tmp_path, tensorboard=True)
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before any log was opened


def test_profile_window_of_minibatch_updates(data, tmp_path):
    """96 examples in batches of 32: 3 updates an epoch; the window (2, 5) is updates 3, 4 and 5."""
    x, y = data
    run = fit(_state(x), (x, y), loss_fn=losses.mse, epochs=2, batch_size=32, progress=False,
              workdir=tmp_path, profile_steps=(2, 5))
    profile = tmp_path / "profile"
    assert run.files["profile"] == str(profile)
    assert len(list(profile.glob("plugins/profile/*/*.xplane.pb"))) == 1
    assert _calls_traced(profile, "minibatch_step") == 3


def test_profile_window_covers_whole_full_batch_calls(data, tmp_path):
    """Two epochs per scan call: updates 1-2, 3-4, 5-6, 7-8; the window (3, 5) (updates 4 and 5)
    reaches into the second and third calls, and the trace holds both whole."""
    x, y = data
    run = fit(_state(x), (x, y), loss_fn=losses.mse, epochs=8, epochs_per_call=2, progress=False,
              workdir=tmp_path, profile_steps=(3, 5))
    assert _calls_traced(tmp_path / "profile", "run_epochs") == 2 and "profile" in run.files


def test_profile_trace_is_stopped_when_training_raises(data, tmp_path):
    x, y = data
    state = TrainState.create(model=SimpleNet(), tx=optax.sgd(1e4), sample_x=x[:1])
    with pytest.raises(FloatingPointError):
        fit(state, (x * 100, y), loss_fn=losses.mse, epochs=50, batch_size=32, progress=False,
            workdir=tmp_path / "run", profile_steps=(0, 10**6))
    assert list((tmp_path / "run" / "profile").glob("plugins/profile/*/*.xplane.pb"))
    jax.profiler.start_trace(str(tmp_path / "again"))  # raises while another trace is running
    jax.profiler.stop_trace()


@pytest.mark.parametrize("updates", [[(1, 2)], [(4, 5), (5, 6)]])
def test_profile_trace_takes_nothing_outside_its_window(tmp_path, updates):
    """Window (2, 4): the update from step 1 to 2 is before it; a run resumed at step 4 is past it."""
    trace = ProfileTrace(tmp_path, (2, 4))
    for step_from, step_to in updates:
        trace.before(step_from, step_to)
        trace.after(step_to, None)
    trace.close()
    assert trace.files == {} and not list(tmp_path.iterdir())


@pytest.mark.parametrize("window, named", [
    ((5, 5), r"profile_steps=\(5, 5\) needs 0 <= start < stop"),
    ((4, 2), r"profile_steps=\(4, 2\) needs 0 <= start < stop"),
    ((-1, 3), r"profile_steps=\(-1, 3\) needs 0 <= start < stop"),
    ((1, 2, 3), r"profile_steps must be \(start, stop\).*\(1, 2, 3\)"),
    ("ab", r"profile_steps must be \(start, stop\).*'ab'"),
])
def test_bad_profile_windows_are_named(data, tmp_path, window, named):
    x, y = data
    with pytest.raises(ValueError, match=named):
        fit(_state(x), (x, y), loss_fn=losses.mse, epochs=1, progress=False, workdir=tmp_path, profile_steps=window)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_profile_needs_a_workdir(data):
    x, y = data
    with pytest.raises(ValueError, match=r"profile_steps=\(0, 2\) need a workdir"):
        fit(_state(x), (x, y), loss_fn=losses.mse, epochs=1, progress=False, profile_steps=(0, 2))


def test_fit_stream_logs_through_the_same_writers(tmp_path):
    """JSONL, TensorBoard, a caller's writer and a profile window of updates 2..4 (3 calls)."""
    mine = _Recorder()
    run = fit_stream(_lm_state(optax.adam(1e-2)), _TOKENS, steps=6, batch_size=4, block_size=8, log_every=2,
                     progress=False, workdir=tmp_path, plot=False, tensorboard=True, profile_steps=(1, 4),
                     writers=[mine])
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == run.history
    assert mine.calls == [(r["step"], r) for r in run.history]
    assert _scalars(tmp_path / "tensorboard")[("tokens_per_s", 4)] == np.float32(run.history[1]["tokens_per_s"])
    assert sorted(run.files) == ["metrics", "profile", "tensorboard"]
    assert _calls_traced(tmp_path / "profile", "step") == 3


def _formula(step: int, fraction: float, warmup: int, final: float) -> float:
    """The schedule in float64: linear warm-up by update, cosine by fraction of the budget used."""
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return warm * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * fraction)))


@pytest.mark.parametrize("warmup", [0, 3])
def test_clock_schedule_applies_the_formula_for_the_fractions_it_is_given(warmup):
    fractions = [0.0, 0.05, 0.05, 0.3, 0.5, 0.9, 1.0]  # a stalled clock repeats a fraction
    tx = clock_schedule(warmup, final_fraction=0.1)
    grads = {"w": jnp.ones((2, 3)), "b": jnp.full((3,), 2.0)}

    @jax.jit
    def update(opt_state, fraction):
        return tx.update(grads, set_clock_fraction(opt_state, fraction))

    opt_state, applied = tx.init(grads), []
    for f in fractions:
        updates, opt_state = update(opt_state, np.float32(f))
        applied.append(float(updates["w"][0, 0]))
        # One factor for every leaf; XLA may evaluate the schedule once per fusion (vectorised
        # or not), which can put the leaves' factors an ulp apart.
        np.testing.assert_allclose(updates["b"], 2 * updates["w"][0], rtol=2 * np.finfo(np.float32).eps)
    want = [_formula(i, f, warmup, 0.1) for i, f in enumerate(fractions)]
    # float32 on the device against float64: a few ulps.
    np.testing.assert_allclose(applied, want, rtol=1e-6)
    assert int(opt_state.count) == len(fractions) and float(opt_state.fraction) == 1.0


def test_set_clock_fraction_leaves_other_optimizer_states_alone():
    params = {"w": jnp.ones(3)}
    plain = optax.adam(1e-3).init(params)
    same = set_clock_fraction(plain, 0.5)
    assert jax.tree.structure(same) == jax.tree.structure(plain)
    assert all(jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(plain)))
    chained = optax.chain(optax.adam(1e-3), clock_schedule(2)).init(params)
    assert float(set_clock_fraction(chained, 0.25)[1].fraction) == 0.25
    assert float(clock_factor(jnp.int32(0), jnp.float32(0.0), 2)) == 0.5


def test_fit_stream_feeds_the_schedule_the_part_of_the_steps_used():
    """No time budget: the fraction at update s (0-based) is s / steps. With SGD the update norm is
    lr * factor * grad norm, so each logged step shows the factor it applied. The fraction is
    data: one trace of the step for all of them."""
    steps, lr, traces = 6, 0.5, []

    def counting_loss(pred, target, **kw):
        traces.append(1)  # once per trace, never per step
        return losses.cross_entropy(pred, target, **kw)

    run = fit_stream(_lm_state(optax.chain(optax.sgd(lr), clock_schedule(2, final_fraction=0.2))), _TOKENS,
                     steps=steps, batch_size=4, block_size=8, loss_fn=counting_loss, log_every=1, progress=False)
    assert len(traces) == 1
    applied = [r["update_norm"] / (lr * r["grad_norm"]) for r in run.history]
    want = [_formula(s, s / steps, 2, 0.2) for s in range(steps)]
    np.testing.assert_allclose(applied, want, rtol=1e-5)  # float32 norms of float32 updates
    assert float(run.state.opt_state[1].fraction) == np.float32(5 / 6)
