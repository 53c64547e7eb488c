"""Benchmark: ``kernels.quantized_dense`` (int8 weights, w8a8) per backend against the float32 layer.

    python -m experiments.bench_quantized            # batch 1/32/512 x K = N = 512/1024/2048
    python -m experiments.bench_quantized --quick    # batch 1/32/512 at K = N = 1024

For every shape (M rows, K = N), side by side in one run (medians of ``--repeats`` samples
after warm-up, variants interleaved sample by sample, each sample ``block_until_ready``):

- ``f32``: ``kernels.fused_dense(x, w, b, backend="xla")`` in float32, the baseline;
- ``xla_w8`` / ``xla_w8a8``: ``quantized_dense(..., backend="xla")``, weight-only and w8a8;
- ``numba_w8`` / ``numba_w8a8``: the same on ``backend="numba"``;
- ``xla_dequant``: weight-only as ``act(x @ (w_q * scale) + b)`` under jit (the reference's
  arithmetic), the alternative the "xla" backend's form was chosen against.

Each is reported as microseconds, GOP/s (2MKN) and its speed-up over ``f32`` (t_f32 / t: > 1
is faster). Then XLA's own int8 dot (``lax.dot_general`` int8 x int8 -> int32) against its
float32 dot at 512^3, and the cold start of each Numba handler in a fresh process: with an
empty Numba cache (compile) and again (cache load). The activation is relu, weights are
quantised per output channel from a float ``w``.

Writes ``table.md`` and ``rows.json`` into ``--workdir`` (default ``runs/bench_quantized/``) and
ends with one JSON line of summary metrics, also saved as ``result.json``. Figures in
docs/benchmarks.md ("Quantized dense").
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
from typing import Literal

from experiments.common import finish, parse_config, prepare_process
from kernels import activations

VARIANTS = ("f32", "xla_w8", "xla_dequant", "numba_w8", "xla_w8a8", "numba_w8a8")
QUICK_SIZES = (1024,)


@dataclasses.dataclass(frozen=True)
class Config:
    # K = N = 1024 only instead of every size.
    quick: bool = False
    # Rows M of x (the batch).
    batches: tuple[int, ...] = (1, 32, 512)
    # K = N of the layer: x is [M, K], w [K, N].
    sizes: tuple[int, ...] = (512, 1024, 2048)
    # The activation of every timed call.
    activation: Literal[activations.NAMES] = "relu"
    # Timed samples per shape and variant (medians reported), after `warmup` untimed ones.
    repeats: int = 15
    # Untimed calls per shape and variant before the timed ones (the first compiles).
    warmup: int = 3
    # Each sample repeats the call until it lasts at least this long (small shapes).
    min_sample_s: float = 0.002
    # Time the Numba handlers' cold start in fresh processes (an empty Numba cache, then a warm one).
    cold: bool = True
    # Seeds the random x, w and b.
    seed: int = 0


def quantize(w):
    """Per-output-channel symmetric int8 (``jaxnet.compress.quantize_weight``'s rule):
    ``(w_q int8 [K, N], scale float32 [N])``."""
    import jax.numpy as jnp

    scale = jnp.max(jnp.abs(w), axis=0) / 127
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale.astype(jnp.float32)


def _problem(m: int, k: int, n: int, seed: int):
    import jax

    keys = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(keys[0], (m, k))
    w = jax.random.normal(keys[1], (k, n)) / math.sqrt(k)
    b = jax.random.normal(keys[2], (n,))
    return (x, w, b, *quantize(w))


def _fns(activation: str) -> dict:
    """Variant -> jitted ``f(x, w, b, w_q, scale)``."""
    import jax

    import kernels

    def q(backend, act_quant):
        return jax.jit(lambda x, w, b, w_q, s: kernels.quantized_dense(
            x, w_q, s, b, activation=activation, act_quant=act_quant, backend=backend))

    act = activations.get(activation)
    return {
        "f32": jax.jit(lambda x, w, b, w_q, s: kernels.fused_dense(x, w, b, activation=activation, backend="xla")),
        "xla_w8": q("xla", None),
        "xla_dequant": jax.jit(lambda x, w, b, w_q, s: act(x @ (w_q.astype(x.dtype) * s) + b)),
        "numba_w8": q("numba", None),
        "xla_w8a8": q("xla", "int8"),
        "numba_w8a8": q("numba", "int8"),
    }


def _check(fns: dict, args, activation: str) -> None:
    """Every variant agrees with the reference of its mode before it is timed."""
    import numpy as np

    from kernels import reference

    x, w, b, w_q, s = args
    want = {aq: np.asarray(reference.quantized_dense(x, w_q, s, b, activation=activation, act_quant=aq))
            for aq in (None, "int8")}
    for name, f in fns.items():
        if name != "f32":
            got = np.asarray(f(*args))
            np.testing.assert_allclose(got, want["int8" if name.endswith("w8a8") else None], rtol=1e-4, atol=1e-4)


def run(config: Config) -> list[dict]:
    from kernels.timing import interleaved_medians, timed_call

    fns = _fns(config.activation)
    rows = []
    for k in QUICK_SIZES if config.quick else config.sizes:
        for m in config.batches:
            args = _problem(m, k, k, config.seed)
            _check(fns, args, config.activation)
            samplers = {name: timed_call(f, args, min_sample_s=config.min_sample_s) for name, f in fns.items()}
            t = interleaved_medians(samplers, config.repeats, config.warmup)
            row = {"M": m, "K": k, "N": k}
            for name in VARIANTS:
                row[f"{name}_us"] = round(t[name] * 1e6, 1)
                row[f"{name}_gops"] = round(2 * m * k * k / t[name] / 1e9, 2)
                if name != "f32":
                    row[f"{name}_vs_f32"] = round(t["f32"] / t[name], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def int8_dot_vs_f32(config: Config, size: int = 512) -> dict:
    """XLA's int8 dot (exact int32 accumulation) against its float32 dot at ``size``^3."""
    import jax
    import jax.numpy as jnp

    from kernels.quantized import int8_dot
    from kernels.timing import interleaved_medians, timed_call

    keys = jax.random.split(jax.random.key(config.seed), 2)
    a, b = (jax.random.normal(k, (size, size)) for k in keys)
    qa, qb = (jnp.clip(jnp.round(v * 40), -127, 127).astype(jnp.int8) for v in (a, b))
    f32 = jax.jit(lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST))
    t = interleaved_medians({"f32": timed_call(f32, (a, b), min_sample_s=config.min_sample_s),
                             "int8": timed_call(jax.jit(int8_dot), (qa, qb), min_sample_s=config.min_sample_s)},
                            config.repeats, config.warmup)
    return {"dot_size": size, "dot_f32_us": round(t["f32"] * 1e6, 1), "dot_int8_us": round(t["int8"] * 1e6, 1),
            "dot_int8_vs_f32": round(t["f32"] / t["int8"], 3)}


