"""``backend="auto"`` on the CPU (``kernels.autotune``): the backend measured fastest per shape bucket
and mode, correct in values and gradients, measured once and read back from disk, keyed by the
machine and versions, never trusting a corrupted table; ``JAXNET_AUTO=rank`` keeps the static rule.

Every test but the first fakes the timing (``kernels.timing``), so the choices are known and
nothing is compiled to be timed; each writes its table into its own ``tmp_path``.
"""
from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import core  # trace_state_clean: whether a trace is active in this thread

import kernels
from jaxnet.testing.tolerances import FusedDenseBounds
from kernels import autotune, dispatch, machine, reference, timing

CPU = dispatch.auto_candidates("cpu")  # ["xla", "numba"]: the preferred first


@pytest.fixture(autouse=True)
def tuning_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(machine.TUNING_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(autotune.POLICY_ENV, raising=False)
    autotune.forget()
    yield tmp_path
    autotune.forget()


@pytest.fixture
def fake_timing(monkeypatch):
    """Measurements that run nothing: ``times["numba fwd"]`` etc. are every sample; ``calls``
    counts the buckets measured, ``rounds`` the sampling rounds taken."""
    state = {"calls": 0, "rounds": 0, "times": {}, "traced": []}

    def samples(samplers, repeats, warmup=0):
        state["rounds"] += repeats
        state["traced"].append(not core.trace_state_clean())
        return {name: [state["times"][name]] * repeats for name in samplers}

    monkeypatch.setattr(timing, "timed_call", lambda fn, args, **kw: lambda: 0.0)
    monkeypatch.setattr(timing, "interleaved_samples", samples)
    _count_measurements(monkeypatch, state)
    return state


def _count_measurements(monkeypatch, state):
    measure = autotune._measure

    def counted(*args):
        state["calls"] += 1
        return measure(*args)

    monkeypatch.setattr(autotune, "_measure", counted)


def _new_process(monkeypatch):
    """As a process started now: nothing in memory, and every stored entry measured before it."""
    autotune.forget()
    monkeypatch.setattr(autotune, "_STARTED", time.time() + 1e-3)


def _times(fwd: dict, train: dict) -> dict:
    return {f"{be} {mode}": t[be] for mode, t in (("fwd", fwd), ("fwd+bwd", train)) for be in t}


def _uses_numba(fn, *args) -> bool:
    """Whether tracing ``fn`` now (a fresh wrapper: no trace cached) calls a numba kernel."""
    return "jaxnet_numba_fused_dense" in str(jax.make_jaxpr(lambda *a: fn(*a))(*args))


def test_auto_runs_a_measured_backend_and_matches_the_reference(monkeypatch):
    calls = {"calls": 0}
    _count_measurements(monkeypatch, calls)
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (2, 5, 24))  # M = 10 rows
    w, b = jax.random.normal(keys[1], (24, 12)) / 5, jax.random.normal(keys[2], (12,))
    bounds = FusedDenseBounds.from_inputs(np.asarray(x), np.asarray(w), np.asarray(b), "relu")
    dy = jnp.where(bounds.kink_mask(), 0.0, jax.random.normal(keys[3], (2, 5, 12)))

    def fwd_bwd(fn):
        y, vjp = jax.vjp(fn, x, w, b)
        return y, vjp(dy)

    # Measured inside the trace of the caller's jit, on first use of the bucket.
    y, (gx, gw, gb) = jax.jit(lambda: fwd_bwd(lambda x, w, b: kernels.fused_dense(x, w, b)))()
    assert calls["calls"] == 1
    choice = autotune.entry(10, 24, 12, "float32", "relu", CPU)
    assert {choice["fwd"], choice["fwd+bwd"]} <= set(kernels.available_backends())
    assert set(choice["us"]) == set(CPU) and all(t > 0 for c in choice["us"].values() for t in c.values())
    y_ref, (gx_ref, gw_ref, gb_ref) = fwd_bwd(reference.fused_dense)
    assert np.all(np.abs(np.asarray(y) - y_ref) <= bounds.forward(y_ref))
    tols = bounds.grads(np.asarray(dy), {"x": gx_ref, "w": gw_ref, "b": gb_ref})
    for name, got, want in (("x", gx, gx_ref), ("w", gw, gw_ref), ("b", gb, gb_ref)):
        assert np.all(np.abs(np.asarray(got) - np.asarray(want)) <= tols[name]), name
    # Another shape of the same bucket (M = 12 -> 16) reuses the measurement.
    kernels.fused_dense(jnp.ones((12, 24)), w, b).block_until_ready()
    assert calls["calls"] == 1


