"""Training throughput of jaxnet's TransformerLM against the same model in PyTorch, side by side.

    python -m experiments.bench_lm                   # the lm experiment's default model, ~1 minute
    python -m experiments.bench_lm --batch-size 64 --model.dropout-rate 0
    python -m experiments.bench_lm --model.dtype bfloat16 --torch-autocast   # mixed precision on both sides
    python -m experiments.bench_lm --breakdown       # then where jaxnet's step time goes (jaxnet.profiling)

Both sides train the same network (``--model.*``, a ``TransformerConfig``) on the same (batch,
time) windows of the default corpus, one full AdamW update per step; PyTorch is
``jaxnet.baselines.torch_lm`` with as many threads as JAX's CPU client uses cores (``--threads``,
default all), in a spawned child process with glibc's default allocator settings (this process
keeps freed memory for JAX, ``prepare_process``, which slows PyTorch's autocast step).
Repeats alternate between the two (``kernels.timing.interleaved_samples``: jaxnet then PyTorch,
PyTorch then jaxnet, ...) so a busy shared machine slows both alike; each side's figure is the median of
its repeats after warm-up (and the best repeat, the least disturbed, beside it), timed to
completion (``block_until_ready`` / synchronous PyTorch); beside the ratio of the medians, each
round's own ratio (``speedup_vs_pytorch_per_repeat``) and their median (``..._paired``). Tokens/s
= batch x block / step time; GFLOP/s from ``flops_per_token`` (6N + 12 L C T). Measured
(docs/benchmarks.md "Language", quiet machine): jaxnet f32 vs PyTorch f32 1.65-1.89x (e.g. 18,222
vs 11,050 tokens/s); jaxnet bf16 vs PyTorch bf16 autocast 1.61-1.73x; jaxnet bf16 vs PyTorch f32
2.67-2.72x. Under load PyTorch's threads collapse and the ratio reads 2.7-6.5x.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import statistics
import sys
import time
from typing import ClassVar

import numpy as np

from experiments.common import enable_compilation_cache, finish, parse_config, prepare_process
from jaxnet.baselines.torch_lm import check_supported
from jaxnet.models.transformer import TransformerConfig


@dataclasses.dataclass(frozen=True)
class Config:
    # The network; its vocab_size comes from the corpus. The lm experiment's model until it moved
    # to context 256 and bf16 (session 17): the one every throughput figure in docs was measured on.
    model: TransformerConfig = TransformerConfig(dropout_rate=0.15)
    derived: ClassVar[tuple[str, ...]] = ("model.vocab_size",)
    # Windows per step (each model.block_size tokens long).
    batch_size: int = 32
    # Timed steps per repeat, >= 1.
    steps: int = 4
    # Timed repeats per side, jaxnet and PyTorch alternating (medians are reported), >= 1.
    repeats: int = 7
    # Untimed warm-up steps per side before the timed ones (jaxnet's first compiles).
    warmup: int = 2
    # PyTorch threads (0: os.cpu_count()).
    threads: int = 0
    # Measure PyTorch too (needs torch installed).
    torch: bool = True
    # Run PyTorch's forward and loss under torch.autocast("cpu", dtype=torch.bfloat16) (its
    # mixed precision: bf16 matmuls, f32 parameters), the like-for-like partner of --model.dtype bfloat16.
    torch_autocast: bool = False
    # After the timing, trace `steps` more jaxnet steps (jax.profiler) and report where their time
    # went: matmuls and other work, per pass (jaxnet.profiling; the trace stays in <workdir>/profile).
    breakdown: bool = False


def jax_side(config: Config, windows):
    """``run(n)``: ``n`` jitted, state-donating AdamW updates of ``TransformerLM(config.model)``, timed;
    ``run.breakdown(folder, n)``: ``n`` more, traced there, and ``jaxnet.profiling.step_breakdown``'s
    summary of them."""
    import jax
    import jax.numpy as jnp

    from jaxnet import losses, optim
    from jaxnet.models.transformer import TransformerLM
    from jaxnet.train import TrainState, make_train_step

    model = TransformerLM(config.model)
    tx = optim.make_optimizer(optim.OptimizerConfig(name="adamw", learning_rate=1e-3, weight_decay=0.1,
                                                    clip_norm=1.0))
    state = TrainState.create(model=model, tx=tx, sample_x=windows[0][0], seed=0)
    step = jax.jit(make_train_step(losses.cross_entropy), donate_argnums=0)
    batches = [{"x": jnp.asarray(x), "y": jnp.asarray(y)} for x, y in windows]
    rng = jax.random.key(1)
    box = {"state": state, "i": 0}

    def run(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            box["state"], m = step(box["state"], batches[box["i"] % len(batches)], rng)
            box["i"] += 1
        jax.block_until_ready((box["state"].params, m))
        return time.perf_counter() - t

    def breakdown(folder, n: int) -> dict:
        from jaxnet import profiling

        hlo = step.lower(box["state"], batches[0], rng).compile().as_text()  # what the jit cache runs
        with jax.profiler.trace(str(folder)):
            run(n)
        return profiling.step_breakdown(folder, hlo, steps=n)

    run.breakdown = breakdown
    return run


def _torch_child(conn, config: Config, windows) -> None:
    """The PyTorch side in its own process: answers each ``n`` sent with ``run(n)``'s seconds."""
    from jaxnet.baselines.torch_lm import torch_trainer

    try:
        run, n_params = torch_trainer(config.model, windows, threads=config.threads, autocast=config.torch_autocast)
    except ImportError as e:
        conn.send(("missing", str(e)))
        return
    conn.send(("ready", n_params))
    while (n := conn.recv()) is not None:
        conn.send(run(n))


