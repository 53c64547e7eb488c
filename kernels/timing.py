"""Timing for benchmarks: medians of repeated samples after warm-up, every call waited for.

    t = median_seconds(jax.jit(f), (x, w), repeats=10, warmup=2)         # one function
    m = interleaved_medians({"xla": timed_call(f, args), "numba": timed_call(g, args)}, repeats=15)

A *sampler* is a function of no arguments that returns seconds (per call, per step: whatever it
measures). ``interleaved_samples`` calls several in turn, round after round, so that a busy or
drifting machine slows each alike, and ratios taken from one run compare like with like; the
rounds' orders are balanced, so that no sampler always follows the same one.
Every helper of the project's benchmarks (``experiments.bench_*``, ``kernels.pallas_gpu.bench``
and its autotuner) times through this module. Tuners that may first run while a caller's
function is being traced (``backend="auto"``'s table, the numba blocking) measure inside
``untraced``.
"""
from __future__ import annotations

import contextvars
import statistics
import threading
import time
from typing import Callable, Mapping, TypeVar

import jax

Sampler = Callable[[], float]
T = TypeVar("T")


def timed_call(fn: Callable, args: tuple, *, min_sample_s: float = 0.0) -> Sampler:
    """A sampler of seconds per call of ``fn(*args)``, ended by ``block_until_ready``.

    With ``min_sample_s > 0`` each sample loops enough calls to last about that long (small
    problems, whose single calls are too short to time): creating the sampler then runs ``fn``
    twice, to compile and to measure one call.
    """
    reps = 1
    if min_sample_s > 0:
        jax.block_until_ready(fn(*args))
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        reps = max(1, int(min_sample_s / max(time.perf_counter() - t, 1e-7)))

    def sample() -> float:
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / reps

    return sample


def interleaved_samples(samplers: Mapping[str, Sampler], repeats: int, warmup: int = 0, *,
                        after_round: Callable[[int, dict[str, list[float]]], None] | None = None
                        ) -> dict[str, list[float]]:
    """Samples of each sampler, taken in turn: ``warmup`` untimed rounds, then ``repeats`` rounds,
    each round in the next of ``balanced_orders`` (kept rounds start from the first order).

    Args:
      samplers: name -> sampler.
      repeats: rounds kept; warmup: rounds run first and dropped (compilation, caches, pools).
      after_round: called after each kept round with its index and the samples so far (progress).

    Returns:
      name -> the ``repeats`` samples, in order.
    """
    names = list(samplers)
    orders = [[names[i] for i in order] for order in balanced_orders(len(names))]
    for r in range(warmup):
        for name in orders[r % len(orders)]:
            samplers[name]()
    times: dict[str, list[float]] = {name: [] for name in samplers}
    for r in range(repeats):
        for name in orders[r % len(orders)]:
            times[name].append(samplers[name]())
        if after_round is not None:
            after_round(r, times)
    return times


def balanced_orders(n: int) -> list[list[int]]:
    """The orders ``interleaved_samples`` takes its rounds in: a Williams design (Williams 1949,
    "Experimental designs balanced for the estimation of residual effects of treatments").

    Over the ``n`` rows (``2n`` for odd ``n``) each of ``0 .. n-1`` stands in every position
    equally often, and directly follows every other equally often. A sample is moved by the one
    before it (a small XLA program read 30-60% slower right after a Numba kernel than after
    itself: docs/benchmarks.md), so in a fixed order each sampler would always pay its own
    predecessor's toll, and two runs in different orders could rank a near-tie oppositely.
    """
    if n <= 1:
        return [list(range(n))]
    first = [0] + [(j + 1) // 2 if j % 2 else n - j // 2 for j in range(1, n)]  # 0, 1, n-1, 2, n-2, ...
    rows = [[(v + i) % n for v in first] for i in range(n)]
    return rows + [row[::-1] for row in rows] if n % 2 else rows


def interleaved_medians(samplers: Mapping[str, Sampler], repeats: int, warmup: int = 0) -> dict[str, float]:
    """The median of each sampler's ``interleaved_samples``."""
    return {name: statistics.median(ts) for name, ts in interleaved_samples(samplers, repeats, warmup).items()}


def median_of(sample: Sampler, repeats: int, warmup: int = 0) -> float:
    """Median of ``repeats`` samples of one sampler after ``warmup`` untimed ones."""
    return interleaved_medians({"": sample}, repeats, warmup)[""]


def median_seconds(fn: Callable, args: tuple, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn(*args)`` over ``repeats`` runs after ``warmup`` (at least one: the
    compile) untimed runs."""
    return median_of(timed_call(fn, args), repeats, max(1, warmup))


def untraced(fn: Callable[[], T]) -> T:
    """``fn()`` run where no JAX trace is active, and its result.

    Tuners time kernels at their first use, usually while a caller's ``jit`` is tracing. There,
    jitted calls (even under ``jax.ensure_compile_time_eval``) miss JAX's fast dispatch path and
    pay Python-side costs that differ between backends: a numba layer at 256x64x256 timed 3x
    slower, enough to flip ``auto``'s choice (docs/benchmarks.md, "Tables timed outside the
    caller's trace"). So the thread's tracing context is set to JAX's top level while ``fn``
    runs, and restored after. That context is JAX's internal (``jax._src.core.trace_ctx``);
    where a JAX lacks it, ``fn`` runs on a thread of its own instead (its trace state is
    fresh), with the caller's context variables and x64 setting: right for all but the Numba
    kernels' scratch blocks over 64 MB, which a thread's own malloc arena maps afresh per call.
    """
    found = _tracing_context()
    if found is None:
        return _on_own_thread(fn)
    ctx, top_trace, top_axis_env = found
    outer = (ctx.trace, ctx.axis_env)
    ctx.set_trace(top_trace)
    ctx.set_axis_env(top_axis_env)
    try:
        return fn()
    finally:
        ctx.set_trace(outer[0])
        ctx.set_axis_env(outer[1])


def _tracing_context():
    """``(JAX's per-thread tracing context, its top-level trace, its top-level axis env)``, or
    None where this JAX lacks them (they are internal: jax 0.10 to 0.12 have them)."""
    try:
        from jax._src import core

        ctx = core.trace_ctx
        if not all(hasattr(ctx, a) for a in ("trace", "axis_env", "set_trace", "set_axis_env")):
            return None
        return ctx, core.eval_trace, core.top_axis_env
    except (ImportError, AttributeError):
        return None


def _on_own_thread(fn: Callable[[], T]) -> T:
    """``fn()`` on a new thread (no trace active there), with this thread's context variables
    and x64 setting; its exception raised here."""
    context = contextvars.copy_context()
    x64 = bool(jax.config.jax_enable_x64)
    out: dict = {}

    def target():
        try:
            with jax.enable_x64(x64):
                out["value"] = context.run(fn)
        except BaseException as err:  # noqa: BLE001 - raised again in the caller's thread
            out["error"] = err

    thread = threading.Thread(target=target, name="jaxnet-untraced", daemon=True)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


__all__ = ["Sampler", "balanced_orders", "interleaved_medians", "interleaved_samples", "median_of", "median_seconds",
           "timed_call", "untraced"]