def test_choice_per_mode_is_the_fastest_and_ties_go_to_the_preferred(fake_timing):
    fake_timing["times"] = _times({"xla": 2.0, "numba": 1.0}, {"xla": 1.0, "numba": 0.99})
    assert autotune.choose(64, 64, 64, "float32", "relu", CPU, mode="fwd") == "numba"
    assert autotune.choose(64, 64, 64, "float32", "relu", CPU) == "xla"  # 1% faster: within MARGIN
    assert fake_timing["calls"] == 1  # one measurement serves both modes
    assert fake_timing["rounds"] == autotune.REPEATS + autotune.MORE_REPEATS  # 1% apart: a close call
    with pytest.raises(ValueError, match="mode"):
        autotune.choose(64, 64, 64, "float32", "relu", CPU, mode="train")
    with pytest.raises(ValueError, match="candidates"):
        autotune.choose(64, 64, 64, "float32", "relu", [])


def test_auto_runs_each_mode_s_choice_through_jit_grad_and_jvp(fake_timing):
    fake_timing["times"] = _times({"xla": 2.0, "numba": 1.0}, {"xla": 1.0, "numba": 2.0})
    x, w, b = jnp.ones((8, 16)), jnp.full((16, 4), 0.1), jnp.arange(4.0) - 2  # z = 1.6 + b: off relu's kink
    f = lambda x, w, b: kernels.fused_dense(x, w, b)  # noqa: E731
    assert _uses_numba(f, x, w, b)  # forward alone: numba
    loss = lambda x, w, b: jnp.sum(f(x, w, b) ** 2)  # noqa: E731
    assert not _uses_numba(jax.grad(loss, (0, 1, 2)), x, w, b)  # differentiated: xla
    ref = lambda x, w, b: jnp.sum(reference.fused_dense(x, w, b) ** 2)  # noqa: E731
    for got, want in zip(jax.jit(jax.grad(loss, (0, 1, 2)))(x, w, b), jax.grad(ref, (0, 1, 2))(x, w, b)):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    t = jax.jvp(lambda x: f(x, w, b), (x,), (x,))[1]
    np.testing.assert_allclose(t, jax.jvp(lambda x: reference.fused_dense(x, w, b), (x,), (x,))[1],
                               rtol=2e-5, atol=2e-5)
    assert fake_timing["calls"] == 1


def test_a_bucket_first_met_while_tracing_is_timed_outside_the_trace(fake_timing):
    # Timed inside the caller's trace, every jitted call takes JAX's slow dispatch: numba's
    # layer measured 2-3x slower there and lost buckets it wins (docs/benchmarks.md).
    fake_timing["times"] = _times({"xla": 2.0, "numba": 1.0}, {"xla": 2.0, "numba": 1.0})
    x, w, b = jnp.ones((8, 5)), jnp.ones((5, 3)), jnp.ones((3,))
    y = jax.jit(lambda x, w, b: kernels.fused_dense(x, w, b, backend="auto"))(x, w, b)
    np.testing.assert_allclose(y, np.full((8, 3), 6.0))
    assert fake_timing["calls"] == 1 and fake_timing["traced"] == [False]