def torch_in_child(config: Config, windows):
    """``(run, n_params, close)`` for the PyTorch side running in a spawned child process.

    The child is started with ``JAXNET_KEEP_HOST_MEMORY=0``: jaxnet's allocator settings
    (``jaxnet.runtime.keep_host_memory``, which this process applies for JAX) slow PyTorch's
    autocast step, so PyTorch is timed with glibc's defaults, as it would run on its own, whatever
    the child imports. Raises ImportError when torch is not installed.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    saved = os.environ.get("JAXNET_KEEP_HOST_MEMORY")
    os.environ["JAXNET_KEEP_HOST_MEMORY"] = "0"
    try:
        proc = ctx.Process(target=_torch_child, args=(child, config, windows), daemon=True)
        proc.start()
    finally:
        if saved is None:
            del os.environ["JAXNET_KEEP_HOST_MEMORY"]
        else:
            os.environ["JAXNET_KEEP_HOST_MEMORY"] = saved
    status, payload = parent.recv()
    if status != "ready":
        proc.join()
        raise ImportError(payload)

    def run(n: int) -> float:
        parent.send(n)
        return parent.recv()

    def close() -> None:
        parent.send(None)
        proc.join(timeout=30)

    return run, payload, close


def benchmark(config: Config, workdir=None) -> dict:
    """Times both sides on the default corpus' windows, alternating; returns the result (with
    ``config.breakdown``, traced under ``<workdir>/profile``, default runs/bench_lm)."""
    import jax

    from jaxnet.data.text import pydoc_corpus, random_windows
    from kernels.timing import interleaved_samples

    corpus = pydoc_corpus()
    config = dataclasses.replace(config, model=config.model.replace(vocab_size=len(corpus.vocab)))
    block = config.model.block_size
    windows = [tuple(np.asarray(a) for a in random_windows(jax.random.key(i), corpus.train, config.batch_size, block))
               for i in range(8)]
    sides = {"jaxnet": jax_side(config, windows)}
    close_torch, torch_params = None, None
    if config.torch:
        check_supported(config.model)  # here, not as a crash in the child
        try:
            sides["pytorch"], torch_params, close_torch = torch_in_child(config, windows)
        except ImportError:
            print("bench_lm: torch is not installed (pip install 'jaxnet[torch]'); jaxnet only", file=sys.stderr)
    load_before = os.getloadavg()[0]
    for run in sides.values():  # warm-up: compilation, allocator, thread pools
        run(config.warmup)
    tokens = config.batch_size * block

    def progress(r: int, times: dict) -> None:
        print(f"repeat {r + 1}/{config.repeats}: " + ", ".join(
            f"{n} {tokens / t[-1]:.0f} tok/s" for n, t in times.items()), file=sys.stderr, flush=True)

    per_step = {name: (lambda run=run: run(config.steps) / config.steps) for name, run in sides.items()}
    times = interleaved_samples(per_step, config.repeats, after_round=progress)
    if close_torch is not None:
        close_torch()
    result = throughput_result(config, times, torch_params, load_before)
    if config.breakdown:
        folder = pathlib.Path(workdir or "runs/bench_lm") / "profile"
        result["breakdown"] = breakdown_result(sides["jaxnet"].breakdown(folder, config.steps), result, tokens)
    return result


def breakdown_result(summary: dict, result: dict, tokens: int) -> dict:
    """``jaxnet.profiling.step_breakdown``'s summary in ms per step, printed as a table, with the
    tokens/s of its matmul bound (every other instruction free) beside the measured figures."""
    from jaxnet.profiling import breakdown_table

    print(breakdown_table(summary), file=sys.stderr)
    ms = lambda s: round(s * 1e3, 2)  # noqa: E731
    out = {"busy_ms": ms(summary["busy_s"]), "cores": summary["cores"],
           "instructions_seen": summary["instructions_seen"],
           "by_kind_ms": {k: ms(v) for k, v in summary["by_kind"].items()},
           "by_pass_ms": {p: {k: ms(v) for k, v in kinds.items()} for p, kinds in summary["by_pass"].items()},
           "matmul_bound_ms": ms(summary["matmul_bound_s"]),
           "matmul_bound_tokens_per_s": round(tokens / summary["matmul_bound_s"], 1),
           "top": [{**{k: v for k, v in t.items() if k != "s"}, "ms": ms(t["s"])} for t in summary["top"]]}
    if "pytorch_tokens_per_s" in result:
        out["matmul_bound_vs_pytorch"] = round(out["matmul_bound_tokens_per_s"] / result["pytorch_tokens_per_s"], 3)
    print(f"matmul bound: {out['matmul_bound_ms']} ms/step, {out['matmul_bound_tokens_per_s']:.0f} tokens/s"
          + (f", {out['matmul_bound_vs_pytorch']}x PyTorch's median" if "matmul_bound_vs_pytorch" in out else ""),
          file=sys.stderr)
    return out


def throughput_result(config: Config, times: dict[str, list[float]], torch_params: int | None,
                      load_before: float) -> dict:
    """The result line: per side the median and best tokens/s, GFLOP/s, and the speed-ups."""
    import jax.numpy as jnp

    from jaxnet.models.transformer import count_params, flops_per_token

    fpt = flops_per_token(config.model)
    tokens = config.batch_size * config.model.block_size
    result = {"experiment": "bench_lm", "params": count_params(config.model),
              "batch_size": config.batch_size, "block_size": config.model.block_size,
              "dtype": jnp.dtype(config.model.dtype).name, "torch_autocast": config.torch_autocast,
              "dropout_rate": config.model.dropout_rate, "positions": config.model.positions,
              "cpu_count": os.cpu_count(), "flops_per_token": fpt, "repeats": config.repeats,
              "steps_per_repeat": config.steps,
              # The machine's 1-minute load average around the measurement (a shared machine).
              "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2)}
    for name, ts in times.items():
        med = statistics.median(ts)
        result[f"{name}_step_ms"] = round(med * 1e3, 2)
        result[f"{name}_tokens_per_s"] = round(tokens / med, 1)
        result[f"{name}_gflops"] = round(tokens * fpt / med / 1e9, 2)
        # The fastest repeat: the least disturbed by other jobs.
        result[f"{name}_best_tokens_per_s"] = round(tokens / min(ts), 1)
        result[f"{name}_tokens_per_s_per_repeat"] = [round(tokens / t) for t in ts]
    if "pytorch" in times:
        result["pytorch_params"] = torch_params
        result["speedup_vs_pytorch"] = round(result["jaxnet_tokens_per_s"] / result["pytorch_tokens_per_s"], 3)
        result["speedup_vs_pytorch_best"] = round(
            result["jaxnet_best_tokens_per_s"] / result["pytorch_best_tokens_per_s"], 3)
        # Each round ran the two sides back to back, so their ratio shares that round's machine state:
        # the rounds' ratios show how much the run's figure moved, and their median resists a slow spell.
        pairs = [p / j for j, p in zip(times["jaxnet"], times["pytorch"])]
        result["speedup_vs_pytorch_per_repeat"] = [round(r, 3) for r in pairs]
        result["speedup_vs_pytorch_paired"] = round(statistics.median(pairs), 3)
    return result


def main(argv=None) -> dict:
    # Before JAX starts: the train step's large temporary buffer is allocated on XLA's worker
    # threads, and only the main heap can keep a block that large (kernels/host_memory.py).
    prepare_process(single_arena=True)
    config, flags = parse_config(Config, argv, name="bench_lm", description=__doc__.splitlines()[0], trains=False)
    enable_compilation_cache()
    return finish(benchmark(config, flags.workdir), flags.workdir, config, flags.argv)


if __name__ == "__main__":
    main()
