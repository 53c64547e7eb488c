"""Checkpoints: bit-exact round trips, damage and mismatch caught and named, resume after SIGKILL
and SIGTERM equal to a run never interrupted, non-finite updates raised or skipped."""
import functools
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnet import losses, optim
from jaxnet.data import make_regression
from jaxnet.models import MLP, SimpleNet
from jaxnet.train import TrainState, checkpoint, fit, parameter_names

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import resume_worker  # noqa: E402

WORKER = pathlib.Path(__file__).parent / "resume_worker.py"
ROOT = WORKER.parent.parent


def _adam():
    return optim.make_optimizer(optim.OptimizerConfig(name="adam", learning_rate=1e-2))


def _state(model=None, seed=0, dtype=None):
    model = model or SimpleNet()
    state = TrainState.create(model=model, tx=_adam(), sample_x=np.zeros((2, 10), np.float32), seed=seed)
    if dtype is not None:
        params = jax.tree.map(lambda a: a.astype(dtype), state.params)
        state = state.replace(params=params, opt_state=state.tx.init(params))
    return state


def _arrays(state) -> list[np.ndarray]:
    return [np.asarray(jax.random.key_data(a) if checkpoint._is_key(a) else a) for a in jax.tree.leaves(state)]


def _bits_equal(a, b) -> bool:
    xs, ys = _arrays(a), _arrays(b)
    return len(xs) == len(ys) and all(x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
                                      for x, y in zip(xs, ys))


@pytest.fixture()
def saved(tmp_path):
    """A checkpoint of an Adam state at step 5 (values moved off their initial ones)."""
    state = _state(seed=0)
    state = state.replace(step=state.step + 5, params=jax.tree.map(lambda a: a + 0.5, state.params))
    path = checkpoint.save(tmp_path, state, config={"lr": 0.01, "model": {"width": 5}})
    return tmp_path, state, path


def test_round_trip_is_bit_exact_and_keeps_the_config(saved):
    directory, state, path = saved
    restored = checkpoint.restore(directory, like=_state(seed=7))
    assert _bits_equal(restored, state)
    assert jax.random.key_impl(restored.rng) == jax.random.key_impl(state.rng)
    assert isinstance(restored.params["fc1"]["kernel"], jax.Array)
    assert checkpoint.load_config(directory) == {"lr": 0.01, "model": {"width": 5}}
    assert checkpoint.latest_step(directory) == 5 and path == directory.absolute() / "5"


def test_bfloat16_state_round_trips(tmp_path):
    state = _state(seed=1, dtype=jnp.bfloat16)
    checkpoint.save(tmp_path, state)
    restored = checkpoint.restore(tmp_path, like=_state(seed=2, dtype=jnp.bfloat16))
    assert restored.params["fc1"]["kernel"].dtype == jnp.bfloat16 and _bits_equal(restored, state)


def test_keep_holds_the_newest_k(tmp_path):
    state = _state()
    for _ in range(5):
        state = state.replace(step=state.step + 3)
        checkpoint.save(tmp_path, state, keep=2)
    assert checkpoint.steps(tmp_path) == [12, 15]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["12", "15"]


def test_saving_a_step_again_is_a_no_op_or_refused(saved):
    directory, state, _ = saved
    checkpoint.save(directory, state)  # the same arrays: nothing happens
    other = state.replace(params=jax.tree.map(lambda a: a * 2, state.params))
    with pytest.raises(checkpoint.CheckpointError, match="already holds a different checkpoint of step 5"):
        checkpoint.save(directory, other)
    assert _bits_equal(checkpoint.restore(directory, like=state), state)


