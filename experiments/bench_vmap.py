"""Benchmark: ``kernels.fused_dense`` under ``jax.vmap`` over x with w and b shared (issue 20).

    python -m experiments.bench_vmap            # B = 256, M = 1, K = N = 1024: ~1 minute on 2 cores
    python -m experiments.bench_vmap --m 8      # a bigger M per element

x is ``[B, M, K]`` vmapped over B, w ``[K, N]`` and b ``[N]`` unbatched, activation relu,
float32. Each (backend, mode) runs in a fresh process, so its peak RSS (``ru_maxrss``: the
interpreter, JAX and the compiled programs included) is its own; the time is the median of
``repeats`` calls after ``warmup``, each waited for. Modes:

- ``baseline``: ``forward`` at B = 1, M = K = N = 8: the process's own footprint (Numba and LLVM
  weigh ~0.1 GB more than XLA alone), to subtract from the others.
- ``forward``: ``jit(vmap(f))``.
- ``grad``: ``jit(grad(sum(sin(vmap(f)))))`` in x, w and b (the gradient of a vmapped loss).
- ``vmap_grad_x``: ``jit(vmap(grad(loss, x)))`` (per-example gradients in x only).

The result holds each figure and the numba / xla ratios of time and peak RSS. Results in
docs/benchmarks.md ("Numba under vmap").
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

from experiments.common import finish, parse_config, prepare_process

MODES = ("baseline", "forward", "grad", "vmap_grad_x")
BACKENDS = ("numba", "xla")


@dataclasses.dataclass(frozen=True)
class Config:
    # The vmapped batch B (issue 20's shape: 256).
    b: int = 256
    # Rows M of each batch element's x: [M, K].
    m: int = 1
    # Contraction size K: x is [M, K], w is [K, N].
    k: int = 1024
    # Outputs N: w is [K, N], b is [N].
    n: int = 1024
    # Timed calls per (backend, mode), after the warm-up calls.
    repeats: int = 5
    # Untimed calls before the timed ones (the first compiles).
    warmup: int = 2


CHILD = """
import json, resource, sys
from experiments.bench_vmap import measure
print(json.dumps(measure(*json.loads(sys.argv[1]))))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def measure(backend: str, mode: str, config: dict) -> dict:
    """Seconds per call (median) of ``mode`` on ``backend``; run in a fresh process by ``main``."""
    prepare_process()
    import jax
    import jax.numpy as jnp

    import kernels
    from kernels.timing import median_of, timed_call

    c = Config(**config) if mode != "baseline" else Config(b=1, m=8, k=8, n=8)
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (c.b, c.m, c.k))
    w = jax.random.normal(keys[1], (c.k, c.n)) / c.k ** 0.5
    b = jax.random.normal(keys[2], (c.n,))
    f = lambda x, w, b: kernels.fused_dense(x, w, b, activation="relu", backend=backend)  # noqa: E731
    loss = lambda x, w, b: jnp.sum(jnp.sin(f(x, w, b)))  # noqa: E731
    fn = {
        "baseline": jax.vmap(f, (0, None, None)),
        "forward": jax.vmap(f, (0, None, None)),
        "grad": jax.grad(lambda x, w, b: jnp.sum(jnp.sin(jax.vmap(f, (0, None, None))(x, w, b))), (0, 1, 2)),
        "vmap_grad_x": jax.vmap(jax.grad(loss), (0, None, None)),
    }[mode]
    return {"s": median_of(timed_call(jax.jit(fn), (x, w, b)), c.repeats, c.warmup)}


def _run_child(backend: str, mode: str, config: Config) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps([backend, mode, dataclasses.asdict(config)])],
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"{backend} {mode} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    line, maxrss_kib = proc.stdout.strip().splitlines()[-2:]
    return {**json.loads(line), "peak_rss_gb": round(int(maxrss_kib) * 1024 / 1e9, 3)}


def main(argv=None) -> dict:
    prepare_process()
    config, flags = parse_config(Config, argv, name="bench_vmap", description=__doc__.splitlines()[0], trains=False)
    import os

    import jax

    from jaxnet.runtime import cpu_model, machine

    rows = {}
    for mode in MODES:
        got = {be: _run_child(be, mode, config) for be in BACKENDS}
        nb, xla = got["numba"], got["xla"]
        rows[mode] = {"numba_s": round(nb["s"], 6), "xla_s": round(xla["s"], 6),
                      "time_ratio_numba_over_xla": round(nb["s"] / xla["s"], 2),
                      "numba_peak_rss_gb": nb["peak_rss_gb"], "xla_peak_rss_gb": xla["peak_rss_gb"],
                      "rss_ratio_numba_over_xla": round(nb["peak_rss_gb"] / xla["peak_rss_gb"], 2)}
        print(mode, json.dumps(rows[mode]), flush=True)
    result = {"benchmark": "vmap", "cpu": cpu_model(), "machine": machine(), "jax": jax.__version__,
              "load_average": os.getloadavg(),
              "shape": {"B": config.b, "M": config.m, "K": config.k, "N": config.n}, "modes": rows}
    return finish(result, flags.workdir, config, flags.argv)


if __name__ == "__main__":
    main()
