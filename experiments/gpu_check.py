"""The GPU check of the Pallas fused-dense kernels: GPU tests, then TFLOP/s against XLA.

    python -m experiments.gpu_check                      # on a GPU: < 5 min on one H200
    python -m experiments.gpu_check --interpret --quick  # on CPU: the script end to end, ~20 s

1. Runs ``pytest -m gpu tests/kernel_tests/test_pallas_fused_dense.py`` (the property tests, lowered
   for real) in a subprocess and records the counts.
2. Times forward and forward+backward in TFLOP/s for bf16 4096^3 and a grid of transformer MLP
   shapes (kernels.pallas_gpu.bench), each beside XLA's own act(x @ w + b) in the same run;
   block sizes are autotuned per shape first while the time budget lasts.
3. Writes ``report.md`` and ``result.json`` into ``--workdir`` (default ``runs/gpu_check/``) and
   prints the result as one JSON line.

Targets (issue 5, on an H200): forward >= 0.9x XLA, forward+backward >= 0.8x XLA, forward
>= 600 TFLOP/s at 4096^3 bf16. Expected result: not yet measured (no GPU has been lent so far);
with ``--interpret --quick`` the numbers are interpret-mode timings of tiny shapes and mean nothing.
"""
from __future__ import annotations

import dataclasses
import datetime
import pathlib
import re
import subprocess
import sys
import time
import warnings
from typing import Literal

from experiments.common import finish, parse_config, prepare_process

REPO = pathlib.Path(__file__).resolve().parents[1]
TEST_FILE = "tests/kernel_tests/test_pallas_fused_dense.py"
TARGETS = {"fwd_ratio": 0.9, "fwdbwd_ratio": 0.8, "headline_fwd_tflops": 600.0}


@dataclasses.dataclass(frozen=True)
class Config:
    # Run the kernels with interpret=True (the CPU dry run; on a GPU, a debugging aid).
    interpret: bool = False
    # Tiny shapes and 2 repeats: checks the script end to end, measures nothing.
    quick: bool = False
    # Run the GPU tests (pytest -m gpu) before the benchmark.
    tests: bool = True
    # Autotune block sizes per shape (GPU only) while the elapsed time is under time_budget_s,
    # among the first `candidates` of kernels.pallas_gpu.GPU_CANDIDATES.
    autotune: bool = True
    # Block-size candidates the autotuner tries (the first of GPU_CANDIDATES), >= 1.
    candidates: int = 3
    # Timed runs per measurement (the median is reported), after `warmup` untimed ones.
    repeats: int = 10
    # Untimed runs before each measurement (the first compiles).
    warmup: int = 2
    # Each timed sample runs calls back to back for at least this long (per-call dispatch then
    # overlaps the GPU's work); 0 times single calls, each waited for (as before 2026-12-04).
    min_sample_s: float = 0.02
    # The dtype of x, w and b in the benchmark.
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # Seconds after which no new shape is autotuned, so the whole check stays within 5 minutes.
    time_budget_s: float = 150.0
    # Limit for the pytest subprocess.
    test_timeout_s: int = 120