def test_no_checkpoint_is_an_error_that_names_the_folder(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in"):
        checkpoint.restore(tmp_path / "empty", like=_state())
    checkpoint.save(tmp_path, _state())
    with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint of step 9 .* there are: \[0\]"):
        checkpoint.restore(tmp_path, like=_state(), step=9)


def test_every_file_flipped_truncated_or_deleted_is_caught_and_named(saved):
    """Orbax alone restores a flipped data byte silently; here every file of the checkpoint is
    damaged in turn (one random byte flipped, the last byte cut, the file deleted)."""
    directory, state, path = saved
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != checkpoint.FILES_MANIFEST)
    assert len(files) > 20
    rng = random.Random(0)
    for f in files:
        original = f.read_bytes()
        rel = str(f.relative_to(path))
        for damage in ("flip", "truncate", "delete"):
            if damage == "flip":
                data = bytearray(original)
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
                f.write_bytes(bytes(data))
            elif damage == "truncate":
                f.write_bytes(original[:-1])
            else:
                f.unlink()
            with pytest.raises(checkpoint.CheckpointError) as err:
                checkpoint.restore(directory, like=state)
            message = str(err.value)
            assert rel in message, (damage, rel, message)
            if rel.startswith("state/") and rel.count("/") >= 2:
                assert f"arrays affected: {rel.split('/')[1]}" in message
            f.write_bytes(original)
    assert _bits_equal(checkpoint.restore(directory, like=state), state)


def test_a_different_model_lists_the_differing_paths_and_loads_nothing(saved):
    directory, _, _ = saved
    wider = _state(model=MLP((6, 1)))
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.restore(directory, like=wider)
    message = str(err.value)
    assert "params.layers_0.kernel: checkpoint absent, model float32[10, 6]" in message
    assert "params.fc1.kernel: checkpoint float32[10, 5], model absent" in message
    with pytest.raises(checkpoint.CheckpointError, match=r"params.fc1.kernel: checkpoint float32\[10, 5\], "
                                                         r"model bfloat16\[10, 5\]"):
        checkpoint.restore(directory, like=_state(dtype=jnp.bfloat16))


def test_files_hold_json_and_array_chunks_only(saved):
    """Nothing in a checkpoint is a pickle: every file but the arrays' chunks is JSON."""
    _, _, path = saved
    for f in path.rglob("*"):
        if not f.is_file():
            continue
        rel = f.relative_to(path)
        is_chunk = rel.parts[0] == "state" and len(rel.parts) == 3 and not rel.name.startswith(".")
        if is_chunk:
            assert not f.read_bytes().startswith(b"\x80"), rel  # no pickle protocol header
        elif rel.name != "commit_success.txt":
            json.loads(f.read_text())


def _fit_run(tmp_path, **kw):
    d = make_regression(64, 10, seed=1)
    state = TrainState.create(model=MLP((8, 1)), tx=_adam(), sample_x=d.x[:1], seed=4)
    return fit(state, (d.x, d.y), loss_fn=losses.mse, epochs=6, batch_size=16, progress=False,
               checkpoint_dir=tmp_path / "ckpt", **kw)


def test_resume_skips_a_damaged_checkpoint_with_a_warning_and_ends_the_same(tmp_path):
    straight = _fit_run(tmp_path / "a", checkpoint_every=4)
    run = _fit_run(tmp_path / "b", checkpoint_every=4, keep=None)
    newest = checkpoint.latest_step(tmp_path / "b" / "ckpt")
    (tmp_path / "b" / "ckpt" / str(newest) / "state" / "params.layers_0.kernel" / "0.0").write_bytes(b"x")
    with pytest.warns(RuntimeWarning, match=f"skipping checkpoint step {newest}: .*params.layers_0.kernel"):
        resumed = _fit_run(tmp_path / "b", checkpoint_every=4, resume=True)
    assert int(run.state.step) == int(resumed.state.step) == 24
    assert _bits_equal(resumed.state.params, straight.state.params)


def test_resume_with_another_config_is_refused(tmp_path):
    _fit_run(tmp_path, config={"lr": 0.01, "width": 8})
    with pytest.raises(checkpoint.CheckpointError, match=r"(?s)another config.*lr: saved 0.01, given 0.02"):
        _fit_run(tmp_path, config={"lr": 0.02, "width": 8}, resume=True)


