"""The CPU dispatch table of ``fused_dense(..., backend="auto")``: per shape, the backend measured fastest here.

    choose(256, 784, 128, "float32", "relu", ["xla", "numba"])                 # -> "numba" (say)
    choose(256, 784, 128, "float32", "relu", ["xla", "numba"], mode="fwd")     # inference alone
    tune([(512, 512, 512), (8, 4096, 4096)], "float32", "relu")                 # measure up front

A *bucket* is (M rounded up to a power of two, K, N, dtype, activation); M is x's rows (the
product of its leading dimensions), the one size that changes from call to call of a layer
(batch sizes, a last partial batch), while K and N are the layer's own: kept exact, because
backends rank differently at K or N = 10 and 16. The first time a process meets a bucket that
no earlier process measured on this machine, each candidate's forward and forward+backward
(the VJP: y, dx, dW, db, as ``experiments.bench_kernels`` times it) run on fresh arrays of the
bucket's shape, interleaved, medians of a few samples (``kernels.timing``; three times as many
where the two fastest are within 25%): about a second for small buckets, seconds for the
largest. The fastest per mode is kept in memory and in ``TuningCache("fused_dense_auto")``
(``kernels.machine``: keyed by the CPU, the versions of jaxnet, jax, jaxlib and numba and the
kernels' sources), so later processes read it instead of measuring. Every entry is measured once
more by the next process that meets it (one started after it was measured: processes started
together, such as a launch's ranks, share the first measurement), and each backend keeps the
faster of its two medians (a passing load only ever adds time; a slow spell of the machine's
thread handoffs can make the backend that shares its work read 1.6-3.2x slower for a whole
measurement, however far apart the two were: docs/benchmarks.md). An entry that does not name
one of today's candidates (a hand edit, a corrupted file, a backend gone) is measured again,
never trusted.

The same table serves other ops with a backend choice: an ``Op`` names what is timed (its modes,
operands and step functions), and its buckets carry its name (``kernels.quantized`` times
``quantized_dense`` per mode this way). ``FUSED_DENSE`` is the default.

``JAXNET_AUTO=rank`` turns measuring off: "auto" then takes the best-ranked backend
(``kernels.dispatch.auto_candidates``; XLA on the CPU), the same every run. ``forget()`` drops
this process's copy of the table; ``kernels.machine.reset()`` deletes the files.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import statistics
import threading
import time
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp

from kernels import timing
from kernels.dispatch import auto_candidates, fused_dense
from kernels.machine import TuningCache, tuning_dir

KIND = "fused_dense_auto"
POLICY_ENV = "JAXNET_AUTO"
MODES = ("fwd", "fwd+bwd")
# Samples per candidate and mode (medians kept), each looping calls for at least MIN_SAMPLE_S:
# enough to split backends that differ by more than the machine's noise, cheap at small shapes.
REPEATS = 5
MIN_SAMPLE_S = 0.002
# A close call (in some mode, the two fastest within CLOSE of each other: a shared machine's
# run-to-run noise) takes MORE_REPEATS more rounds before the medians are compared.
CLOSE = 0.25
MORE_REPEATS = 10
# Every entry is decided from this many measurements, each in another process (the first
# process to meet the bucket, then the next ones): a load or a slow spell that slowed one backend
# throughout a measurement is not kept for good.
CONFIRMATIONS = 2
# Another backend replaces the preferred (best-ranked) one only when it is faster by more than
# this fraction: a tie within the noise goes to the same backend every run.
MARGIN = 0.03

_lock = threading.Lock()
_tables: dict[str, dict] = {}  # tuning_dir() -> {bucket: entry}, this process's copy


def _process_started() -> float:
    """This process's start as a Unix time: from /proc (Linux, to 10 ms), else this module's import."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


# An entry measured since this process started (by one running beside it, e.g. the other ranks of
# a launch) is used as it is, so that processes started together run the same backends; one
# measured before is an earlier process's, and is confirmed.
_STARTED = _process_started()