def test_the_table_is_read_back_from_disk_once_a_second_process_confirmed_it(fake_timing, tuning_dir,
                                                                              monkeypatch):
    fake_timing["times"] = _times({"xla": 2.0, "numba": 1.0}, {"xla": 2.0, "numba": 1.0})
    assert autotune.choose(100, 30, 7, "float32", "gelu", CPU) == "numba"
    path, = tuning_dir.glob(f"{autotune.KIND}-*.json")
    stored = json.loads(path.read_text())["value"]
    assert stored["128x30x7 float32 gelu"]["us"]["numba"] == {"fwd": 1e6, "fwd+bwd": 1e6}
    assert stored["128x30x7 float32 gelu"]["measurements"] == 1
    _new_process(monkeypatch)  # as a new process: nothing in memory, the entry measured once: measured again
    assert autotune.choose(128, 30, 7, "float32", "gelu", CPU) == "numba" and fake_timing["calls"] == 2
    _new_process(monkeypatch)  # a third process reads the confirmed entry
    fake_timing["times"] = _times({"xla": 1.0, "numba": 2.0}, {"xla": 1.0, "numba": 2.0})
    assert autotune.choose(128, 30, 7, "float32", "gelu", CPU) == "numba"  # the stored choice
    assert fake_timing["calls"] == 2
    assert autotune.choose(128, 30, 7, "bfloat16", "gelu", CPU) == "xla"  # another bucket: measured
    assert fake_timing["calls"] == 3
    assert autotune.choose(128, 30, 8, "float32", "gelu", CPU) == "xla"  # another N: measured
    assert fake_timing["calls"] == 4


def test_entries_are_keyed_by_machine_and_versions(fake_timing, monkeypatch):
    fake_timing["times"] = _times({"xla": 2.0, "numba": 1.0}, {"xla": 2.0, "numba": 1.0})
    autotune.choose(64, 64, 64, "float32", "relu", CPU)
    assert "64x64x64 float32 relu" in machine.TuningCache(autotune.KIND).get()
    other = dataclasses.replace(machine.describe(), model="Other CPU", l2=3 << 20)
    assert machine.TuningCache(autotune.KIND, machine=other).get() is None
    monkeypatch.setattr(machine, "versions", lambda: {"jaxnet": "9.9", "jax": "0.0", "jaxlib": "0.0", "numba": "0.0"})
    assert machine.TuningCache(autotune.KIND).get() is None
    autotune.forget()
    autotune.choose(64, 64, 64, "float32", "relu", CPU)  # other versions: measured again
    assert fake_timing["calls"] == 2
    monkeypatch.setattr(machine, "sources_digest", lambda: "an edited kernel")
    assert machine.TuningCache(autotune.KIND).get() is None
    autotune.forget()
    autotune.choose(64, 64, 64, "float32", "relu", CPU)  # the same versions, other sources: measured again
    assert fake_timing["calls"] == 3


def test_the_sources_digest_follows_every_python_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    digest = machine.sources_digest.__wrapped__
    first = digest(tmp_path)
    assert digest(tmp_path) == first
    (tmp_path / "notes.txt").write_text("not source")
    assert digest(tmp_path) == first
    (tmp_path / "sub" / "b.py").write_text("y = 3\n")
    edited = digest(tmp_path)
    assert edited != first
    (tmp_path / "sub" / "c.py").write_text("")
    assert digest(tmp_path) != edited
    (tmp_path / "sub" / "c.py").unlink()
    (tmp_path / "sub" / "b.py").rename(tmp_path / "sub" / "d.py")  # the same bytes under another name
    assert digest(tmp_path) != edited
    assert len(machine.sources_digest()) == 16