def test_resume_keeps_one_metrics_record_per_epoch(tmp_path):
    _fit_run(tmp_path, checkpoint_every=4, keep=None, workdir=tmp_path / "w")
    for step in checkpoint.steps(tmp_path / "ckpt")[2:]:
        checkpoint._remove(tmp_path / "ckpt" / str(step))  # back to step 8 (mid-epoch 2)
    _fit_run(tmp_path, checkpoint_every=4, resume=True, workdir=tmp_path / "w")
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4, 5, 6]


def test_same_seed_and_config_give_identical_runs(tmp_path):
    a, b = _uninterrupted("minibatch"), resume_worker.run("minibatch", None, every=None)
    assert _bits_equal(a, b)


# Seconds of sleep per logged record, so that each run lasts ~2 s after compiling (12 epochs,
# 80 epochs, 60 steps): a kill lands mid-run, often inside a checkpoint write.
DELAY = {"minibatch": 0.15, "fullbatch": 0.025, "stream": 0.03}


@functools.lru_cache(maxsize=None)
def _uninterrupted(mode: str):
    """The run never interrupted (no checkpoints at all), once per mode."""
    return resume_worker.run(mode, None, every=None)


@pytest.fixture(scope="module")
def worker_env(tmp_path_factory):
    """The workers' environment: one persistent compilation cache for all of them, so a resumed
    run does not compile again what the killed one compiled."""
    return {**os.environ, "RESUME_WORKER_CACHE": str(tmp_path_factory.mktemp("xla_cache"))}


def _final_params_equal(out: pathlib.Path, want, context: str) -> None:
    got = np.load(out)
    assert int(got["step"]) == int(want.step), context
    for name, leaf in zip(parameter_names(want.params), jax.tree.leaves(want.params)):
        assert got[name].tobytes() == np.asarray(leaf).tobytes(), f"{context}: {name}"


# One loop kind by default (stream: the longest path, with its clock and token windows); the other
# two are slow (~20 s each; the suite's 600 s budget), run with JAXNET_SLOW=1.
@pytest.mark.parametrize("mode", [pytest.param("minibatch", marks=pytest.mark.slow),
                                  pytest.param("fullbatch", marks=pytest.mark.slow), "stream"])
