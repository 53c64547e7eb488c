"""Benchmark: ``kernels.fused_dense`` per backend against XLA's own ``act(x @ w + b)``, same run.

    python -m experiments.bench_kernels            # full grid, about a minute on a quiet 2-core machine
    python -m experiments.bench_kernels --quick    # 6 shapes, ~40 s
    python -m experiments.bench_kernels --runs 4   # the grid 4 times: each ratio's spread over runs

For every shape (M, K, N) of the grid and for forward and forward+backward (the VJP: y, dx,
dW, db from a fixed cotangent), it reports GFLOP/s of each backend (2MKN forward, 6MKN
forward+backward) and the speed ratio to XLA (t_xla / t_backend: > 1 means faster than XLA),
from medians of ``--repeats`` samples taken after warm-up, backends interleaved sample by sample
so that they share the machine's noise (in balanced orders: ``kernels.timing.balanced_orders``),
each sample ``block_until_ready``. Then the per-call overhead at 8x8x8: the Numba FFI call, XLA's
own op at that size, a tiny XLA op (``x + 1``), and the same kernel through ``jax.pure_callback``
(a baseline only; the backend never uses it). Also the cold start of the Numba backend in a fresh
process (import, handler load from Numba's cache and registration, first call).

With "auto" among ``--backends`` (``--backends numba auto``), the grid's shapes are tuned first
(``kernels.autotune.tune``: what "auto" runs per shape is measured, or read from the tuning
cache), then "auto" is timed like any backend; each row also gives the backend it ran
(``auto_runs``), ``auto_vs_best`` (the fastest other backend's time over auto's: 1 when auto
chose the fastest, < 1 when it did not or when its own run was slower) and ``choice_vs_best``
(the fastest backend's time over that of the backend auto ran, both from their own columns: < 1
only for a wrong choice, not for noise between auto and the column it equals); the summary the
worst of each, ``auto_vs_best_min`` and ``auto_choice_vs_best_min`` (with ``--runs``, also over
each row's median, ``..._of_medians``). The run's own noise, from the same columns: auto's column
and that of the backend it ran time the same program, so ``same_program_ratio`` (the second's time
over the first's) would be 1 on a quiet machine; ``same_program_floor`` is the run's largest such
disagreement (the least of min(r, 1/r) over the rows), and ``auto_choices_beyond_noise`` counts the
rows whose ``choice_vs_best`` is below it: choices slower than the best by more than any program
differed from itself in that run.

Writes ``table.md`` and ``rows.json`` into ``--workdir`` (default ``runs/bench_kernels/``) and
ends with one JSON line of summary metrics, also saved as ``result.json`` (with the machine, the
numba kernels' register tile ``numba_tile`` and their blocking ``numba_blocking``). Figures in
docs/benchmarks.md.

With ``--runs R`` > 1 the grid is timed R times, one run after another (small shapes swing
10-30% from run to run with the machine's state, XLA's thread pool above all): ``rows.json``
then holds every run's rows (with a "run" key), ``runs.md`` each run's table, and ``table.md``
each shape's median times and its ratio to XLA as min / median / max over the runs; the
summary gives the targets' worst ratios per run and over all runs, and over each shape's median
ratio (``..._of_medians``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
from typing import Literal

from experiments.common import finish, parse_config, prepare_process
from kernels import activations
from kernels.dispatch import BackendName

# (M, K, N): square sweeps 8..2048, tall/wide/deep, and the shapes of this project's models
# (SimpleNet 10-5-1 and an MLP on 8x8 digits at batch 256, a transformer MLP block d=256).
GRID = (
    (8, 8, 8), (64, 64, 64), (128, 128, 128), (256, 256, 256), (512, 512, 512),
    (1024, 1024, 1024), (2048, 1024, 1024), (2048, 2048, 2048),
    (4096, 256, 256), (8, 4096, 4096), (256, 4096, 64), (4096, 64, 4096),
    (256, 10, 5), (256, 5, 1), (256, 64, 128), (256, 128, 10), (1024, 256, 1024), (1024, 1024, 256),
)
QUICK_GRID = ((8, 8, 8), (64, 64, 64), (256, 256, 256), (512, 512, 512), (1024, 1024, 1024),
              (256, 64, 128))


@dataclasses.dataclass(frozen=True)
class Config:
    # A 6-shape grid instead of the full one.
    quick: bool = False
    # Backends besides the XLA baseline ("pallas" runs interpreted on CPU: very slow; "auto": the
    # per-shape choice, against the best of the others).
    backends: tuple[BackendName, ...] = ("numba",)
    # The activation fused into every timed call.
    activation: Literal[activations.NAMES] = "relu"
    # The Numba kernels' native dtypes (float64 turns on jax_enable_x64).
    dtype: Literal["float32", "float64"] = "float32"
    # Timed samples per shape and backend (medians reported), after `warmup` untimed calls.
    repeats: int = 15
    # Untimed calls per shape and backend before the timed ones (the first compiles).
    warmup: int = 3
    # Times the whole grid is run, one run after another (see the module docstring).
    runs: int = 1
    # Each sample repeats the call until it lasts at least this long (small shapes).
    min_sample_s: float = 0.002
    # Seeds the random x, w and b.
    seed: int = 0


def _medians(fns: dict, args, config: Config) -> dict:
    """Median seconds per call of each function, sampled side by side."""
    from kernels.timing import interleaved_medians, timed_call

    samplers = {name: timed_call(f, args, min_sample_s=config.min_sample_s) for name, f in fns.items()}
    return interleaved_medians(samplers, config.repeats, config.warmup)


def _problem(shape, config: Config):
    from kernels.autotune import problem

    return problem(*shape, config.dtype, config.seed)


def _away_from_kinks(args, activation: str):
    """``args`` with dy zeroed where the pre-activation is within rounding of a kink of the
    activation (relu's 0): there the derivative each backend applies depends on which side its
    rounded z fell, and a flipped element moves a whole column of dW (as the test harness does).
    """
    import jax.numpy as jnp
    import numpy as np

    from jaxnet.testing.tolerances import FusedDenseBounds

    x, w, b, dy = args
    mask = FusedDenseBounds.from_inputs(np.asarray(x), np.asarray(w), np.asarray(b), activation).kink_mask()
    return x, w, b, jnp.where(mask, jnp.zeros_like(dy), dy)


def _tune(grid, config: Config) -> None:
    """Settles what "auto" runs at each shape of ``grid`` before anything is timed."""
    from kernels import autotune

    if autotune.policy() == "rank":
        print("auto: JAXNET_AUTO=rank, nothing measured", flush=True)
        return
    for (m, k, n), e in autotune.tune(grid, config.dtype, config.activation).items():
        print(f"auto {m}x{k}x{n} ({autotune.bucket(m, k, n, config.dtype, config.activation)}): "
              f"fwd {e['fwd']}, fwd+bwd {e['fwd+bwd']}, µs {json.dumps(e['us'])}", flush=True)


def _auto_columns(row: dict, t: dict, config: Config) -> None:
    """Adds to ``row`` (one shape and mode) the backend "auto" ran and its speed against the best other."""
    from kernels.dispatch import auto_choice

    fwd, train = auto_choice(row["M"], row["K"], row["N"], config.dtype, config.activation)
    row["auto_runs"] = fwd if row["mode"] == "fwd" else train
    best = min(v for be, v in t.items() if be != "auto")
    row["auto_vs_best"] = round(best / t["auto"], 3)
    row["choice_vs_best"] = round(best / t[row["auto_runs"]], 3) if row["auto_runs"] in t else None
    row["same_program_ratio"] = round(t[row["auto_runs"]] / t["auto"], 3) if row["auto_runs"] in t else None


def _overhead(config: Config) -> dict:
    """Microseconds per call at 8x8x8: Numba FFI, XLA's fused dense, ``x + 1``, pure_callback."""
    import jax
    import numpy as np

    from kernels import reference
    from kernels.autotune import step_functions

    x, w, b, _ = _problem((8, 8, 8), config)
    numba_fwd, _ = step_functions("numba", config.activation)
    xla_fwd, _ = step_functions("xla", config.activation)

    def host(x, w, b):  # the same arithmetic on the host, float64 NumPy, cast back
        return reference.fused_dense_numpy(x, w, b, activation=config.activation).astype(x.dtype)

    callback = jax.jit(lambda x, w, b, dy: jax.pure_callback(
        host, jax.ShapeDtypeStruct((8, 8), x.dtype), x, w, b, vmap_method="broadcast_all"))
    tiny = jax.jit(lambda x, w, b, dy: x + 1)
    fns = {"numba": numba_fwd, "xla": xla_fwd, "xla_tiny_op": tiny, "pure_callback": callback}
    t = _medians(fns, (x, w, b, x), dataclasses.replace(config, repeats=max(config.repeats, 25),
                                                         min_sample_s=0.02))
    np.testing.assert_allclose(np.asarray(numba_fwd(x, w, b, x)), np.asarray(callback(x, w, b, x)),
                               rtol=1e-5, atol=1e-5)
    return {name: round(v * 1e6, 2) for name, v in t.items()}


COLD_START = """
import time
t0 = time.perf_counter()
import jax, jax.numpy as jnp
import kernels
t1 = time.perf_counter()
y = kernels.fused_dense(jnp.ones((4, 3)), jnp.ones((3, 2)), backend="numba").block_until_ready()
t2 = time.perf_counter()
print(round(t1 - t0, 3), round(t2 - t1, 3))
"""


def _cold_start() -> dict:
    """Seconds in a fresh process: ``import kernels`` (jax included), then the first Numba call
    (handlers loaded from Numba's on-disk cache and registered, XLA compile, run; the blocking
    stored or derived, not tuned: the tuning at first use is a one-off per machine)."""
    env = {**os.environ, "JAXNET_NUMBA_BLOCKING": "stored"}
    out = subprocess.run([sys.executable, "-c", COLD_START], capture_output=True, text=True, check=True, env=env)
    imp, first = (float(v) for v in out.stdout.split())
    return {"import_s": imp, "first_call_s": first}


def prepare_dtype(config: Config) -> None:
    """Checks ``config.dtype``; for float64 turns on ``jax_enable_x64`` (process-wide), without
    which JAX silently truncates every float64 array to float32 and the run would time that."""
    import jax

    if config.dtype not in ("float32", "float64"):
        raise ValueError(f"bench_kernels: --dtype must be float32 or float64, got {config.dtype!r}")
    if config.dtype == "float64":
        jax.config.update("jax_enable_x64", True)


def run(config: Config) -> tuple[list[dict], dict]:
    import jax
    import numpy as np

    from kernels.autotune import step_functions

    prepare_dtype(config)
    backends = ("xla", *[b for b in config.backends if b != "xla"])
    grid = QUICK_GRID if config.quick else GRID
    if "auto" in backends:
        _tune(grid, config)
    rows = []
    for shape in grid:
        m, k, n = shape
        args = _away_from_kinks(_problem(shape, config), config.activation)
        fns = {be: step_functions(be, config.activation) for be in backends}
        # Each backend must agree with XLA before it is timed.
        ref = jax.device_get(fns["xla"][1](*args))
        for be in backends[1:]:
            got = jax.device_get(fns[be][1](*args))
            for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
                np.testing.assert_allclose(u, v, rtol=2e-3, atol=2e-3 * math.sqrt(max(k, m, n)))
        for mode, flops in (("fwd", 2 * m * k * n), ("fwd+bwd", 6 * m * k * n)):
            i = 0 if mode == "fwd" else 1
            t = _medians({be: fns[be][i] for be in backends}, args, config)
            row = {"M": m, "K": k, "N": n, "mode": mode}
            for be in backends:
                row[f"{be}_us"] = round(t[be] * 1e6, 1)
                row[f"{be}_gflops"] = round(flops / t[be] / 1e9, 2)
                if be != "xla":
                    row[f"{be}_vs_xla"] = round(t["xla"] / t[be], 3)
            if "auto" in backends:
                _auto_columns(row, t, config)
            rows.append(row)
            print(json.dumps(row), flush=True)
    overhead = _overhead(config)
    print("overhead_us", json.dumps(overhead), flush=True)
    return rows, overhead


def summarize(rows: list[dict], overhead: dict, cold: dict, config: Config) -> dict:
    peak = max(r[k] for r in rows for k in r if k.endswith("_gflops"))
    summary = {"peak_gflops": peak, "activation": config.activation, "dtype": config.dtype}
    for be in config.backends:
        if be == "xla":
            continue
        for mode in ("fwd", "fwd+bwd"):
            ratios = {(r["M"], r["K"], r["N"]): r[f"{be}_vs_xla"] for r in rows if r["mode"] == mode}
            small = [v for s, v in ratios.items() if max(s) <= 256]
            mid = [v for s, v in ratios.items() if 512 <= max(s) <= 2048]
            summary[f"{be}_{mode}_geomean_vs_xla"] = round(math.exp(statistics.fmean(map(math.log, ratios.values()))), 3)
            summary[f"{be}_{mode}_min_vs_xla_small"] = min(small) if small else None
            summary[f"{be}_{mode}_min_vs_xla_512_2048"] = min(mid) if mid else None
            if be == "auto":
                summary[f"auto_{mode}_min_vs_best"] = min(r["auto_vs_best"] for r in rows if r["mode"] == mode)
    if "auto" in config.backends:
        summary["auto_vs_best_min"] = min(r["auto_vs_best"] for r in rows)
        choices = [r["choice_vs_best"] for r in rows if r["choice_vs_best"] is not None]
        summary["auto_choice_vs_best_min"] = min(choices) if choices else None
        summary.update(_same_program_noise(rows))
    summary.update({f"overhead_{k}_us": v for k, v in overhead.items()})
    summary["numba_overhead_vs_xla_tiny_op"] = round(overhead["numba"] / overhead["xla_tiny_op"], 3)
    summary.update({f"cold_{k}": v for k, v in cold.items()})
    return summary


# The run's noise figures (``_same_program_noise``), kept per run and over the medians like the ratios.
_NOISE_KEYS = ("same_program_floor", "auto_choices_beyond_noise")
# Summary figures whose worst run is the largest; every other ratio's worst is the smallest.
_WORST_IS_MAX = ("numba_overhead_vs_xla_tiny_op", "auto_choices_beyond_noise")


def _same_program_noise(rows: list[dict]) -> dict:
    """``same_program_floor`` (the least of min(r, 1/r) over the rows' ``same_program_ratio``: the
    largest disagreement of one program with itself in the run) and ``auto_choices_beyond_noise``
    (how many rows' ``choice_vs_best`` fall below it); None where no row has both."""
    ratios = [r["same_program_ratio"] for r in rows if r.get("same_program_ratio")]
    if not ratios:
        return {"same_program_floor": None, "auto_choices_beyond_noise": None}
    floor = min(min(r, 1 / r) for r in ratios)
    beyond = sum(r["choice_vs_best"] < floor for r in rows if r.get("choice_vs_best") is not None)
    return {"same_program_floor": round(floor, 3), "auto_choices_beyond_noise": beyond}


def summarize_runs(runs: list[list[dict]], overheads: list[dict], cold: dict, config: Config) -> dict:
    """``summarize`` of the first run, with each target metric (the ``min_vs_xla`` ones, the
    geometric means, the overhead ratio, the noise figures) replaced by its list over the runs and
    its worst; and each backend's minima and geometric means over the shapes' median ratios
    (``..._of_medians``: a figure that, unlike the worst run, does not fall as runs are added)."""
    per_run = [summarize(rows, ov, cold, config) for rows, ov in zip(runs, overheads)]
    summary = dict(per_run[0], runs=len(runs))
    for key in per_run[0]:
        if "_vs_xla" in key or "_vs_best" in key or key in _NOISE_KEYS:
            values = [s[key] for s in per_run]
            summary[key + "_per_run"] = values
            if None not in values:
                summary[key] = max(values) if key in _WORST_IS_MAX else min(values)
    summary["peak_gflops"] = max(s["peak_gflops"] for s in per_run)
    medians = [dict(row, **{k: _median_or_none([rows[i][k] for rows in runs]) for k in row
                            if k.endswith("_vs_xla") or k.endswith("_vs_best") or k == "same_program_ratio"})
               for i, row in enumerate(runs[0])]
    of_medians = summarize(medians, overheads[0], cold, config)
    for key, value in of_medians.items():
        if ("_min_vs_" in key or "_geomean_vs_" in key or key.endswith("_vs_best_min")
                or key in _NOISE_KEYS):
            summary[key + "_of_medians"] = value
    return summary


def _median_or_none(values: list):
    return None if None in values else statistics.median(values)


def spread(runs: list[list[dict]], config: Config) -> list[dict]:
    """Per shape and mode over the runs: each backend's median time, and its ratio to XLA as
    the min, median and max of the runs' ratios."""
    bes = [b for b in config.backends if b != "xla"]
    out = []
    for i, first in enumerate(runs[0]):
        same = [rows[i] for rows in runs]
        row = {k: first[k] for k in ("M", "K", "N", "mode")}
        for be in ("xla", *bes):
            row[f"{be}_us"] = round(statistics.median(r[f"{be}_us"] for r in same), 1)
        for be in bes:
            ratios = [r[f"{be}_vs_xla"] for r in same]
            row.update({f"{be}_vs_xla_min": min(ratios), f"{be}_vs_xla_median": statistics.median(ratios),
                        f"{be}_vs_xla_max": max(ratios)})
        if "auto" in bes:
            row["auto_vs_best_min"] = min(r["auto_vs_best"] for r in same)
        out.append(row)
    return out


def spread_table(rows: list[dict], config: Config, nruns: int) -> str:
    bes = [b for b in config.backends if b != "xla"]
    head = ["M", "K", "N", "mode", "XLA µs (median)"] + [f"{b} µs (median)" for b in bes]
    head += [f"{b}/XLA min / median / max of {nruns}" for b in bes]
    head += [f"auto/best, worst of {nruns}"] if "auto" in bes else []
    cells = [[r["M"], r["K"], r["N"], r["mode"], r["xla_us"]] + [r[f"{b}_us"] for b in bes]
             + [f"{r[f'{b}_vs_xla_min']:.2f}x / {r[f'{b}_vs_xla_median']:.2f}x / {r[f'{b}_vs_xla_max']:.2f}x"
                for b in bes] + ([f"{r['auto_vs_best_min']:.2f}x"] if "auto" in bes else []) for r in rows]
    return _markdown(head, cells)


def table(rows: list[dict], config: Config) -> str:
    bes = [b for b in config.backends if b != "xla"]
    head = ["M", "K", "N", "mode", "XLA GFLOP/s"] + [f"{b} GFLOP/s" for b in bes] + [f"{b}/XLA" for b in bes]
    head += ["auto runs", "auto/best", "choice/best", "same program"] if "auto" in bes else []
    cells = [[r["M"], r["K"], r["N"], r["mode"], r["xla_gflops"]] + [r[f"{b}_gflops"] for b in bes]
             + [f"{r[f'{b}_vs_xla']:.2f}x" for b in bes]
             + ([r["auto_runs"], f"{r['auto_vs_best']:.2f}x", _times(r["choice_vs_best"]),
                 _times(r.get("same_program_ratio"))] if "auto" in bes else [])
             for r in rows]
    return _markdown(head, cells)


def _times(ratio) -> str:
    """``1.23x``, or ``-`` where the ratio is None (auto ran a backend without a column)."""
    return "-" if ratio is None else f"{ratio:.2f}x"


def _markdown(head: list[str], rows: list[list]) -> str:
    """A markdown table: the header, then one line per row of cells."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def benchmark(config: Config, workdir) -> dict:
    """Times the grid ``config.runs`` times; writes ``rows.json`` and ``table.md`` (and, for
    several runs, ``runs.md``) into ``workdir``; returns the summary metrics."""
    if config.runs < 1:
        raise ValueError(f"bench_kernels: --runs must be at least 1, got {config.runs}")
    cold = _cold_start()
    runs, overheads = [], []
    for i in range(config.runs):
        if config.runs > 1:
            print(f"run {i + 1} of {config.runs}", flush=True)
        rows, overhead = run(config)
        runs.append(rows)
        overheads.append(overhead)
    workdir.mkdir(parents=True, exist_ok=True)
    if config.runs == 1:
        (workdir / "rows.json").write_text(json.dumps(runs[0], indent=1) + "\n")
        (workdir / "table.md").write_text(table(runs[0], config))
        print(table(runs[0], config), flush=True)
        return {**summarize(runs[0], overheads[0], cold, config), **numba_parameters(config.dtype)}
    all_rows = [dict(r, run=i + 1) for i, rows in enumerate(runs) for r in rows]
    (workdir / "rows.json").write_text(json.dumps(all_rows, indent=1) + "\n")
    (workdir / "runs.md").write_text("\n".join(f"Run {i + 1}:\n\n{table(rows, config)}" for i, rows in enumerate(runs)))
    text = spread_table(spread(runs, config), config, config.runs)
    (workdir / "table.md").write_text(text)
    print(text, flush=True)
    return {**summarize_runs(runs, overheads, cold, config), **numba_parameters(config.dtype)}


def numba_parameters(dtype: str) -> dict:
    """The numba kernels' compiled register tile and the cache blocking in force (tuned or derived)."""
    from kernels.numba_cpu import _kernels, blocking

    return {"numba_tile": f"{_kernels.MR}x{_kernels.NR}", "numba_blocking": blocking.chosen(dtype).as_dict()}


def main(argv=None) -> dict:
    # Keep freed host memory (the Numba kernels' scratch would page-fault on every call otherwise).
    prepare_process()
    config, flags = parse_config(Config, argv, name="bench_kernels", description=__doc__.splitlines()[0],
                                 trains=False)
    return finish(benchmark(config, flags.workdir), flags.workdir, config, flags.argv)


if __name__ == "__main__":
    main()