def run_gpu_tests(timeout_s: int) -> dict:
    """``pytest -m gpu`` on the Pallas test file; returns counts parsed from its summary line."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", TEST_FILE]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        out, rc = f"timed out after {timeout_s} s\n{err.stdout or ''}", -1
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error", "deselected")}
    summary = [line for line in out.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected)", line)]
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary[-1] if summary else ""):
        counts["error" if what.startswith("error") else what] += int(n)
    return {"returncode": rc, **counts, "seconds": round(time.perf_counter() - start, 1),
            "tail": "\n".join(out.strip().splitlines()[-15:])}


def _round(v):
    return None if v is None else round(v, 4)


def _benchmark(config: Config, lowering: str, dtype, problems, start: float, rows: list) -> None:
    """Autotunes each problem (while the time budget lasts), measures it and appends its row."""
    from kernels.pallas_gpu import GPU_CANDIDATES, autotune, bench

    for p in problems:
        try:
            cfg = None
            if config.autotune and lowering != "interpret" and time.perf_counter() - start < config.time_budget_s:
                cfg = autotune(p.m, p.n, p.k, dtype, p.activation, lowering=lowering, repeats=5,
                               candidates=GPU_CANDIDATES[:config.candidates])
            row = bench.measure(p, dtype=dtype, lowering=lowering, config=cfg, repeats=2 if config.quick else
                                config.repeats, warmup=1 if config.quick else config.warmup,
                                min_sample_s=0.0 if config.quick else config.min_sample_s)
        except Exception as err:  # noqa: BLE001 - one GPU run should report every shape it can
            rows.append({"name": p.name, "m": p.m, "k": p.k, "n": p.n, "activation": p.activation,
                         "error": f"{type(err).__name__}: {err}"[:800]})
            print(f"{p.name}: FAILED {rows[-1]['error']}", flush=True)
            continue
        rows.append(row)
        print(f"{p.name}: pallas {row['pallas_fwd_tflops']:.4g} / xla {row['xla_fwd_tflops']:.4g} TFLOP/s fwd, "
              f"pallas {row['pallas_fwdbwd_tflops']:.4g} / xla {row['xla_fwdbwd_tflops']:.4g} fwd+bwd", flush=True)


def main(argv=None) -> dict:
    prepare_process()
    config, flags = parse_config(Config, argv, name="gpu_check", description=__doc__.splitlines()[0], trains=False)
    return finish(check(config, flags.workdir), flags.workdir, config, flags.argv)


def check(config: Config, workdir) -> dict:
    """The tests and the benchmark; writes ``report.md`` into ``workdir``; returns the result."""
    start = time.perf_counter()
    import jax
    import jax.numpy as jnp

    from kernels.pallas_gpu import bench, resolve_lowering

    if jax.default_backend() != "gpu" and not config.interpret:
        raise SystemExit("gpu_check: no GPU in this process (jax.default_backend() is "
                         f"{jax.default_backend()!r}); for a dry run pass --interpret --quick")
    lowering = resolve_lowering("interpret" if config.interpret else "auto")
    dtype = jnp.dtype(config.dtype)
    device = jax.devices()[0].device_kind
    tests = run_gpu_tests(config.test_timeout_s) if config.tests else None

    headline, grid = (bench.QUICK_HEADLINE, bench.QUICK_GRID) if config.quick else (bench.HEADLINE,
                                                                                   bench.TRANSFORMER_GRID)
    rows = []
    with warnings.catch_warnings(record=True) as caught:  # e.g. JAX 0.11's Triton deprecation, for the report
        warnings.simplefilter("default")
        _benchmark(config, lowering, dtype, (headline, *grid), start, rows)
    seen = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))

    ok = [r for r in rows if "error" not in r]
    head = rows[0] if "error" not in rows[0] else {}
    result = {
        "experiment": "gpu_check",
        "device": device,
        "jax": jax.__version__,
        "lowering": lowering,
        "dtype": dtype.name,
        "quick": config.quick,
        "tests_passed": None if tests is None else tests["passed"],
        "tests_failed": None if tests is None else tests["failed"] + tests["error"],
        "tests_skipped": None if tests is None else tests["skipped"],
        "headline_fwd_tflops": _round(head.get("pallas_fwd_tflops")),
        "headline_xla_fwd_tflops": _round(head.get("xla_fwd_tflops")),
        "headline_fwd_ratio": _round(head.get("fwd_ratio")),
        "headline_fwdbwd_tflops": _round(head.get("pallas_fwdbwd_tflops")),
        "headline_fwdbwd_ratio": _round(head.get("fwdbwd_ratio")),
        "min_fwd_ratio": _round(min((r["fwd_ratio"] for r in ok), default=None)),
        "min_fwdbwd_ratio": _round(min((r["fwdbwd_ratio"] for r in ok), default=None)),
        "failed_shapes": [r["name"] for r in rows if "error" in r],
        "warnings": seen,
    }
    result["targets_met"] = (not config.interpret and not config.quick and not result["failed_shapes"]
                             and None not in (result["min_fwd_ratio"], result["headline_fwd_tflops"])
                             and result["min_fwd_ratio"] >= TARGETS["fwd_ratio"]
                             and result["min_fwdbwd_ratio"] >= TARGETS["fwdbwd_ratio"]
                             and result["headline_fwd_tflops"] >= TARGETS["headline_fwd_tflops"])
    result["wall_s"] = round(time.perf_counter() - start, 1)

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "report.md").write_text(_report(config, result, tests, rows))
    return result


def _report(config: Config, result: dict, tests: dict | None, rows) -> str:
    from kernels.pallas_gpu import bench

    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    dry = config.interpret or config.quick
    lines = [
        f"# GPU check of the Pallas fused-dense kernels ({when})",
        "",
        f"- device: {result['device']}; jax {result['jax']}; lowering: {result['lowering']}; dtype {result['dtype']}",
        f"- command: `python -m experiments.gpu_check{' --interpret' if config.interpret else ''}"
        f"{' --quick' if config.quick else ''}`; medians of {2 if config.quick else config.repeats} samples "
        "after warm-up, Pallas and XLA in turn, each sample "
        + ("one call" if config.quick or not config.min_sample_s else
           f">= {config.min_sample_s * 1e3:g} ms of back-to-back calls") + ", block_until_ready",
    ]
    if dry:
        lines.append("- **dry run** (interpret mode and/or tiny shapes): the figures below check the script, "
                     "they are not GPU measurements")
    if tests is not None:
        lines.append(f"- GPU tests (`pytest -m gpu {TEST_FILE}`): {tests['passed']} passed, {tests['failed']} failed, "
                     f"{tests['error']} errors, {tests['skipped']} skipped, rc={tests['returncode']}, "
                     f"{tests['seconds']} s")
    lines += ["", bench.markdown_table(rows),
              f"Targets: forward >= {TARGETS['fwd_ratio']}x XLA, forward+backward >= {TARGETS['fwdbwd_ratio']}x "
              f"XLA, >= {TARGETS['headline_fwd_tflops']:.0f} TFLOP/s forward at 4096^3 bf16; "
              f"met: {result['targets_met']}.", ""]
    if result["warnings"]:
        lines += ["## Warnings during the benchmark", ""] + [f"- {w}" for w in result["warnings"]] + [""]
    if tests is not None and (tests["failed"] or tests["error"] or tests["returncode"] not in (0, 5)):
        lines += ["## Test output (tail)", "", "```", tests["tail"], "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
