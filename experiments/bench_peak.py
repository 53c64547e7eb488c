"""Benchmark: the CPU's multiply-add peaks, and the dots of XLA and jaxnet as a fraction of them.

    python -m experiments.bench_peak                  # peaks, then dots at 512^3, 1024^3, 2048^3 and the LM's (~40 s)
    python -m experiments.bench_peak --sizes 1024 --shapes 4096x192x768   # one size, one other shape

First the peak of each vector multiply-add the CPU has (``kernels.numba_cpu.peak``: a loop of
independent register-only instructions; ``vfmadd`` for float32, ``vdpbf16ps`` for bf16 pairs,
``vpdpbusd`` for int8 quads), on one core and on every core at once: instructions per second and
operations per second (a multiply-add is two). Then, at each size n (x [n, n] @ w [n, n]) and
each of ``--shapes`` (x [M, K] @ w [K, N]; by default the dense products of ``bench_lm``'s
model), in one run with the variants interleaved sample by sample (medians of ``--repeats``
samples after warm-up, each ``block_until_ready``):

- ``xla_f32``: XLA's float32 dot (``Precision.HIGHEST``), against the float32 peak;
- ``xla_bf16``: XLA's bf16 x bf16 -> float32 dot (what ``kernels.mixed`` runs), against the bf16 peak;
- ``xla_int8``: XLA's int8 x int8 -> int32 dot (``kernels.quantized.int8_dot``), against the int8 peak;
- ``numba_f32``: ``kernels.fused_dense(..., activation="identity", backend="numba")`` (the bias
  added too), against the float32 peak;
- ``numba_w8a8``: ``kernels.quantized_dense(..., act_quant="int8", activation="identity",
  backend="numba")`` (x's rows quantised inside the timed call), against the int8 peak;
- ``numba_bf16``: ``kernels.numba_cpu.bf16_gemm.matmul`` on host arrays, one thread per core (w
  packed inside the timed call), against the bf16 peak: the moonshot's micro-kernel beside
  ``xla_bf16``.

Each as GOP/s (2MKN per call) and its fraction of the all-core peak of its instruction kind, from
the median sample and from the fastest (on a VM that loses a core for a while, the fastest is
the dot's speed when it has the machine, the figure to hold against a peak); a kind the CPU
lacks is left out. What it answers: how far a kernel can still gain (issue 21's
bf16 moonshot: a Numba kernel cannot beat an XLA dot that already runs at the peak) and where the
room is. Writes ``table.md`` and ``rows.json`` into ``--workdir`` (default ``runs/bench_peak/``)
and ends with one JSON line of summary metrics, also saved as ``result.json``. Figures in
docs/benchmarks.md ("Peaks").
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics

from experiments.common import finish, parse_config, prepare_process

# Variant -> the instruction kind whose peak it is measured against.
VARIANTS = {"xla_f32": "f32_fma", "xla_bf16": "bf16_dot", "xla_int8": "int8_dot", "numba_f32": "f32_fma",
            "numba_w8a8": "int8_dot", "numba_bf16": "bf16_dot"}


@dataclasses.dataclass(frozen=True)
class Config:
    # n of the n x n x n products timed.
    sizes: tuple[int, ...] = (512, 1024, 2048)
    # Other products timed, as MxKxN: by default bench_lm's dense layers (4096 rows: qkv, the
    # attention's projection, the MLP's two).
    shapes: tuple[str, ...] = ("4096x192x576", "4096x192x192", "4096x192x768", "4096x768x192")
    # Timed samples per size and variant (medians reported), after `warmup` untimed ones.
    repeats: int = 15
    # Untimed calls per size and variant before the timed ones (the first compiles).
    warmup: int = 3
    # Each sample repeats the call until it lasts at least this long.
    min_sample_s: float = 0.002
    # Seconds of each peak timing (the best of three is kept).
    peak_seconds: float = 0.2
    # Seeds the random operands.
    seed: int = 0

    def __post_init__(self):
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"bench_peak: --sizes must be positive, got {self.sizes}")
        for shape in self.shapes:
            parts = shape.split("x")
            if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
                raise ValueError(f"bench_peak: --shapes takes MxKxN with positive integers, got {shape!r}")
        if self.repeats < 1 or self.warmup < 0 or self.peak_seconds <= 0:
            raise ValueError(f"bench_peak: --repeats >= 1, --warmup >= 0 and --peak-seconds > 0, got "
                             f"{self.repeats}, {self.warmup}, {self.peak_seconds}")

    def problems(self) -> list[tuple[int, int, int]]:
        """``(M, K, N)`` of every product timed: the sizes' cubes, then the shapes."""
        return [(n, n, n) for n in self.sizes] + [tuple(int(p) for p in s.split("x")) for s in self.shapes]