@pytest.mark.parametrize("damage", ["not json", "bad entry", "other candidates", "bad times"])
def test_a_corrupted_table_is_measured_again_not_trusted(fake_timing, damage):
    fake_timing["times"] = _times({"xla": 2.0, "numba": 1.0}, {"xla": 2.0, "numba": 1.0})
    autotune.choose(64, 64, 64, "float32", "relu", CPU)
    cache = machine.TuningCache(autotune.KIND)
    if damage == "not json":
        cache.path.write_text('{"key": {"kind": ')
    else:
        value = cache.get()
        entry = value["64x64x64 float32 relu"]
        entry.update({"bad entry": {"fwd+bwd": "bogus"}, "other candidates": {"candidates": ["numba", "pallas", "xla"]},
                      "bad times": {"us": {"xla": {"fwd": 1.0, "fwd+bwd": -1.0}, "numba": {"fwd": 1.0}}}}[damage])
        cache.put(value)
    autotune.forget()
    fake_timing["times"] = _times({"xla": 1.0, "numba": 2.0}, {"xla": 1.0, "numba": 2.0})
    assert autotune.choose(64, 64, 64, "float32", "relu", CPU) == "xla"  # the new measurement
    assert fake_timing["calls"] == 2
    assert cache.get()["64x64x64 float32 relu"]["fwd+bwd"] == "xla"  # and the file mended


def test_rank_policy_keeps_the_static_rule_and_measures_nothing(fake_timing, monkeypatch):
    fake_timing["times"] = _times({"xla": 2.0, "numba": 1.0}, {"xla": 2.0, "numba": 1.0})
    x, w = jnp.ones((64, 64)), jnp.ones((64, 64))
    f = lambda x, w: kernels.fused_dense(x, w)  # noqa: E731
    monkeypatch.setenv(autotune.POLICY_ENV, "rank")
    assert dispatch.auto_choice(64, 64, 64, "float32", "relu") == ("xla", "xla")
    assert not _uses_numba(f, x, w) and not _uses_numba(jax.grad(lambda x: f(x, w).sum()), x)
    assert fake_timing["calls"] == 0
    monkeypatch.setenv(autotune.POLICY_ENV, "measure")
    assert _uses_numba(f, x, w) and fake_timing["calls"] == 1
    monkeypatch.setenv(autotune.POLICY_ENV, "fastest")
    with pytest.raises(ValueError, match="JAXNET_AUTO"):
        f(x, w)


def test_every_call_is_measured_again_by_the_next_process(fake_timing, tuning_dir, monkeypatch):
    """numba 20% slower than xla in the first process (a load on it, say) and 30% faster in the
    next: the next one measures again and each backend keeps its faster median; a third reads
    the confirmed entry. A clear call too: numba 3x slower in one process (a slow spell of the
    thread handoffs it shares its work with: docs/benchmarks.md) and 2x faster in the next."""
    fake_timing["times"] = _times({"xla": 1.0, "numba": 1.2}, {"xla": 1.0, "numba": 1.2})
    assert autotune.choose(256, 64, 128, "float32", "relu", CPU) == "xla"
    _new_process(monkeypatch)  # a new process
    fake_timing["times"] = _times({"xla": 1.1, "numba": 0.7}, {"xla": 0.9, "numba": 0.7})
    assert autotune.choose(256, 64, 128, "float32", "relu", CPU) == "numba"
    assert fake_timing["calls"] == 2
    stored = machine.TuningCache(autotune.KIND).get()["256x64x128 float32 relu"]
    assert stored["measurements"] == autotune.CONFIRMATIONS == 2
    assert stored["us"] == {"xla": {"fwd": 1e6, "fwd+bwd": 0.9e6}, "numba": {"fwd": 0.7e6, "fwd+bwd": 0.7e6}}
    _new_process(monkeypatch)
    fake_timing["times"] = _times({"xla": 0.5, "numba": 2.0}, {"xla": 0.5, "numba": 2.0})
    assert autotune.choose(256, 64, 128, "float32", "relu", CPU) == "numba" and fake_timing["calls"] == 2

    fake_timing["times"] = _times({"xla": 1.0, "numba": 3.0}, {"xla": 1.0, "numba": 3.0})
    assert autotune.choose(64, 64, 64, "float32", "relu", CPU) == "xla" and fake_timing["calls"] == 3
    assert autotune.choose(64, 64, 64, "float32", "relu", CPU) == "xla" and fake_timing["calls"] == 3  # in memory
    _new_process(monkeypatch)
    fake_timing["times"] = _times({"xla": 1.0, "numba": 0.5}, {"xla": 1.0, "numba": 0.5})
    assert autotune.choose(64, 64, 64, "float32", "relu", CPU) == "numba" and fake_timing["calls"] == 4
    _new_process(monkeypatch)
    assert autotune.choose(64, 64, 64, "float32", "relu", CPU) == "numba" and fake_timing["calls"] == 4