def policy() -> str:
    """``$JAXNET_AUTO``: "measure" (the default) or "rank"."""
    value = os.environ.get(POLICY_ENV, "") or "measure"
    if value not in ("measure", "rank"):
        raise ValueError(f"{POLICY_ENV} must be 'measure' or 'rank', got {value[:80]!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Op:
    """What a table entry times: ``problem(m, k, n, dtype)`` makes the operands (a tuple) and
    ``steps(backend, activation)`` the jitted functions of them, one per mode in ``modes``."""

    name: str
    modes: tuple[str, ...]
    problem: Callable
    steps: Callable


def _steps(backend: str, activation: str):
    """``(fwd, fwd_bwd)`` of ``(x, w, b, dy)``, not jitted (see ``step_functions``)."""
    f = lambda x, w, b: fused_dense(x, w, b, activation=activation, backend=backend)  # noqa: E731

    def fwd_bwd(x, w, b, dy):
        y, vjp = jax.vjp(f, x, w, b)
        return y, vjp(dy)

    return (lambda x, w, b, dy: f(x, w, b)), fwd_bwd


def step_functions(backend: str, activation: str):
    """``(fwd, fwd_bwd)``, jitted, both of ``(x, w, b, dy)``: ``y``, and ``(y, (dx, dw, db))`` from
    the VJP with cotangent ``dy``; what the table and ``experiments.bench_kernels`` time."""
    return tuple(jax.jit(fn) for fn in _steps(backend, activation))


def problem(m: int, k: int, n: int, dtype="float32", seed: int = 0, *, models: int = 0):
    """``(x [m, k], w [k, n] / sqrt(k), b [n], dy [m, n])``, standard normal: the operands that the
    table, ``experiments.bench_kernels`` and ``kernels.numba_cpu.tune`` time ``step_functions`` on.
    With ``models`` > 0, w, b and dy carry a leading axis of that many models (x stays shared)."""
    keys = jax.random.split(jax.random.key(seed), 4)
    dt = jnp.dtype(dtype)
    lead = (models,) if models else ()
    return (jax.random.normal(keys[0], (m, k), dt),
            (jax.random.normal(keys[1], (*lead, k, n), dt) / math.sqrt(k)).astype(dt),
            jax.random.normal(keys[2], (*lead, n), dt), jax.random.normal(keys[3], (*lead, m, n), dt))


FUSED_DENSE = Op("fused_dense", MODES, problem, step_functions)

# A batch of models' weights is timed on at most this many bytes of stacked w (and at least two
# models): the batch a sweep runs, or a slice of it when its layer is large.
MODELS_MAX_BYTES = 32 * 2**20


def _batched_problem(models: int, m: int, k: int, n: int, dtype="float32", seed: int = 0):
    """``problem``'s operands for a batch: x ``[m, k]`` shared, w ``[B, k, n]``, b ``[B, n]``, dy
    ``[B, m, n]``, with B = ``models`` or fewer (``MODELS_MAX_BYTES``, at least 2)."""
    size = max(2, min(models, MODELS_MAX_BYTES // (max(k * n, 1) * jnp.dtype(dtype).itemsize)))
    return problem(m, k, n, dtype, seed, models=size)


def _batched_steps(backend: str, activation: str):
    """``step_functions`` under ``jax.vmap`` over the models (x shared), jitted."""
    return tuple(jax.jit(jax.vmap(fn, in_axes=(None, 0, 0, 0))) for fn in _steps(backend, activation))


@functools.lru_cache(maxsize=None)
def model_batch_op(models: int) -> Op:
    """The op that "auto" times inside ``kernels.dispatch.models_batched(models)``: ``fused_dense``
    under ``jax.vmap`` over stacked weights and biases, x shared (the first layer of a sweep; later
    layers' x is per model too), ``models`` rounded up to a power of two (fewer when the stacked w
    would pass ``MODELS_MAX_BYTES``). Its buckets end in ``fused_dense_models<that size>``."""
    size = 1 << max(0, int(models) - 1).bit_length()
    return Op(f"fused_dense_models{size}", MODES, functools.partial(_batched_problem, size), _batched_steps)


def bucket(m: int, k: int, n: int, dtype, activation: str, op: Op = FUSED_DENSE) -> str:
    """The table's key, e.g. ``"256x784x100 float32 relu"`` for m=200, k=784, n=100 (fused_dense;
    another op's name follows, e.g. ``"... relu quantized_dense_int8"``)."""
    m = 1 << max(0, int(m) - 1).bit_length()
    suffix = "" if op is FUSED_DENSE else f" {op.name}"
    return f"{m}x{int(k)}x{int(n)} {jnp.dtype(dtype).name} {activation}{suffix}"


def _measure(key: str, candidates: Sequence[str], op: Op) -> dict:
    """A table entry for ``key``: each candidate's median µs per mode and the fastest per mode."""
    dims, dtype, activation = key.split()[:3]
    m, k, n = (int(d) for d in dims.split("x"))

    def sample() -> dict[str, list[float]]:
        args = op.problem(m, k, n, dtype)
        samplers = {}
        for name in candidates:
            for mode, fn in zip(op.modes, op.steps(name, activation)):
                samplers[f"{name} {mode}"] = timing.timed_call(fn, args, min_sample_s=MIN_SAMPLE_S)
        samples = timing.interleaved_samples(samplers, REPEATS, warmup=1)
        if _close(samples, candidates, op.modes):
            more = timing.interleaved_samples(samplers, MORE_REPEATS)
            samples = {key: samples[key] + more[key] for key in samples}
        return samples

    # "auto" is usually met while tracing a caller's jit or grad: time away from that trace.
    samples = timing.untraced(sample)
    t = {key: statistics.median(v) for key, v in samples.items()}
    us = {name: {mode: round(t[f"{name} {mode}"] * 1e6, 2) for mode in op.modes} for name in candidates}
    return _decided(us, candidates, op.modes, measurements=1)


def _decided(us: dict, candidates: Sequence[str], modes: Sequence[str], measurements: int) -> dict:
    """The entry for medians ``us[name][mode]`` (µs): the fastest per mode, the preferred
    (``candidates[0]``) unless another beats it by more than ``MARGIN``."""
    best = {}
    for mode in modes:
        fastest = min(candidates, key=lambda name: us[name][mode])
        best[mode] = fastest if us[fastest][mode] < (1 - MARGIN) * us[candidates[0]][mode] else candidates[0]
    return {**best, "candidates": sorted(candidates), "us": us, "measurements": measurements,
            "measured_at": time.time()}


def _close(samples: dict[str, list[float]], candidates: Sequence[str], modes: Sequence[str]) -> bool:
    """Whether in some mode the two fastest candidates' medians are within ``CLOSE``."""
    for mode in modes:
        fastest = sorted(statistics.median(samples[f"{name} {mode}"]) for name in candidates)[:2]
        if len(fastest) == 2 and fastest[1] < (1 + CLOSE) * fastest[0]:
            return True
    return False


def _confirmed(old: dict, new: dict, candidates: Sequence[str], modes: Sequence[str]) -> dict:
    """An entry decided again from two measurements: each candidate's faster median per mode
    (a passing load only ever adds time)."""
    us = {name: {mode: min(old["us"][name][mode], new["us"][name][mode]) for mode in modes} for name in candidates}
    return _decided(us, candidates, modes, measurements=old.get("measurements", 1) + 1)


def _trusted(entry, candidates: Sequence[str], modes: Sequence[str]) -> bool:
    def positive(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")
    us = entry.get("us") if isinstance(entry, dict) else None
    return (isinstance(entry, dict) and entry.get("candidates") == sorted(candidates)
            and all(entry.get(mode) in candidates for mode in modes) and isinstance(us, dict)
            and all(isinstance(us.get(name), dict) and all(positive(us[name].get(mode)) for mode in modes)
                    for name in candidates))


def _settled(entry, candidates: Sequence[str], modes: Sequence[str]) -> bool:
    """Whether a stored entry is used as it is: trusted, and measured by ``CONFIRMATIONS`` processes
    or by one running beside this one (since it started)."""
    if not _trusted(entry, candidates, modes):
        return False
    at = entry.get("measured_at")
    return entry.get("measurements", 1) >= CONFIRMATIONS or (isinstance(at, (int, float)) and at >= _STARTED)


def _stored(cache: TuningCache) -> dict:
    value = cache.get()
    return value if isinstance(value, dict) else {}


def entry(m: int, k: int, n: int, dtype, activation: str, candidates: Sequence[str], op: Op = FUSED_DENSE) -> dict:
    """The bucket's entry ``{"fwd": name, "fwd+bwd": name, "candidates": [...], "us": {name: {mode: µs}},
    "measurements": n, "measured_at": unix time}`` (one name per mode of ``op``): from this process's
    table, else from disk (measured once by an earlier process: measured again and the two
    combined), else measured now; stored."""
    key = bucket(m, k, n, dtype, activation, op)
    with _lock:
        table = _tables.setdefault(str(tuning_dir()), {})
        if _trusted(table.get(key), candidates, op.modes):
            return table[key]
        cache = TuningCache(KIND)
        found = _stored(cache).get(key)
        if _settled(found, candidates, op.modes):
            table[key] = found
            return found
        with cache.locked():  # processes meeting the bucket at once: one measures, the others read
            found = _stored(cache).get(key)
            if not _trusted(found, candidates, op.modes):
                found = _measure(key, candidates, op)
            elif not _settled(found, candidates, op.modes):
                found = _confirmed(found, _measure(key, candidates, op), candidates, op.modes)
            else:
                table[key] = found
                return found
            on_disk = _stored(cache)  # another process may have added buckets meanwhile
            on_disk[key] = found
            cache.store(on_disk, "kernels.autotune's dispatch table")
        table[key] = found
        return found


def choose(m: int, k: int, n: int, dtype, activation: str, candidates: Sequence[str], *,
           mode: str = "fwd+bwd", op: Op = FUSED_DENSE) -> str:
    """The candidate measured fastest for ``x: [m, k] @ w: [k, n]`` in ``mode`` (one of ``op.modes``:
    "fwd" or "fwd+bwd" for fused_dense).

    Args:
      m, k, n: x's rows (product of its leading dimensions), K and N.
      dtype: the operands' dtype; activation: an activation name.
      candidates: backend names, the preferred first: it is returned without measuring when it
        is the only one or a dimension is 0, and kept unless another is faster by over ``MARGIN``.
    """
    candidates = list(candidates)
    if mode not in op.modes:
        raise ValueError(f"kernels.autotune.choose: mode must be one of {op.modes}, got {str(mode)[:80]!r}")
    if not candidates:
        raise ValueError("kernels.autotune.choose: candidates is empty")
    if len(candidates) == 1 or min(m, k, n) == 0:
        return candidates[0]
    return entry(m, k, n, dtype, activation, candidates, op)[mode]


def tune(shapes: Iterable[tuple[int, int, int]], dtype="float32", activation: str = "relu",
         candidates: Sequence[str] | None = None) -> dict[tuple[int, int, int], dict]:
    """Measures (or reads) the entries of ``shapes`` ((M, K, N) each) now, before anything is timed.

    ``candidates`` defaults to the CPU's (``kernels.dispatch.auto_candidates("cpu")``).
    """
    names = list(candidates or auto_candidates("cpu"))
    return {tuple(s): entry(*s, dtype, activation, names) for s in shapes}


def forget() -> None:
    """Drops this process's copy of the table (the files stay: ``kernels.machine.reset()``)."""
    with _lock:
        _tables.clear()


__all__ = ["FUSED_DENSE", "KIND", "MODELS_MAX_BYTES", "MODES", "POLICY_ENV", "Op", "bucket", "choose", "entry",
           "forget", "model_batch_op", "policy", "problem", "step_functions", "tune"]