def peaks(config: Config) -> dict:
    """Per instruction kind the CPU has: its name, ops per instruction, and instructions and
    GOP/s on one core and on all of them at once."""
    from kernels.machine import describe
    from kernels.numba_cpu import peak

    cores = describe().cores
    out = {}
    for kind, inst in peak.instructions().items():
        one = peak.rate(kind, threads=1, seconds=config.peak_seconds)
        every = peak.rate(kind, threads=cores, seconds=config.peak_seconds)
        out[kind] = {"instruction": inst.name, "ops": inst.ops, "cores": cores,
                     "ginstr_per_s_one_core": round(one / 1e9, 2), "ginstr_per_s_all_cores": round(every / 1e9, 2),
                     "gops_one_core": round(one * inst.ops / 1e9, 1), "gops_all_cores": round(every * inst.ops / 1e9, 1)}
        print(f"peak {kind} ({inst.name}): {out[kind]['gops_one_core']} GOP/s on one core, "
              f"{out[kind]['gops_all_cores']} on {cores}", flush=True)
    return out


def _fns(kinds) -> dict:
    """Variant -> ``f(a, b, a_bf16, b_bf16, a_q, b_q, bias, scale)``, for the kinds present: jitted,
    but ``numba_bf16`` (host arrays: ``_operands``' NumPy bf16 copies, every core)."""
    import jax
    import jax.numpy as jnp

    import kernels
    from kernels.machine import describe
    from kernels.numba_cpu import bf16_gemm
    from kernels.quantized import int8_dot

    fns = {
        "xla_f32": lambda a, b, ab, bb, aq, bq, bias, s: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST),
        "xla_bf16": lambda a, b, ab, bb, aq, bq, bias, s: jnp.dot(ab, bb, preferred_element_type=jnp.float32),
        "xla_int8": lambda a, b, ab, bb, aq, bq, bias, s: int8_dot(aq, bq),
        "numba_f32": lambda a, b, ab, bb, aq, bq, bias, s: kernels.fused_dense(
            a, b, bias, activation="identity", backend="numba"),
        "numba_w8a8": lambda a, b, ab, bb, aq, bq, bias, s: kernels.quantized_dense(
            a, bq, s, bias, activation="identity", act_quant="int8", backend="numba"),
    }
    fns = {name: jax.jit(f) for name, f in fns.items() if VARIANTS[name] in kinds}
    if VARIANTS["numba_bf16"] in kinds:
        cores = describe().cores
        fns["numba_bf16"] = lambda a, b, ab, bb, *_: bf16_gemm.matmul(ab, bb, threads=cores)
    return fns


def _operands(m: int, k: int, n: int, seed: int):
    """``(a, b, a_bf16, b_bf16, a_q, b_q, bias, scale)``: a standard normal ``[m, k]``, b ``[k, n]``
    the same over sqrt(k), both quantised as the library does (rows of a, columns of b)."""
    import jax
    import jax.numpy as jnp

    from jaxnet.compress import quantize_weight
    from kernels.quantized import quantize_rows

    keys = jax.random.split(jax.random.key(seed), 3)
    a = jax.random.normal(keys[0], (m, k))
    b = jax.random.normal(keys[1], (k, n)) / math.sqrt(k)
    b_q, scale = quantize_weight(b)
    return (a, b, a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), quantize_rows(a)[0], b_q,
            jax.random.normal(keys[2], (n,)), scale)