def test_an_entry_measured_since_this_process_started_is_used_as_it_is(fake_timing, monkeypatch):
    """Measured once by a process running beside this one (a launch's other rank, say): used as it
    is, so both run the same backend; a process started later measures it again."""
    fake_timing["times"] = _times({"xla": 1.0, "numba": 3.0}, {"xla": 1.0, "numba": 3.0})
    assert autotune.choose(64, 64, 64, "float32", "relu", CPU) == "xla"
    autotune.forget()  # this process's memory gone, its start time kept: the entry is from beside it
    fake_timing["times"] = _times({"xla": 1.0, "numba": 0.5}, {"xla": 1.0, "numba": 0.5})
    assert autotune.choose(64, 64, 64, "float32", "relu", CPU) == "xla" and fake_timing["calls"] == 1
    _new_process(monkeypatch)
    assert autotune.choose(64, 64, 64, "float32", "relu", CPU) == "numba" and fake_timing["calls"] == 2


def test_a_table_that_cannot_be_stored_is_still_used_and_a_warning_says_so(fake_timing, tmp_path, monkeypatch):
    blocked = tmp_path / "a file"  # the tuning folder's path is a file: nothing under it can be written
    blocked.write_text("")
    monkeypatch.setenv(machine.TUNING_DIR_ENV, str(blocked))
    fake_timing["times"] = _times({"xla": 2.0, "numba": 1.0}, {"xla": 2.0, "numba": 1.0})
    with pytest.warns(RuntimeWarning, match="cannot store kernels.autotune's dispatch table in .*a file"):
        assert autotune.choose(64, 64, 64, "float32", "relu", CPU) == "numba"
    assert autotune.choose(64, 64, 64, "float32", "relu", CPU) == "numba" and fake_timing["calls"] == 1  # in memory


def test_only_a_close_call_takes_more_samples(fake_timing):
    """Two candidates 40% apart in both modes: REPEATS rounds decide; 5% apart in one mode: more."""
    fake_timing["times"] = _times({"xla": 1.4, "numba": 1.0}, {"xla": 1.0, "numba": 1.4})
    assert autotune.choose(64, 64, 64, "float32", "relu", CPU, mode="fwd") == "numba"
    assert fake_timing["rounds"] == autotune.REPEATS
    fake_timing["times"] = _times({"xla": 1.4, "numba": 1.0}, {"xla": 1.0, "numba": 1.05})
    assert autotune.choose(128, 64, 64, "float32", "relu", CPU) == "xla"
    assert fake_timing["rounds"] == 2 * autotune.REPEATS + autotune.MORE_REPEATS


