"""jaxnet.parallel on four fake CPU devices (tests/conftest.py): meshes from specs, shardings from
the layers' logical axis names, and training under every strategy equal to one device."""
import pathlib
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxnet import losses, optim, parallel
from jaxnet.data import make_regression
from jaxnet.models import MLP, TransformerConfig, TransformerLM
from jaxnet.train import TrainState, checkpoint, fit, fit_stream, parameter_names

sys.path.insert(0, str(pathlib.Path(__file__).parent))
WORKER = pathlib.Path(__file__).parent / "parallel_worker.py"
ROOT = WORKER.parent.parent

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices: tests/conftest.py sets "
                                "--xla_force_host_platform_device_count=4 before JAX starts")

CASES = [("data=4", "dp"), ("data=4", "fsdp"), ("data=2,model=2", "tp"), ("data=2,model=2", "fsdp+tp"),
         ("model=4", "tp")]


def test_mesh_specs():
    assert dict(parallel.make_mesh("data=4").shape) == {"data": 4}
    assert dict(parallel.make_mesh("data=2,model=2").shape) == {"data": 2, "model": 2}
    assert dict(parallel.make_mesh(None).shape) == {"data": jax.device_count()}
    for bad, message in [("data=3", "has 3 devices; this process sees 4"), ("batch=4", "bad part 'batch=4'"),
                         ("data=2,data=2", "bad part 'data=2'"), ("data=0,model=4", "bad part 'data=0'"),
                         ("data", "bad part 'data'")]:
        with pytest.raises(ValueError, match=message):
            parallel.make_mesh(bad)
    with pytest.raises(ValueError, match="unknown strategy 'zero'"):
        parallel.param_shardings({}, {}, parallel.make_mesh(), "zero")


def _norm(spec) -> tuple:
    """A PartitionSpec without its trailing Nones (``P(None, None) == P()`` as shardings)."""
    axes = list(spec)
    while axes and axes[-1] is None:
        axes.pop()
    return tuple(axes)


def _sgd():
    return optim.make_optimizer(optim.OptimizerConfig(name="momentum", learning_rate=0.05))


def _mlp_state(x):
    return TrainState.create(model=MLP((32, 32, 1), dropout_rate=0.1), tx=_sgd(), sample_x=x[:1], seed=0)


EXPECTED_SPECS = {  # what each strategy does to MLP((32, 32, 1))'s three kernels (K, N)
    ("data=4", "dp"): [P(None, None), P(None, None), P(None, None)],
    ("data=4", "fsdp"): [P("data", None), P(None, "data"), P("data", None)],
    ("data=2,model=2", "tp"): [P(None, "model"), P("model", None), P(None, None)],  # N=1 does not divide
    ("data=2,model=2", "fsdp+tp"): [P("data", "model"), P("model", "data"), P("data", None)],
    ("model=4", "tp"): [P(None, "model"), P("model", None), P(None, None)],
}


@pytest.fixture(scope="module")
def one_device():
    """The single-device runs every strategy is compared with, by batch size."""
    d = make_regression(96, 16, seed=1)
    return d, {bs: fit(_mlp_state(d.x), (d.x, d.y), loss_fn=losses.mse, epochs=3, batch_size=bs, progress=False)
               for bs in (16, None)}


@pytest.mark.parametrize("spec, strategy, batch_size", [(*c, 16) for c in CASES] + [("data=2,model=2", "fsdp+tp", None)],
                         ids=[f"{c[0]}-{c[1]}-minibatch" for c in CASES] + ["data=2,model=2-fsdp+tp-fullbatch"])