def run(config: Config, peak_table: dict) -> list[dict]:
    """One row per product: each variant's µs, GOP/s and fraction of its kind's all-core peak."""
    import numpy as np

    from kernels.timing import interleaved_samples, timed_call

    fns = _fns(peak_table)
    rows = []
    for m, k, n in config.problems():
        args = _operands(m, k, n, config.seed)
        host = (*args[:2], np.asarray(args[2]), np.asarray(args[3]))  # numba_bf16's, converted once
        samplers = {name: timed_call(f, host if name == "numba_bf16" else args, min_sample_s=config.min_sample_s)
                    for name, f in fns.items()}
        samples = interleaved_samples(samplers, config.repeats, config.warmup)
        row = {"shape": f"{m}x{k}x{n}"}
        for name, ts in samples.items():
            peak = peak_table[VARIANTS[name]]["gops_all_cores"]
            median = statistics.median(ts)
            gops, fastest = 2 * m * k * n / median / 1e9, 2 * m * k * n / min(ts) / 1e9
            row.update({f"{name}_us": round(median * 1e6, 1), f"{name}_gops": round(gops, 1),
                        f"{name}_of_peak": round(gops / peak, 3), f"{name}_fastest_of_peak": round(fastest / peak, 3)})
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(peak_table: dict, rows: list[dict]) -> str:
    lines = ["| kind | instruction | ops each | GOP/s, one core | GOP/s, all cores |", "|---|---|---:|---:|---:|"]
    lines += [f"| {k} | {p['instruction']} | {p['ops']} | {p['gops_one_core']} | {p['gops_all_cores']} |"
              for k, p in peak_table.items()]
    names = [v for v in VARIANTS if f"{v}_us" in rows[0]]
    lines += ["", "| M x K x N | " + " | ".join(f"{v} GOP/s, median (of peak / fastest's)" for v in names) + " |",
              "|---|" + "---:|" * len(names)]
    lines += [f"| {r['shape']} | " + " | ".join(
        f"{r[f'{v}_gops']} ({r[f'{v}_of_peak']:.0%} / {r[f'{v}_fastest_of_peak']:.0%})" for v in names) + " |"
        for r in rows]
    return "\n".join(lines) + "\n"


def summarize(peak_table: dict, rows: list[dict]) -> dict:
    """The all-core peaks; per variant, its best fraction of its peak over the products, from
    medians and from the fastest samples; the room left above XLA's dot per kind (the peak over
    XLA's fastest sample at its best product); the moonshot's answer, ``numba_bf16`` against
    ``xla_bf16`` (their medians' ratio per product, ``numba_bf16_vs_xla_bf16_min`` / ``_max``)."""
    summary = {f"peak_{k}_gops": p["gops_all_cores"] for k, p in peak_table.items()}
    for name in VARIANTS:
        if f"{name}_gops" in rows[0]:
            summary[f"{name}_best_of_peak"] = max(r[f"{name}_of_peak"] for r in rows)
            summary[f"{name}_fastest_of_peak"] = max(r[f"{name}_fastest_of_peak"] for r in rows)
            if name.startswith("xla_"):
                summary[f"room_above_{name}"] = round(1 / summary[f"{name}_fastest_of_peak"], 3)
    if "numba_bf16_us" in rows[0]:
        ratios = [r["xla_bf16_us"] / r["numba_bf16_us"] for r in rows]
        summary["numba_bf16_vs_xla_bf16"] = {r["shape"]: round(x, 3) for r, x in zip(rows, ratios)}
        summary["numba_bf16_vs_xla_bf16_min"], summary["numba_bf16_vs_xla_bf16_max"] = (
            round(min(ratios), 3), round(max(ratios), 3))
    return summary


def main(argv=None) -> dict:
    prepare_process()  # keeps freed host memory: the kernels' scratch would page-fault every call otherwise
    config, flags = parse_config(Config, argv, name="bench_peak", description=__doc__.splitlines()[0], trains=False)
    peak_table = peaks(config)
    if "f32_fma" not in peak_table:
        raise SystemExit("bench_peak: this CPU has no FMA instructions (kernels.numba_cpu.peak); nothing to measure")
    rows = run(config, peak_table)
    flags.workdir.mkdir(parents=True, exist_ok=True)
    (flags.workdir / "rows.json").write_text(json.dumps({"peaks": peak_table, "rows": rows}, indent=1) + "\n")
    (flags.workdir / "table.md").write_text(table(peak_table, rows))
    print(table(peak_table, rows), flush=True)
    return finish({**summarize(peak_table, rows), "peaks": peak_table}, flags.workdir, config, flags.argv)


if __name__ == "__main__":
    main()