COLD_START = """
import time
import jax, jax.numpy as jnp
import kernels
x, w_q, s = jnp.ones((4, 8)), jnp.ones((8, 3), jnp.int8), jnp.ones(3)
out = []
for act_quant in (None, "int8"):
    t = time.perf_counter()
    kernels.quantized_dense(x, w_q, s, act_quant=act_quant, backend="numba").block_until_ready()
    out.append(round(time.perf_counter() - t, 3))
print(*out)
"""


def cold_start() -> dict:
    """Seconds of the first numba call per mode in a fresh process (handler compiled or loaded,
    registered, XLA compile, run), with an empty Numba cache and then with the one it filled."""
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for state in ("empty", "warm"):
            res = subprocess.run([sys.executable, "-c", COLD_START], capture_output=True, text=True, check=True,
                                 env=env)
            w8, w8a8 = (float(v) for v in res.stdout.split())
            out.update({f"cold_{state}_cache_w8_s": w8, f"cold_{state}_cache_w8a8_s": w8a8})
    return out


def table(rows: list[dict]) -> str:
    head = ["M", "K = N", "f32 µs"] + [f"{v} µs (x f32)" for v in VARIANTS[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["M"], r["K"], r["f32_us"]] + [f"{r[f'{v}_us']} ({r[f'{v}_vs_f32']:.2f}x)" for v in VARIANTS[1:]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def summarize(rows: list[dict]) -> dict:
    """Per batch: each mode's fastest variant, and numba's speed-up over xla (geometric mean over sizes)."""
    summary = {}
    for m in sorted({r["M"] for r in rows}):
        at = [r for r in rows if r["M"] == m]
        for mode, names in (("w8", ("xla_w8", "numba_w8", "xla_dequant")), ("w8a8", ("xla_w8a8", "numba_w8a8"))):
            ratio = math.exp(sum(math.log(r[f"xla_{mode}_us"] / r[f"numba_{mode}_us"]) for r in at) / len(at))
            summary[f"numba_vs_xla_{mode}_M{m}"] = round(ratio, 3)
            summary[f"fastest_{mode}_M{m}"] = sorted({min(names, key=lambda v: r[f"{v}_us"]) for r in at})
            summary[f"best_{mode}_vs_f32_M{m}"] = round(min(max(r[f"{v}_vs_f32"] for v in names) for r in at), 3)
    return summary


def main(argv=None) -> dict:
    prepare_process()  # keeps freed host memory: the kernels' scratch would page-fault every call otherwise
    config, flags = parse_config(Config, argv, name="bench_quantized", description=__doc__.splitlines()[0],
                                 trains=False)
    rows = run(config)
    result = {**summarize(rows), **int8_dot_vs_f32(config), **(cold_start() if config.cold else {})}
    flags.workdir.mkdir(parents=True, exist_ok=True)
    (flags.workdir / "rows.json").write_text(json.dumps(rows, indent=1) + "\n")
    (flags.workdir / "table.md").write_text(table(rows))
    print(table(rows), flush=True)
    return finish(result, flags.workdir, config, flags.argv)


if __name__ == "__main__":
    main()
