"""Benchmark: the seed's 1000-epoch loop in jaxnet against the seed's PyTorch loop, same run.

    python -m experiments.bench_seed            # ~1 minute on 2 cores

Two figures, each with its ratio (PyTorch time / jaxnet time, so > 1 means jaxnet is faster):

- **steady state**: the compiled loop alone — ``lax.scan`` over 1000 jitted SGD steps on
  SimpleNet against the seed's eager loop — median of ``--repeats`` after a warm-up, with
  ``block_until_ready``.
- **end to end**: a fresh Python process builds the model and data and trains 1000 epochs with
  ``jaxnet.seed.train_jaxnet`` (``fit``), compilation included, against a fresh process running
  the seed's PyTorch script; imports are excluded on both sides. JAX's persistent compilation
  cache is warmed by one untimed run first (the cold figure is reported too). PyTorch's first
  optimizer lazily imports ``torch._dynamo``; the strict figure does that before the clock.
- **whole process**: the same two processes timed from outside, interpreter start and imports
  included (the PyTorch process runs no JAX, but imports it: ``prepare_process`` reaches
  ``kernels.host_memory`` through the ``kernels`` package).

Both sides run on the same data and initial weights. Results in docs/benchmarks.md.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

from experiments.common import enable_compilation_cache, finish, parse_config, prepare_process
from kernels.timing import median_of, median_seconds


@dataclasses.dataclass(frozen=True)
class Config:
    # Rows of the seed's synthetic data set.
    n_samples: int = 256
    # Epochs (full-batch updates) of the seed's loop, >= 1.
    epochs: int = 1000
    # Timed repeats of the steady-state loops (medians are reported).
    repeats: int = 7
    # Timed repeats of each fresh process, end to end (medians are reported).
    process_repeats: int = 5
    # PyTorch intra-op thread counts to try (0: PyTorch's default, one per core); the fastest is
    # the baseline, so a thread setting that suffers on a busy machine cannot flatter jaxnet.
    torch_threads: tuple[int, ...] = (1, 0)


def _steady_state(config: Config) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxnet import losses, seed
    from jaxnet.train import make_train_step

    sc = seed.SeedConfig(n_samples=config.n_samples, epochs=config.epochs)
    data = seed.make_data(sc)
    batch = {"x": jnp.asarray(data.x), "y": jnp.asarray(data.y)}
    state0 = seed.make_state(sc, data)
    init = jax.tree.map(jnp.copy, state0.params)
    train_step = make_train_step(losses.mse)

    @jax.jit
    def loop(state):
        def body(s, _):
            s, m = train_step(s, batch, s.rng)
            return s, m["loss"]
        return jax.lax.scan(body, state, None, length=config.epochs)

    jax_s = median_seconds(loop, (state0,), config.repeats, warmup=1)  # the warm-up compiles

    import torch

    default_threads = torch.get_num_threads()
    per_threads = {}
    for threads in config.torch_threads:
        torch.set_num_threads(threads or default_threads)
        # The loop times itself (its wall time excludes loading the weights); one warm-up run
        # for the allocator and thread pool.
        per_threads[threads or default_threads] = median_of(lambda: seed.train_torch(sc, data, init)[1],
                                                            config.repeats, warmup=1)
    torch.set_num_threads(default_threads)
    best_threads, torch_s = min(per_threads.items(), key=lambda kv: kv[1])
    return {"steady_jaxnet_ms": round(jax_s * 1e3, 3), "steady_torch_ms": round(torch_s * 1e3, 3),
            "steady_torch_ms_by_threads": {t: round(v * 1e3, 3) for t, v in per_threads.items()},
            "steady_torch_threads": best_threads, "steady_speedup": round(torch_s / jax_s, 2)}


def _child(kind: str, n_samples: int, epochs: int) -> None:
    """One end-to-end run in this (fresh) process; prints its seconds as JSON."""
    if kind == "jax":
        from jaxnet import seed

        sc = seed.SeedConfig(n_samples=n_samples, epochs=epochs)
        start = time.perf_counter()
        data = seed.make_data(sc)
        final = seed.train_jaxnet(sc, data).history[-1]["loss"]
    else:
        # Only torch, NumPy and jaxnet's torch-only and NumPy-only modules run here.
        import torch

        from jaxnet.data.synthetic import make_regression
        from jaxnet.seed_torch import TorchSimpleNet, seed_loop

        torch.set_num_threads(int(os.environ.get("JAXNET_TORCH_THREADS", "0")) or torch.get_num_threads())
        if os.environ.get("JAXNET_TORCH_PREWARM") == "1":
            # PyTorch's first optimizer lazily imports torch._dynamo (~0.9 s here): count it as an
            # import, like JAX's and Flax's imports on the other side, for the strict comparison.
            torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        data = make_regression(n_samples, 10, noise_std=0.1, seed=0)
        start = time.perf_counter()  # model and optimiser creation included, as in the seed's script
        curve, _ = seed_loop(TorchSimpleNet(), data.x, data.y, learning_rate=0.01, epochs=epochs)
        final = float(curve[-1])
    print(json.dumps({"seconds": time.perf_counter() - start, "final_loss": final}))


def _run_child(kind: str, config: Config, cache_dir: str, torch_threads: int = 0, prewarm: bool = False,
               whole_process: bool = False) -> float:
    """Seconds of one fresh process's run after its imports (or, ``whole_process``, of the whole
    process: interpreter start, imports and all)."""
    env = dict(os.environ, JAXNET_CACHE_DIR=cache_dir, JAXNET_TORCH_THREADS=str(torch_threads),
               JAXNET_TORCH_PREWARM="1" if prewarm else "0")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "experiments.bench_seed", "--child", kind,
                          str(config.n_samples), str(config.epochs)],
                         env=env, capture_output=True, text=True, check=True)
    if whole_process:
        return time.perf_counter() - start
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def _end_to_end(config: Config) -> dict:
    with tempfile.TemporaryDirectory() as cache_dir:
        median = lambda f: median_of(f, config.process_repeats)  # noqa: E731
        cold = _run_child("jax", config, cache_dir)
        jax_s = median(lambda: _run_child("jax", config, cache_dir))
        per_threads = {t: median(lambda: _run_child("torch", config, cache_dir, t)) for t in config.torch_threads}
        best_threads, torch_s = min(per_threads.items(), key=lambda kv: kv[1])
        strict_s = median(lambda: _run_child("torch", config, cache_dir, best_threads, prewarm=True))
        proc_jax = median(lambda: _run_child("jax", config, cache_dir, whole_process=True))
        proc_torch = median(lambda: _run_child("torch", config, cache_dir, best_threads, whole_process=True))
    ms = lambda v: round(v * 1e3, 1)  # noqa: E731
    return {"e2e_jaxnet_cold_ms": ms(cold), "e2e_jaxnet_warm_ms": ms(jax_s), "e2e_torch_ms": ms(torch_s),
            "e2e_torch_ms_by_threads": {t: ms(v) for t, v in per_threads.items()},
            "e2e_speedup": round(torch_s / jax_s, 2),
            "e2e_torch_prewarmed_ms": ms(strict_s), "e2e_speedup_vs_prewarmed": round(strict_s / jax_s, 2),
            "process_jaxnet_ms": ms(proc_jax), "process_torch_ms": ms(proc_torch),
            "process_speedup": round(proc_torch / proc_jax, 2)}


def benchmark(config: Config) -> dict:
    """Both comparisons (steady state, end to end and whole process), printed as they finish."""
    import torch

    result = {"benchmark": "bench_seed", "n_samples": config.n_samples, "epochs": config.epochs,
              "torch_default_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    result.update(_steady_state(config))
    print(f"steady state: jaxnet {result['steady_jaxnet_ms']} ms, PyTorch {result['steady_torch_ms']} ms "
          f"({result['steady_torch_threads']} thread(s); by threads {result['steady_torch_ms_by_threads']}) "
          f"-> {result['steady_speedup']}x", flush=True)
    result.update(_end_to_end(config))
    print(f"end to end:   jaxnet {result['e2e_jaxnet_warm_ms']} ms (cold cache {result['e2e_jaxnet_cold_ms']} ms), "
          f"PyTorch {result['e2e_torch_ms']} ms (by threads, 0 = default: {result['e2e_torch_ms_by_threads']}) "
          f"-> {result['e2e_speedup']}x", flush=True)
    print(f"  PyTorch with its first optimizer's lazy imports done before the clock: "
          f"{result['e2e_torch_prewarmed_ms']} ms -> {result['e2e_speedup_vs_prewarmed']}x", flush=True)
    print(f"whole process (interpreter, imports, run): jaxnet {result['process_jaxnet_ms']} ms, "
          f"PyTorch {result['process_torch_ms']} ms -> {result['process_speedup']}x", flush=True)
    return result


def main(argv=None) -> dict:
    prepare_process()
    config, flags = parse_config(Config, argv, name="bench_seed", description=__doc__.splitlines()[0], trains=False)
    return finish(benchmark(config), flags.workdir, config, flags.argv)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        prepare_process()  # as in any experiment's process
        if sys.argv[2] == "jax":
            enable_compilation_cache()
        _child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
