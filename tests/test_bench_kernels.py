"""experiments.bench_kernels (the dtype it times is the dtype asked for, the spread over runs, the numba parameters it
records) and kernels.timing."""
import subprocess
import sys

import jax.numpy as jnp
import pytest

from experiments import bench_kernels

CHECK = """
from experiments import bench_kernels as bk
config = bk.Config(dtype="float64")
bk.prepare_dtype(config)
print(*(a.dtype for a in bk._problem((4, 3, 2), config)))
"""


def test_float64_problems_are_float64_not_truncated():
    # In a subprocess: float64 turns on jax_enable_x64 for the whole process.
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["float64"] * 4, out.stdout + out.stderr


def test_unsupported_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="bfloat16"):
        bench_kernels.prepare_dtype(bench_kernels.Config(dtype="bfloat16"))


def _rows(ratio_small, ratio_mid, t_small):
    """Two shapes' rows as ``run`` writes them (numba only), with the given ratios."""
    rows = []
    for (m, k, n), ratio, t in (((64, 64, 64), ratio_small, t_small), ((1024, 1024, 1024), ratio_mid, 5000.0)):
        for mode in ("fwd", "fwd+bwd"):
            rows.append({"M": m, "K": k, "N": n, "mode": mode, "xla_us": t * ratio, "xla_gflops": 1.0,
                         "numba_us": t, "numba_gflops": 2.0, "numba_vs_xla": ratio})
    return rows


def test_several_runs_report_each_ratio_s_spread_the_worst_run_and_the_medians():
    config = bench_kernels.Config()
    runs = [_rows(1.05, 0.97, 16.0), _rows(0.98, 0.99, 15.0), _rows(1.10, 0.95, 17.0)]
    overheads = [{"numba": 4.4, "xla": 4.6, "xla_tiny_op": 3.5, "pure_callback": 85.0}] * 2 + [
        {"numba": 4.9, "xla": 4.6, "xla_tiny_op": 3.5, "pure_callback": 85.0}]
    rows = bench_kernels.spread(runs, config)
    small = next(r for r in rows if (r["M"], r["mode"]) == (64, "fwd+bwd"))
    assert (small["numba_vs_xla_min"], small["numba_vs_xla_median"], small["numba_vs_xla_max"]) == (0.98, 1.05, 1.10)
    assert small["numba_us"] == 16.0
    table = bench_kernels.spread_table(rows, config, 3)
    assert "| 64 | 64 | 64 | fwd+bwd | " in table and "0.98x / 1.05x / 1.10x" in table
    summary = bench_kernels.summarize_runs(runs, overheads, {}, config)
    assert summary["runs"] == 3
    assert summary["numba_fwd+bwd_min_vs_xla_small_per_run"] == [1.05, 0.98, 1.10]
    assert summary["numba_fwd+bwd_min_vs_xla_small"] == 0.98  # the worst run
    assert summary["numba_fwd+bwd_min_vs_xla_512_2048"] == 0.95
    assert summary["numba_overhead_vs_xla_tiny_op"] == round(4.9 / 3.5, 3)  # the worst: the largest
    # Over each shape's median ratio: 64^3's runs 1.05, 0.98, 1.10 -> 1.05; 1024^3's 0.97, 0.99, 0.95 -> 0.97.
    assert summary["numba_fwd+bwd_min_vs_xla_small_of_medians"] == 1.05
    assert summary["numba_fwd+bwd_min_vs_xla_512_2048_of_medians"] == 0.97
    assert summary["numba_fwd_geomean_vs_xla_of_medians"] == round((1.05 * 0.97) ** 0.5, 3)


def test_auto_s_worst_over_the_medians_of_runs():
    config = bench_kernels.Config(backends=("numba", "auto"))

    def rows(auto_vs_best, choice_vs_best):
        return [{"M": 512, "K": 512, "N": 512, "mode": mode, "xla_gflops": 1.0, "numba_gflops": 1.0,
                 "auto_gflops": 1.0, "numba_vs_xla": 1.0, "auto_vs_xla": 1.0, "auto_runs": "numba",
                 "auto_vs_best": auto_vs_best, "choice_vs_best": choice_vs_best} for mode in ("fwd", "fwd+bwd")]

    runs = [rows(0.90, 0.93), rows(1.00, 0.99), rows(0.97, 1.00)]
    overheads = [{"numba": 4.4, "xla": 4.6, "xla_tiny_op": 3.5, "pure_callback": 85.0}] * 3
    summary = bench_kernels.summarize_runs(runs, overheads, {}, config)
    assert summary["auto_vs_best_min"] == 0.90 and summary["auto_choice_vs_best_min"] == 0.93  # the worst run
    assert summary["auto_vs_best_min_of_medians"] == 0.97
    assert summary["auto_choice_vs_best_min_of_medians"] == 0.99
    assert summary["auto_fwd+bwd_min_vs_best_of_medians"] == 0.97