def test_sigkill_at_a_random_moment_then_resume_is_bit_identical(tmp_path, mode, worker_env):
    """The run is killed (SIGKILL) at a random moment after its first checkpoint, resumed, and
    compared bit for bit with an uninterrupted run of the same seed (no checkpoints at all)."""
    want = _uninterrupted(mode)
    seed = random.SystemRandom().randrange(2**32)
    delay = random.Random(seed).uniform(0.0, 1.5)
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.npz"
    cmd = [sys.executable, str(WORKER), mode, str(ckpt), str(out), "--every", "5"]
    proc = subprocess.Popen([*cmd, "--delay", str(DELAY[mode])], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=worker_env)
    deadline = time.monotonic() + 120
    while checkpoint.latest_step(ckpt) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    proc.kill()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"seed {seed}: the run ended before the kill: {err.decode()[-2000:]}"
    killed_at = checkpoint.latest_step(ckpt)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=worker_env)
    assert done.returncode == 0, done.stderr[-3000:]
    _final_params_equal(out, want, f"seed {seed}, killed after {delay:.2f} s, resumed from step {killed_at}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_writes_a_checkpoint_at_the_current_step_then_takes_its_course(tmp_path, sig, worker_env):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.npz"
    cmd = [sys.executable, str(WORKER), "minibatch", str(ckpt), str(out)]  # no --every: only the signal's
    proc = subprocess.Popen([*cmd, "--delay", "0.3"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=worker_env)
    assert proc.stdout.readline().startswith(b"record")  # epoch 1 is done: training runs
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -sig, err.decode()[-2000:]
    steps = checkpoint.steps(ckpt)
    assert len(steps) == 1 and 6 <= steps[0] < 72, steps
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=worker_env)
    assert done.returncode == 0, done.stderr[-3000:]
    _final_params_equal(out, _uninterrupted("minibatch"), f"resumed from step {steps[0]}")


def _overflowing_data(row: int):
    """Regression data whose example ``row`` is finite but so large that its squared error is inf."""
    d = make_regression(64, 10, seed=1)
    x = d.x.copy()
    x[row] = 1e30
    return x, d.y


def _make(x):
    return TrainState.create(model=MLP((8, 1)), tx=_adam(), sample_x=x[:1], seed=4)


def test_a_nan_gradient_names_the_step_and_the_parameter():
    """Full batch: step 1 overflows; the parameter named is the first (in tree order) whose
    gradient, computed here on its own, is not finite."""
    x, y = _overflowing_data(5)
    state = _make(x)

    def loss(params):
        return losses.mse(state.apply_fn({"params": params}, x, train=False), y)

    grads = jax.grad(loss)(state.params)
    bad = [name for name, g in zip(parameter_names(grads), jax.tree.leaves(grads)) if not np.isfinite(g).all()]
    assert bad
    with pytest.raises(FloatingPointError, match=r"training diverged: loss became inf at step 1 \(epoch 1\); "
                                                 rf"the first parameter whose gradient is not finite: {re.escape(bad[0])}[;.] "):
        fit(state, (x, y), loss_fn=losses.mse, epochs=3, progress=False)


def test_skip_leaves_out_the_updates_of_an_overflowing_batch(tmp_path):
    """Example 5 overflows: with ``skip`` the one batch per epoch that holds it is left out and
    counted, parameters stay finite, and the run equals one trained without that batch's steps."""
    x, y = _overflowing_data(5)
    result = fit(_make(x), (x, y), loss_fn=losses.mse, epochs=3, batch_size=16, progress=False,
                 on_nonfinite="skip")
    assert result.column("skipped") == [1, 1, 1]
    assert int(result.state.step) == 12
    assert all(np.isfinite(a).all() for a in _arrays(result.state.params))
    assert all(np.isfinite(r["loss"]) for r in result.history)  # means over the steps not skipped


def test_fit_refuses_nan_in_the_data_before_training():
    x, y = _overflowing_data(5)
    x[7, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit(_make(x), (x, y), loss_fn=losses.mse, epochs=1, batch_size=16, progress=False)


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_ones_loadable(tmp_path):
    """SIGKILL while Orbax writes (its temporary folder exists) or right after: every checkpoint
    that counts restores and verifies, and the next save goes through."""
    rng = random.Random(random.SystemRandom().randrange(2**32))
    directory = tmp_path / "ckpt"
    for trial in range(3):
        proc = subprocess.Popen([sys.executable, str(WORKER), "writer", str(directory), "-"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        before = checkpoint.latest_step(directory) or 0
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:  # a new checkpoint, then a write in progress
            if (checkpoint.latest_step(directory) or 0) > before and any("tmp" in p.name for p in directory.iterdir()):
                break
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.05))
        proc.kill()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
        found = checkpoint.steps(directory)
        assert found, f"trial {trial}: no complete checkpoint"
        for step in found:
            assert checkpoint.verify_files(directory, step) == [], (trial, step)
        restored = checkpoint.restore(directory, like=resume_worker.big_state(0))
        step = int(restored["step"])
        assert step == found[-1]
        want = resume_worker.big_state(step)
        assert all(np.array_equal(restored[k], want[k]) for k in ("w", "v"))


def test_a_step_folder_without_the_manifest_does_not_count_and_is_replaced(saved):
    """The window between Orbax's commit and jaxnet's manifest: the folder is not a checkpoint."""
    directory, state, path = saved
    (path / checkpoint.FILES_MANIFEST).unlink()
    assert checkpoint.latest_step(directory) is None
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in"):
        checkpoint.restore(directory, like=state)
    checkpoint.save(directory, state)
    assert checkpoint.latest_step(directory) == 5 and _bits_equal(checkpoint.restore(directory, like=state), state)


def test_an_ignored_signal_stays_ignored_and_others_come_back(tmp_path):
    before_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    before_int = signal.signal(signal.SIGINT, signal.default_int_handler)  # pytest-xdist's workers ignore it
    try:
        with checkpoint.Checkpointer(tmp_path, every=None, keep=None) as ckpt:
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGINT) == ckpt._on_signal
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, before_term)
        signal.signal(signal.SIGINT, before_int)