def test_a_batch_of_models_is_measured_in_its_own_bucket_and_runs_its_choice(fake_timing, tuning_dir):
    # One model: numba is faster; a batch of models' weights: xla (as for the sweeps of tiny MLPs).
    fake_timing["times"] = _times({"xla": 2.0, "numba": 1.0}, {"xla": 2.0, "numba": 1.0})
    assert dispatch.auto_choice(64, 10, 5, "float32", "relu") == ("numba", "numba")
    fake_timing["times"] = _times({"xla": 1.0, "numba": 2.0}, {"xla": 1.0, "numba": 2.0})
    with dispatch.models_batched(100):
        assert dispatch.auto_choice(64, 10, 5, "float32", "relu") == ("xla", "xla")
    assert dispatch.auto_choice(64, 10, 5, "float32", "relu") == ("numba", "numba")  # one model's entry kept
    assert fake_timing["calls"] == 2
    table = json.loads(next(tuning_dir.rglob("*.json")).read_text())
    assert "64x10x5 float32 relu fused_dense_models128" in str(table)  # 100 models: the bucket of 128
    x, w, b = jnp.ones((64, 10)), jnp.full((3, 10, 5), 0.1), jnp.zeros((3, 5))
    batched = jax.vmap(lambda w, b: kernels.fused_dense(x, w, b), in_axes=(0, 0))
    assert _uses_numba(batched, w, b)
    with dispatch.models_batched(3):  # 3 models: a bucket of 4, measured (xla) when first met
        assert not _uses_numba(batched, w, b)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="size"):
            with dispatch.models_batched(bad):
                pass


def test_auto_over_a_batch_of_models_matches_the_reference():
    keys = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(keys[0], (6, 7))  # shared by the models, as a sweep's data
    w, b = jax.random.normal(keys[1], (3, 7, 4)) / 3, jax.random.normal(keys[2], (3, 4))
    dy = jax.random.normal(keys[3], (3, 6, 4))

    def fwd_bwd(fn):
        def one(w, b, dy):
            y, vjp = jax.vjp(lambda w, b: fn(x, w, b), w, b)
            return y, vjp(dy)
        return jax.vmap(one)(w, b, dy)

    with dispatch.models_batched(3):  # measured for real, inside the trace
        y, (gw, gb) = jax.jit(lambda: fwd_bwd(kernels.fused_dense))()
    y_ref, (gw_ref, gb_ref) = fwd_bwd(reference.fused_dense)
    for i in range(3):
        bounds = FusedDenseBounds.from_inputs(np.asarray(x), np.asarray(w[i]), np.asarray(b[i]), "relu")
        dyi = np.where(bounds.kink_mask(), 0.0, np.asarray(dy[i]))
        assert np.array_equal(dyi, dy[i]), "a draw on relu's kink: pick another key"
        assert np.all(np.abs(np.asarray(y[i]) - y_ref[i]) <= bounds.forward(y_ref[i]))
        tols = bounds.grads(dyi, {"w": gw_ref[i], "b": gb_ref[i]})
        assert np.all(np.abs(np.asarray(gw[i]) - gw_ref[i]) <= tols["w"])
        assert np.all(np.abs(np.asarray(gb[i]) - gb_ref[i]) <= tols["b"])
    entry = autotune.entry(6, 7, 4, "float32", "relu", CPU, op=autotune.model_batch_op(3))
    assert {entry["fwd"], entry["fwd+bwd"]} <= set(CPU) and set(entry["us"]) == set(CPU)


def test_fit_many_picks_auto_s_backends_for_its_batch_of_models(fake_timing, tuning_dir):
    import optax

    from jaxnet import losses
    from jaxnet.models import SimpleNet
    from jaxnet.train import TrainState, fit_many

    fake_timing["times"] = _times({"xla": 1.0, "numba": 2.0}, {"xla": 1.0, "numba": 2.0})
    x, y = jax.random.normal(jax.random.key(0), (16, 10)), jnp.ones((16, 1))
    model, tx = SimpleNet(backend="auto"), optax.sgd(0.01)
    runs = fit_many(lambda s: TrainState.create(model=model, tx=tx, sample_x=x[:1], seed=s), (x, y), seeds=range(3),
                    loss_fn=losses.mse, epochs=2, progress=False)
    assert len(runs) == 3 and all(np.isfinite(r.history[-1]["loss"]) for r in runs)
    table = str(json.loads(next(tuning_dir.rglob("*.json")).read_text()))
    # The training program's two layers, traced for the chunk of 3 models (a bucket of 4).
    assert "16x10x5 float32 relu fused_dense_models4" in table
    assert "16x5x1 float32 identity fused_dense_models4" in table