def test_training_under_each_strategy_equals_one_device_and_is_sharded_as_said(spec, strategy, batch_size, one_device):
    """T updates of momentum SGD (lr 0.05) on a 16-32-32-1 MLP with dropout. The sharded program
    differs from one device's only in the order of its sums: over the batch (split over
    ``data``) and over K (split over ``model``). Reassociating a float32 sum of m terms moves it
    by at most (m - 1) eps sum|terms| (Higham, Accuracy and Stability, 4.2); with m <= 96 and
    the terms' scale ~1 here, each update moves by at most lr * 96 * eps, and T updates with
    momentum 0.9 (a factor <= 10) by at most T * 10 * lr * 96 * eps: the tolerance below.
    A missing or doubled collective changes parameters by the size of an update (~1e-2)."""
    d, refs = one_device
    ref = refs[batch_size]
    out = fit(_mlp_state(d.x), (d.x, d.y), loss_fn=losses.mse, epochs=3, batch_size=batch_size, progress=False,
              mesh=parallel.make_mesh(spec), strategy=strategy)
    steps = int(ref.state.step)
    tol = steps * 10 * 0.05 * 96 * np.finfo(np.float32).eps
    for a, b in zip(jax.tree.leaves(ref.state.params), jax.tree.leaves(out.state.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=tol)
    kernels = [out.state.params[f"layers_{i}"]["kernel"] for i in range(3)]
    want = EXPECTED_SPECS[(spec, strategy)]
    for i, (k, s) in enumerate(zip(kernels, want)):
        assert _norm(k.sharding.spec) == _norm(s), (i, k.sharding.spec, s)
        assert len(k.sharding.device_set) == 4
    mu = out.state.opt_state[0].trace["layers_0"]["kernel"]  # momentum: the optimiser state follows its parameter
    assert _norm(mu.sharding.spec) == _norm(want[0])


def test_a_language_model_under_fsdp_tp_equals_one_device():
    cfg = TransformerConfig(vocab_size=24, block_size=8, num_layers=1, num_heads=2, embed_dim=16, mlp_ratio=2)
    tokens = np.random.default_rng(0).integers(0, 24, 600).astype(np.int32)

    def run(**kw):
        state = TrainState.create(model=TransformerLM(cfg), tx=_sgd(), sample_x=tokens[None, :8], seed=1)
        return fit_stream(state, tokens, steps=4, batch_size=8, block_size=8, log_every=2, progress=False, **kw)

    ref, out = run(), run(mesh=parallel.make_mesh("data=2,model=2"), strategy="fsdp+tp")
    tol = 4 * 10 * 0.05 * 64 * np.finfo(np.float32).eps  # as above, sums of <= 64 terms
    for a, b in zip(jax.tree.leaves(ref.state.params), jax.tree.leaves(out.state.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=tol)
    qkv = out.state.params["trunk"]["block0"]["attn"]["qkv"]["kernel"]
    assert _norm(qkv.sharding.spec) == ("data", "model")


def test_a_checkpoint_saved_under_one_mesh_restores_under_another(tmp_path):
    """Saved by fit under data=4 / fsdp; restored by hand, and resumed by fit, under
    data=2,model=2 / tp: the same bytes, in the new layout."""
    d = make_regression(64, 16, seed=2)
    start = _mlp_state(d.x)
    out = fit(start, (d.x, d.y), loss_fn=losses.mse, epochs=1, batch_size=16, progress=False,
              mesh=parallel.make_mesh("data=4"), strategy="fsdp", checkpoint_dir=tmp_path)
    other = parallel.Layout.for_state(out.state, parallel.make_mesh("data=2,model=2"), "tp", sample_x=d.x[:1])
    restored = checkpoint.restore(tmp_path, like=other.place(out.state))
    for a, b in zip(jax.tree.leaves(out.state.params), jax.tree.leaves(restored.params)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert _norm(restored.params["layers_0"]["kernel"].sharding.spec) == (None, "model")
    resumed = fit(_mlp_state(d.x), (d.x, d.y), loss_fn=losses.mse, epochs=2, batch_size=16, progress=False,
                  mesh=parallel.make_mesh("data=2,model=2"), strategy="tp", checkpoint_dir=tmp_path, resume=True)
    assert int(resumed.state.step) == 8 and [r["epoch"] for r in resumed.history] == [2]
    assert _norm(resumed.state.params["layers_1"]["kernel"].sharding.spec) == ("model",)


@pytest.mark.parametrize("backend, spec, strategy, x_block, w_blocks", [
    ("numba", "data=4", "dp", (4, 16), [(16, 32), (32, 32)]),          # batch 16 split 4 ways, weights whole
    ("numba", "data=4", "fsdp", (4, 16), [(16, 32), (32, 32)]),        # weights gathered before the kernel
    ("numba", "data=2,model=2", "tp", (8, 16), [(16, 16), (16, 32)]),  # column- then row-parallel
    ("pallas", "data=2,model=2", "tp", (8, 16), [(16, 16), (16, 32)]),  # interpret mode on the CPU
])
def test_a_custom_kernel_runs_on_each_block_and_agrees(backend, spec, strategy, x_block, w_blocks, monkeypatch,
                                                       one_device):
    """With a custom kernel each device calls it inside jax.shard_map on its own block
    (the shapes the kernel sees are the blocks'), and training agrees with one device's XLA run
    within the tolerance above (the kernel itself agrees with XLA to the same order)."""
    import kernels

    seen = []
    real = kernels.fused_dense

    def recording(x, w, b=None, **kw):
        seen.append((tuple(x.shape), tuple(w.shape)))
        return real(x, w, b, **kw)

    monkeypatch.setattr(kernels, "fused_dense", recording)
    d, refs = one_device
    state = TrainState.create(model=MLP((32, 32, 1), dropout_rate=0.1, backend=backend), tx=_sgd(),
                              sample_x=d.x[:1], seed=0)
    out = fit(state, (d.x, d.y), loss_fn=losses.mse, epochs=3, batch_size=16, progress=False,
              mesh=parallel.make_mesh(spec), strategy=strategy)
    assert (x_block, w_blocks[0]) in seen and any(w == w_blocks[1] for _, w in seen), seen
    tol = int(out.state.step) * 10 * 0.05 * 96 * np.finfo(np.float32).eps
    for a, b in zip(jax.tree.leaves(refs[16].state.params), jax.tree.leaves(out.state.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=tol)


def test_two_processes_on_loopback_equal_one_process(tmp_path):
    """python -m jaxnet.launch: 2 processes x 2 CPU devices (gloo) train under data=4 / fsdp with
    checkpoints, each passing all the data, then each passing only the half of the rows
    ``parallel.process_shard`` gives it (process_local); both results equal this process's
    4-device run (tolerance as above: the batches are shuffled, so rows in another global order
    would differ by updates), and the checkpoint the job wrote verifies and restores here."""
    import subprocess

    import parallel_worker

    out, ckpt = tmp_path / "out.npz", tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "jaxnet.launch", "--nproc", "2", "--devices-per-process", "2", "--",
           sys.executable, str(WORKER), str(out), str(ckpt)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "[0] process 0 of 2, 2 of 4 devices" in done.stdout and "[1] done 18" in done.stdout
    want = parallel_worker.run(None, parallel.make_mesh("data=4"))
    tol = 18 * 10 * 0.05 * 96 * np.finfo(np.float32).eps
    for path in (out, tmp_path / "out_local.npz"):
        got = np.load(path)
        for name, leaf in zip(parameter_names(want.state.params), jax.tree.leaves(want.state.params)):
            np.testing.assert_allclose(got[name], np.asarray(leaf), rtol=0, atol=tol, err_msg=f"{path.name}: {name}")
    assert checkpoint.steps(ckpt) == [10, 15, 18]
    restored = checkpoint.restore(ckpt, like=want.state)
    got = np.load(out)
    for name, leaf in zip(parameter_names(restored.params), jax.tree.leaves(restored.params)):
        assert np.asarray(leaf).tobytes() == got[name].tobytes(), name


@pytest.mark.parametrize("how, status", [("--die", 3), ("--raise", 1)])
def test_a_process_that_dies_stops_the_job_with_a_clear_message(tmp_path, how, status):
    """A process that crashes (--die) or raises (--raise: without initialize's hook it would wait in
    JAX's shutdown barrier while process 0 waits in a collective, and the job would hang)."""
    import subprocess
    import time

    # Process 0 is left waiting in a collective, where its SIGTERM handler cannot run: the launcher's
    # SIGKILL after --grace-s is what stops it, so a short grace keeps the test short.
    cmd = [sys.executable, "-m", "jaxnet.launch", "--nproc", "2", "--devices-per-process", "2", "--grace-s", "1",
           "--", sys.executable, str(WORKER), str(tmp_path / "out.npz"), str(tmp_path / "ckpt"), how]
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == status, done.stdout[-3000:]
    assert f"[launch] process 1 exited with status {status}; stopping the other 1" in done.stdout
    if how == "--raise":
        assert "RuntimeError: process 1 fails on purpose" in done.stdout + done.stderr
    assert time.monotonic() - start < 120
    assert not (tmp_path / "out.npz").exists()


def test_plan_figures_agree_with_the_model(tmp_path):
    """jaxnet plan on the LM config over data=4 (the 4 fake devices here): XLA's FLOPs match the
    analytic 6N + 12LCT within 10% (elementwise work and the optimiser are the rest); dp moves the
    gradients (an all-reduce of the parameters' bytes), fsdp also gathers the weights; fsdp's
    arguments per device are a quarter of dp's (state split 4 ways, within the replicated rest)."""
    from jaxnet.plan import PlanConfig, plan

    dp = plan(PlanConfig(model="lm", mesh="data=4", strategy="dp", batch_size=8))
    fsdp = plan(PlanConfig(model="lm", mesh="data=4", strategy="fsdp", batch_size=8))
    param_bytes = dp["params"] * 4
    for r in (dp, fsdp):
        assert 1.0 <= r["xla_over_analytic"] <= 1.1, r
        assert r["fits"] and r["per_device_bytes"] > r["per_device_arguments_bytes"] > 0
    assert abs(dp["collective_bytes_per_device"]["all-reduce"] / param_bytes - 1) < 0.05
    assert "all-gather" not in dp["collective_bytes_per_device"]
    assert abs(fsdp["collective_bytes_per_device"]["all-gather"] / param_bytes - 1) < 0.1
    assert fsdp["per_device_arguments_bytes"] < 0.3 * dp["per_device_arguments_bytes"]


def test_plan_command_prints_a_verdict_and_one_json_line():
    import json
    import subprocess

    done = subprocess.run([sys.executable, "-m", "jaxnet.cli", "plan", "--model", "lm", "--mesh", "data=2,model=2",
                           "--strategy", "fsdp+tp", "--batch-size", "4", "--remat", "--device-memory-gb", "0.01"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4 and result["fits"] is False and result["remat"] is True
    assert "does NOT fit in 0.01 GB" in done.stderr and "all-reduce" in done.stderr

def test_plan_command_refuses_a_bad_mesh_before_jax_starts(capsys):
    from jaxnet import cli

    assert cli.main(["plan", "--mesh", "rows=4"]) == 2
    assert "bad part 'rows=4'" in capsys.readouterr().err


def test_process_local_data_in_one_process_is_all_the_data(one_device):
    """One process: its rows are all the rows (split over data=4 instead of replicated); the run
    equals the 4-device run with replicated data. Without a mesh it is refused."""
    d, refs = one_device
    mesh = parallel.make_mesh("data=4")
    a = fit(_mlp_state(d.x), (d.x, d.y), loss_fn=losses.mse, epochs=3, batch_size=16, progress=False, mesh=mesh,
            strategy="fsdp", process_local=True)
    tol = int(a.state.step) * 10 * 0.05 * 96 * np.finfo(np.float32).eps
    for x, y in zip(jax.tree.leaves(refs[16].state.params), jax.tree.leaves(a.state.params)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=tol)
    with pytest.raises(ValueError, match="process_local=True needs a mesh"):
        fit(_mlp_state(d.x), (d.x, d.y), loss_fn=losses.mse, epochs=1, progress=False, process_local=True)


def test_process_local_tokens_in_one_process_are_the_whole_stream():
    """fit_stream(process_local=True) in one process: its tokens are the stream, split over
    data=4 instead of replicated; the run equals the replicated one (tolerance as above)."""
    cfg = TransformerConfig(vocab_size=24, block_size=8, num_layers=1, num_heads=2, embed_dim=16, mlp_ratio=2)
    tokens = np.random.default_rng(0).integers(0, 24, 600).astype(np.int32)

    def run(**kw):
        state = TrainState.create(model=TransformerLM(cfg), tx=_sgd(), sample_x=tokens[None, :8], seed=1)
        return fit_stream(state, tokens, steps=3, batch_size=8, block_size=8, log_every=3, progress=False,
                          mesh=parallel.make_mesh("data=4"), strategy="fsdp", **kw)

    a, b = run(), run(process_local=True)
    tol = 3 * 10 * 0.05 * 64 * np.finfo(np.float32).eps
    for x, y in zip(jax.tree.leaves(a.state.params), jax.tree.leaves(b.state.params)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=tol)
    assert b.history[-1]["epoch"] == a.history[-1]["epoch"]  # epochs over the whole stream


def _fake_mesh(owners, axes):
    """A stand-in for a mesh over several processes (one process cannot make one): ``owners``
    nests the process index of each device in the mesh's layout, ``axes`` names its axes."""
    import types

    owners = np.asarray(owners)
    devices = np.vectorize(lambda i: types.SimpleNamespace(process_index=int(i)), otypes=[object])(owners)
    return types.SimpleNamespace(devices=devices, axis_names=axes, shape=dict(zip(axes, owners.shape)))


@pytest.mark.parametrize("owners, axes", [
    ([0, 0, 1, 1], ("data",)),                  # make_mesh's order: process 0's devices first
    ([0, 1, 0, 1], ("data",)),                  # each process at every other position: two blocks each
    ([[0, 0], [1, 1]], ("data", "model")),      # model inside a process
    ([[0, 1], [0, 1]], ("model", "data")),      # data as the second axis
    ([0, 1, 2], ("data",)),                     # 3 processes
])
def test_process_shard_gives_each_process_the_rows_its_devices_hold(owners, axes, monkeypatch):
    """Each process keeps 1/P of the rows of every array, and putting the processes' parts
    where jax.make_array_from_process_local_data puts them (a process's data positions in
    order, each taking the next block of its rows) gives back the data, row for row."""
    mesh = _fake_mesh(owners, axes)
    data = {"x": np.arange(24.0).reshape(12, 2), "y": np.arange(12) * 10, "tokens": np.arange(24)}
    by_position = np.moveaxis(np.asarray(owners), list(axes).index("data"), 0).reshape(mesh.shape["data"], -1)
    processes = int(np.max(owners)) + 1
    rebuilt = {k: [None] * mesh.shape["data"] for k in data}
    for me in range(processes):
        monkeypatch.setattr(jax, "process_index", lambda me=me: me)
        split = parallel.process_shard(data, mesh, name="train_data")
        assert split.process_local, split.reason
        assert split.reason == f"train_data: each of {processes} processes passes only its own 1/{processes} of the rows"
        mine = [p for p in range(mesh.shape["data"]) if by_position[p, 0] == me]
        for k, a in split.data.items():
            assert len(a) == len(data[k]) // processes
            for i, p in enumerate(np.array_split(np.arange(len(a)), len(mine))):
                rebuilt[k][mine[i]] = a[p]
    for k in data:
        np.testing.assert_array_equal(np.concatenate(rebuilt[k]), data[k])


@pytest.mark.parametrize("owners, axes, rows, reason", [
    ([0, 1, 2], ("data",), 1000, "train_data: 1000 rows do not divide over the mesh's data axis (size 3, on 3 "
                                 "processes): every process holds all rows"),
    ([[0, 1], [0, 1]], ("data", "model"), 8, "the processes share or unevenly hold the data positions of the "
                                             "mesh data=2,model=2: every process holds all rows"),
    ([0, 0, 1], ("data",), 9, "the processes share or unevenly hold the data positions of the mesh data=3"),
    ([[0, 1]], ("data", "model"), 8, "the mesh data=1,model=2 has no data axis across its 2 processes"),
])
def test_process_shard_keeps_all_rows_where_they_cannot_split(owners, axes, rows, reason, monkeypatch):
    """Rows that do not divide, processes that share data positions or hold unequal numbers of
    them, no data axis: every process keeps all the data (the same object), process_local=False,
    and the reason; the result records both."""
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    data = (np.zeros((rows, 3)), np.zeros(rows))
    split = parallel.process_shard(data, _fake_mesh(owners, axes), name="train_data")
    assert split.data is data and not split.process_local and split.reason.startswith(reason)
    assert parallel.run_info(parallel.make_mesh("data=4"), "dp", split) == {
        "mesh": "data=4", "strategy": "dp", "devices": 4, "process_local": False, "data_split": split.reason}


def test_process_shard_in_one_process_is_the_data_unchanged():
    x = np.arange(8.0)
    for mesh, reason in ((parallel.make_mesh("data=4"), "one process: it holds all rows"),
                         (None, "no mesh: one device holds all rows")):
        split = parallel.process_shard((x, x), mesh)
        assert split.data[0] is x and split.process_local is False and split.reason == reason
    with pytest.raises(ValueError, match=r"process_shard: train_data must hold arrays with a row axis; got \[\(\)\]"):
        parallel.process_shard(np.float32(1), None, name="train_data")


@pytest.mark.slow  # ~25 s: two processes start JAX and compile
def test_the_seed_experiment_on_two_processes_reads_half_the_rows_each_and_equals_one_process(tmp_path):
    """python -m jaxnet.launch --nproc 2 -- python -m experiments.seed_simple_net --mesh data=2:
    each process passes fit its 128 of the 256 rows (the result says process_local and why), and
    the final loss and weights equal this process's one-device run. Full-batch SGD (lr 0.01), so
    as in the MLP test above without momentum's factor: each of T updates moves by at most
    lr * 256 * eps (sums over the 256 rows reassociated), and the loss by that (its gradient is
    below 1 here) plus its own sum's 256 * eps * loss. Process 1 holding no rows, or all of
    them twice over, changes the gradient by a percent-level amount."""
    import json
    import subprocess

    from jaxnet import seed

    epochs = 40
    cmd = [sys.executable, "-m", "jaxnet.launch", "--nproc", "2", "--devices-per-process", "1", "--",
           sys.executable, "-m", "experiments.seed_simple_net", "--mesh", "data=2", "--epochs", str(epochs),
           "--log-every", "0", "--workdir", str(tmp_path / "two")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    result = json.loads((tmp_path / "two" / "result.json").read_text())
    assert result["process_local"] is True and result["mesh"] == "data=2", result
    assert result["data_split"] == "train_data: each of 2 processes passes only its own 1/2 of the rows"

    config = seed.SeedConfig(epochs=epochs)
    data = seed.make_data(config)
    one = seed.train_jaxnet(config, data)
    tol = epochs * config.learning_rate * config.n_samples * np.finfo(np.float32).eps
    loss = one.history[-1]["loss"]
    assert abs(result["final_loss"] - loss) <= tol + config.n_samples * np.finfo(np.float32).eps * loss
    weights = pathlib.Path(result["weights"])
    two = checkpoint.restore(weights.parent, like=seed.make_state(config, data), step=int(weights.name))
    for a, b in zip(jax.tree.leaves(one.state.params), jax.tree.leaves(two.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=tol)


class _Bigram(nn.Module):
    """The smallest language model fit_stream trains (quick to compile): ids [B, T] -> logits [B, T, 8]."""

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Embed(8, 8)(x)


_BIGRAM = _Bigram(), _sgd()  # one model and optimiser, so that every run reuses the compiled step


def _bigram_state():
    return TrainState.create(model=_BIGRAM[0], tx=_BIGRAM[1], sample_x=np.zeros((1, 4), np.int32), seed=0)


def test_the_training_loops_wait_for_the_step_max_in_flight_back(monkeypatch):
    """fit and fit_stream, reading no result for 40 steps, wait as they dispatch for the step
    jaxnet.train.pacing.MAX_IN_FLIGHT places back (seen on one device: a wait per step past the
    first MAX_IN_FLIGHT). Unbounded, such a run queued more programs than XLA's CPU client admits
    per device (32), which deadlocked a mesh in one process (issue 18; tests/test_recsys.py runs
    into it on data=4)."""
    from jaxnet.train.pacing import MAX_IN_FLIGHT

    waits = []
    wait = jax.block_until_ready
    monkeypatch.setattr(jax, "block_until_ready", lambda x: waits.append(1) or wait(x))
    d = make_regression(160, 4, seed=0)
    state = TrainState.create(model=MLP((8, 1)), tx=_sgd(), sample_x=d.x[:1], seed=0)
    out = fit(state, (d.x, d.y), loss_fn=losses.mse, epochs=1, batch_size=4, progress=False)
    assert int(out.state.step) == 40 and len(waits) >= 40 - MAX_IN_FLIGHT
    waits.clear()
    tokens = np.arange(200) % 8
    run = fit_stream(_bigram_state(), tokens, steps=40, batch_size=2, block_size=4, log_every=40, progress=False)
    assert int(run.state.step) == 40 and len(waits) >= 40 - MAX_IN_FLIGHT


class _Clock:
    """Stands in for the time module in jaxnet.train.stream: each reading is ``tick`` s later."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


def test_a_time_budget_stops_every_process_at_process_0s_step(monkeypatch):
    """fit_stream(budget_s=) on two processes whose clocks disagree, simulated in one: process 1's
    clock reads 3x process 0's seconds, and its broadcasts (jaxnet.train.stream.agree) return what
    process 0 broadcast at the same call. Both hand every update the same fraction and stop after
    the same step; process 1 on its own clock stops sooner (then process 0, still training, waited
    in its next collective for good)."""
    from jaxnet.train import stream

    tokens, sent = np.arange(200) % 8, []

    def run(tick, agree):
        monkeypatch.setattr(stream, "time", _Clock(tick))
        monkeypatch.setattr(stream, "agree", agree)
        fractions = []
        out = fit_stream(_bigram_state(), tokens, steps=10**4, batch_size=2, block_size=4, log_every=4,
                         budget_s=1.0, before_step=lambda s, f: fractions.append(f) or s, progress=False)
        return int(out.state.step), fractions, out

    def process_0(values):
        sent.append(np.asarray(values, np.float64))
        return sent[-1]

    steps0, fractions0, out0 = run(0.05, process_0)
    from_0 = iter(sent)
    steps1, fractions1, out1 = run(0.15, lambda values: next(from_0))
    assert next(from_0, None) is None  # process 1 took part in every broadcast process 0 made
    assert out0.stopped_by_time and out1.stopped_by_time and 4 < steps0 < 10**4
    assert (steps1, fractions1, out1.train_s) == (steps0, fractions0, out0.train_s)
    alone, _, _ = run(0.15, lambda values: np.asarray(values, np.float64))
    assert alone < steps0


@pytest.mark.slow  # ~20 s: two processes start JAX and compile
def test_a_time_budget_on_two_processes_with_skewed_clocks_stops_both_after_one_step():
    """python -m jaxnet.launch --nproc 2 -- python tests/budget_worker.py: fit_stream(budget_s=2)
    under data=4 with process 1's clock 3x as fast as process 0's. Both stop after the same step
    with the same fractions (process 0's clock decided); each on its own clock, process 1 stopped
    about 3x sooner and process 0 waited in its next collective for good (the timeout below)."""
    import os
    import re
    import signal
    import subprocess

    cmd = [sys.executable, "-m", "jaxnet.launch", "--nproc", "2", "--devices-per-process", "2", "--",
           sys.executable, str(WORKER.parent / "budget_worker.py"), "2"]
    job = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)  # its own process group: a hung job is killed whole
    try:
        out, _ = job.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        out, _ = job.communicate()
    ends = dict(re.findall(r"^\[(\d)\] process \1: (\d+ steps, fractions \w+)$", out, re.M))
    assert len(ends) == 2 and ends["0"] == ends["1"], out[-3000:]
    assert job.returncode == 0, out[-3000:]


def test_fetch_is_put_undone_on_one_process():
    """``parallel.fetch`` gives the whole array back as NumPy, whatever its layout on the mesh
    (the several-process gather: test_two_processes_on_loopback_equal_one_process)."""
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = parallel.make_mesh("data=2,model=2")
    x = np.arange(24, dtype=np.float32).reshape(4, 6)
    for spec in (PartitionSpec("data"), PartitionSpec(None, "model"), PartitionSpec()):
        got = parallel.fetch(parallel.put(x, NamedSharding(mesh, spec)))
        assert isinstance(got, np.ndarray)
        np.testing.assert_array_equal(got, x)