def test_runs_must_be_positive():
    with pytest.raises(ValueError, match="--runs"):
        bench_kernels.main(["--runs", "0"])


def test_interleaved_samples_take_turns_and_drop_the_warm_up():
    from kernels import timing

    calls = []

    def sampler(name, values):
        it = iter(values)
        return lambda: (calls.append(name), next(it))[1]

    rounds = []
    samplers = {"a": sampler("a", [9.0, 1.0, 3.0, 2.0]), "b": sampler("b", [8.0, 5.0, 4.0, 6.0])}
    times = timing.interleaved_samples(samplers, repeats=3, warmup=1,
                                       after_round=lambda r, t: rounds.append((r, len(t["b"]))))
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # in turn, round by round, orders balanced
    assert times == {"a": [1.0, 3.0, 2.0], "b": [5.0, 4.0, 6.0]}  # the warm-up round dropped
    assert rounds == [(0, 1), (1, 2), (2, 3)]
    assert timing.interleaved_medians({"a": sampler("a", [7.0, 1.0, 3.0, 2.0])}, repeats=3, warmup=1) == {"a": 2.0}
    assert timing.median_of(sampler("c", [4.0, 6.0, 5.0]), repeats=3) == 5.0


@pytest.mark.parametrize("n", range(1, 10))
def test_balanced_orders_put_every_sampler_everywhere_and_after_every_other_equally_often(n):
    from collections import Counter

    from kernels import timing

    orders = timing.balanced_orders(n)
    assert len(orders) == (2 * n if n % 2 and n > 1 else n)
    assert all(sorted(order) == list(range(n)) for order in orders)  # each round samples each once
    positions = Counter((i, s) for order in orders for i, s in enumerate(order))
    assert set(positions.values()) == {len(orders) // n} and len(positions) == n * n
    follows = Counter(pair for order in orders for pair in zip(order, order[1:]))
    assert len(follows) == n * (n - 1) and len(set(follows.values())) <= 1  # every ordered pair, equally often


def test_interleaved_samples_do_not_always_take_one_sampler_after_the_same_other():
    from kernels import timing

    calls = []
    samplers = {name: (lambda name=name: (calls.append(name), 0.0)[1]) for name in "abc"}
    timing.interleaved_samples(samplers, repeats=6)
    before = {name: {p for p, c in zip(calls, calls[1:]) if c == name} for name in "abc"}
    assert all(before[name] >= set("abc") - {name} for name in "abc"), calls


def test_median_seconds_waits_for_each_call_after_at_least_one_warm_up():
    from kernels import timing

    calls = []

    def fn(x):
        calls.append(x)
        return jnp.asarray(x)

    t = timing.median_seconds(fn, (1.0,), repeats=4, warmup=0)
    assert len(calls) == 5 and t >= 0  # warm-up 0 still compiles once
    calls.clear()
    timing.median_seconds(fn, (1.0,), repeats=2, warmup=3)
    assert len(calls) == 5
    calls.clear()
    sample = timing.timed_call(fn, (1.0,), min_sample_s=0.0)
    assert calls == [] and sample() >= 0 and len(calls) == 1


def test_auto_is_compared_with_the_best_other_backend_per_shape_and_the_worst_is_summarized(monkeypatch):
    monkeypatch.setenv("JAXNET_AUTO", "rank")  # what auto runs without measuring: xla
    config = bench_kernels.Config(backends=("numba", "auto"))
    rows = []
    for (m, k, n), t_auto in (((64, 64, 64), 1.25), ((512, 512, 512), 0.9)):
        for mode in ("fwd", "fwd+bwd"):
            row = {"M": m, "K": k, "N": n, "mode": mode}
            bench_kernels._auto_columns(row, {"xla": 2.0, "numba": 1.0, "auto": t_auto}, config)
            rows.append(dict(row, xla_gflops=1.0, numba_gflops=2.0, auto_gflops=1.6, numba_vs_xla=2.0,
                             auto_vs_xla=round(2.0 / t_auto, 3)))
    assert rows[0]["auto_runs"] == "xla" and rows[0]["auto_vs_best"] == 0.8  # numba's 1.0 over auto's 1.25
    assert rows[2]["auto_vs_best"] == round(1.0 / 0.9, 3)
    assert all(r["choice_vs_best"] == 0.5 for r in rows)  # it ran xla (2.0 in its column), numba took 1.0
    summary = bench_kernels.summarize(rows, {"numba": 4.4, "xla": 4.6, "xla_tiny_op": 3.5, "pure_callback": 85.0},
                                      {}, config)
    assert summary["auto_vs_best_min"] == 0.8 and summary["auto_fwd_min_vs_best"] == 0.8
    assert summary["auto_choice_vs_best_min"] == 0.5
    # auto ran xla: its column (1.25) and xla's (2.0) time one program, 1.6x apart.
    assert rows[0]["same_program_ratio"] == 1.6 and rows[2]["same_program_ratio"] == round(2.0 / 0.9, 3)
    assert ("| 64 | 64 | 64 | fwd | 1.0 | 2.0 | 1.6 | 2.00x | 1.60x | xla | 0.80x | 0.50x | 1.60x |"
            in bench_kernels.table(rows, config))


def test_choices_are_judged_against_the_runs_own_same_program_noise():
    """The floor is the largest disagreement of a program with itself (auto's column against the
    column of the backend it ran), on either side of 1; a choice counts beyond the noise only below it."""
    def row(same, choice):
        return {"same_program_ratio": same, "choice_vs_best": choice}

    got = bench_kernels._same_program_noise([row(1.02, 0.99), row(0.97, 0.96), row(1.01, 0.90)])
    assert got == {"same_program_floor": 0.97, "auto_choices_beyond_noise": 2}  # 0.96 and 0.90 < 0.97
    got = bench_kernels._same_program_noise([row(1.25, 0.85), row(0.99, 1.0)])  # 1/1.25 = 0.8
    assert got == {"same_program_floor": 0.8, "auto_choices_beyond_noise": 0}
    assert bench_kernels._same_program_noise([row(None, None)]) == {"same_program_floor": None,
                                                                     "auto_choices_beyond_noise": None}
    config = bench_kernels.Config(backends=("numba", "auto"))
    base = {"M": 512, "K": 512, "N": 512, "mode": "fwd", "xla_gflops": 1.0, "numba_gflops": 1.0, "auto_gflops": 1.0,
            "numba_vs_xla": 1.0, "auto_vs_xla": 1.0, "auto_runs": "numba", "auto_vs_best": 1.0}
    runs = [[dict(base, mode=mode, same_program_ratio=s, choice_vs_best=c) for mode in ("fwd", "fwd+bwd")]
            for s, c in ((0.9, 0.85), (1.0, 0.99), (1.05, 0.97))]
    overheads = [{"numba": 4.4, "xla": 4.6, "xla_tiny_op": 3.5, "pure_callback": 85.0}] * 3
    summary = bench_kernels.summarize_runs(runs, overheads, {}, config)
    assert summary["same_program_floor_per_run"] == [0.9, 1.0, 0.952] and summary["same_program_floor"] == 0.9
    assert summary["auto_choices_beyond_noise_per_run"] == [2, 2, 0] and summary["auto_choices_beyond_noise"] == 2
    # Over the medians: same program 1.0 (floor 1.0), choice 0.97: both rows beyond it.
    assert summary["same_program_floor_of_medians"] == 1.0
    assert summary["auto_choices_beyond_noise_of_medians"] == 2


def test_result_records_the_numba_tile_and_blocking():
    from kernels.numba_cpu import _kernels, blocking

    got = bench_kernels.numba_parameters("float64")
    mr, nr = map(int, got["numba_tile"].split("x"))
    assert (mr, nr) == (_kernels.MR, _kernels.NR) and (mr, nr) in _kernels.TILES.values()
    assert got["numba_blocking"] == blocking.chosen("float64").as_dict()
    assert blocking.Blocking(**got["numba_blocking"]).validate(mr)


@pytest.mark.parametrize("path", ["top level", "own thread"])
def test_untraced_leaves_the_caller_s_trace_and_keeps_its_context_and_x64(path, monkeypatch):
    import contextvars

    import jax
    from jax._src import core  # trace_state_clean: whether a trace is active in this thread

    from kernels import timing

    if path == "own thread":  # a JAX without the internal tracing context: the fallback
        monkeypatch.setattr(timing, "_tracing_context", lambda: None)
    var = contextvars.ContextVar("jaxnet_test_untraced", default="unset")
    seen = {}

    def probe():
        return core.trace_state_clean(), var.get(), jnp.zeros(2, "float64").dtype.name

    def traced(x):
        seen["inside"] = core.trace_state_clean()
        with jax.ensure_compile_time_eval():  # what the tuners used before: still a traced thread
            seen["compile_time_eval"] = core.trace_state_clean()
        seen["untraced"] = timing.untraced(probe)
        with pytest.raises(ZeroDivisionError):  # fn's exception, raised to the caller
            timing.untraced(lambda: 1 / 0)
        seen["after"] = core.trace_state_clean()  # the caller's trace is back, and its tracers work
        return 2 * x

    token = var.set("the caller's")
    try:
        with jax.enable_x64(True):
            y = jax.jit(traced)(1.5)
    finally:
        var.reset(token)
    assert float(y) == 3.0
    assert seen["inside"] is False and seen["compile_time_eval"] is False and seen["after"] is False
    assert seen["untraced"] == (True, "the caller's", "float64")
