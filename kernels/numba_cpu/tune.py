"""Measures blockings around the derived one on this machine and stores the one to use.

    python -m kernels.numba_cpu.tune              # float32, seconds (docs/benchmarks.md)
    python -m kernels.numba_cpu.tune --dtype float64
    python -m kernels.numba_cpu.tune --reset      # forget this machine's tuned blockings

Times the numba backend's forward+backward (relu, with bias) at ``SHAPES`` for each of
``candidates(derive(...))``, all interleaved sample by sample (``kernels.timing``) so that they
share the machine's noise. A candidate replaces the derived blocking only when its geometric
mean time is below the derived one's by more than the noise (``margin``). Then, with the
blocking kept, it times the same step on one thread and shared with XLA's pool at
``THRESHOLD_SHAPES`` (2^19 to 2^24 multiply-adds) and keeps the size from which sharing wins
(``pick_threshold``) as ``parallel_min_macs``: the cost of handing blocks to the pool is a
property of the machine (on an Intel Xeon VM sharing lost up to 2^21 multiply-adds, where the
model says 2^19). The blocking kept (the derived one if nothing beat it) is stored in
``TuningCache("numba_blocking")``, which later processes read (``blocking.chosen``). A host that
lends this VM's other vCPU elsewhere for a while makes sharing lose where it would win (up to
every shape: docs/benchmarks.md), so a threshold above the model's is a sighting, not yet an
answer: this process uses it and stores only a note of it, and the next process tunes again and
stores the smaller of the two thresholds (a slow spell only ever raises one); run again, this
command keeps the smaller of its threshold and the one stored. Prints the
machine, each candidate's times, the choice and the cache file, and ends with one JSON line of
the same.

``blocking.chosen`` runs ``tune`` (silently) at the first use of a dtype when nothing is stored
for this machine and these versions; this command runs it again at will (more ``--repeats``: a
finer margin). ``gemm_nt``'s mb, nb, lb are left derived: the shapes here run the panel GEMM only.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics

import jax

from kernels.machine import TuningCache, describe
from kernels.numba_cpu._kernels import MR, NR
from kernels.numba_cpu.blocking import CACHE_KIND, NEVER, Blocking, derive

# (M, K, N): forward+backward at these, the geometric mean of their medians scores a candidate.
SHAPES = ((512, 512, 512), (1024, 1024, 1024))
# A candidate must beat the derived blocking by at least this fraction, and by twice the noise.
MIN_GAIN = 0.03
# (M, K, N) doubling the multiply-adds from 2^19 to 2^24: where sharing work with XLA's pool
# starts to pay is measured among these.
THRESHOLD_SHAPES = ((64, 64, 128), (128, 64, 128), (128, 128, 128), (256, 128, 128), (256, 256, 128),
                    (256, 256, 256))


def candidates(base: Blocking) -> list[Blocking]:
    """``base`` first, then one change each: kc halved or doubled (pg scaled the other way, so the
    L2 block keeps its size), pg halved or doubled, pmb halved or doubled, dwt halved or doubled;
    last, kc about where the strip of X alone fills half of L1 (in float32; W's micro-panel
    streamed, as the constants before the model had it), pg scaled."""
    out = [base]
    strip_only = base.kc * (MR + NR) // (2 * MR) // 16 * 16
    for kc in (base.kc // 2, base.kc * 2):
        out.append(base.replace(kc=max(kc, 16), pg=max(1, base.pg * base.kc // max(kc, 16))))
    for pg in (base.pg // 2, base.pg * 2):
        out.append(base.replace(pg=max(pg, 1)))
    for pmb in (base.pmb // 2, base.pmb * 2):
        out.append(base.replace(pmb=max(pmb // MR * MR, MR)))  # whole register tiles
    for dwt in (base.dwt // 2, base.dwt * 2):  # SHAPES' rows: 2 and 4 KiB in float32, each side of a page
        out.append(base.replace(dwt=max(dwt, 1)))
    out.append(base.replace(kc=max(strip_only, 16), pg=max(1, base.pg * base.kc // max(strip_only, 16))))
    unique = []
    for c in out:
        if c.validate() not in unique:
            unique.append(c)
    return unique


def measure(blockings: list[Blocking], *, dtype="float32", shapes=SHAPES, repeats: int = 7, warmup: int = 1,
            min_sample_s: float = 0.0) -> list[dict[tuple, list[float]]]:
    """Seconds of the numba forward+backward, per blocking, per shape: ``repeats`` samples each,
    all blockings and shapes interleaved in ``interleaved_samples``' balanced orders (none always
    first in a round, or always after the same other: the first of a round measured slower here)."""
    from kernels.autotune import problem, step_functions
    from kernels.numba_cpu import backend
    from kernels.timing import interleaved_samples, timed_call

    samplers = {}
    for i, blk in enumerate(blockings):
        for shape in shapes:
            fn, args = step_functions("numba", "relu")[1], problem(*shape, dtype)  # a fresh jit: traced below
            with backend.use_blocking(blk):  # traced here: the executable carries blk's attributes
                jax.block_until_ready(fn(*args))
            samplers[i, shape] = timed_call(fn, args, min_sample_s=min_sample_s)
    times = interleaved_samples(samplers, repeats, warmup)
    return [{shape: times[i, shape] for shape in shapes} for i in range(len(blockings))]


def score(times: dict[tuple, list[float]]) -> tuple[float, float]:
    """(geometric mean of the shapes' medians, relative noise: the median absolute deviation
    over the median, averaged over the shapes)."""
    meds = [statistics.median(ts) for ts in times.values()]
    noise = [statistics.median(abs(t - m) for t in ts) / m for ts, m in zip(times.values(), meds)]
    return math.exp(sum(map(math.log, meds)) / len(meds)), sum(noise) / len(noise)


def pick(blockings: list[Blocking], times: list[dict]) -> tuple[int, float]:
    """Index of the blocking to keep (0, the derived one, unless another beats it by more than
    ``max(MIN_GAIN, 2 * noise)``) and that margin."""
    scores = [score(t) for t in times]
    margin = max(MIN_GAIN, 2 * scores[0][1])
    best = min(range(len(blockings)), key=lambda i: scores[i][0])
    return (best if scores[best][0] < scores[0][0] * (1 - margin) else 0), margin


def pick_threshold(single: dict[tuple, list[float]], shared: dict[tuple, list[float]], derived: int) -> int:
    """``parallel_min_macs`` from times on one thread and shared, per (M, K, N): the multiply-adds
    of the smallest shape from which sharing is faster by more than ``MIN_GAIN`` at every larger
    shape too; ``derived`` if that is the smallest shape measured and ``derived`` is below it;
    twice the largest if sharing wins at none, or not at the largest (noise otherwise)."""
    shapes = sorted(single, key=math.prod)
    wins = [statistics.median(shared[s]) < (1 - MIN_GAIN) * statistics.median(single[s]) for s in shapes]
    first = len(shapes)
    while first > 0 and wins[first - 1]:
        first -= 1
    if first == len(shapes):
        return 2 * math.prod(shapes[-1])
    return min(derived, math.prod(shapes[0])) if first == 0 else math.prod(shapes[first])


def _sighting_key(dtype: str) -> str:
    """The cache entry's key noting one process's threshold above the model's for ``dtype``."""
    return f"{dtype} parallel_min_macs seen once"


def _seen_before(value: dict, dtype: str) -> int | None:
    """The threshold a process before measured for ``dtype``: noted (and removed from ``value``),
    else stored with a blocking (this command tunes again at will), else None."""
    noted = value.pop(_sighting_key(dtype), None)
    entry = value.get(dtype)
    stored = entry.get("parallel_min_macs") if isinstance(entry, dict) else None
    return next((v for v in (noted, stored) if type(v) is int and v > 0), None)


def tune(dtype="float32", repeats: int = 7, shapes=SHAPES, log=print) -> dict:
    """Measures ``candidates`` on this machine, stores the winner (or removes the entry), and
    returns a summary."""
    machine = describe()
    base = derive(machine, dtype, (MR, NR))  # for the tile compiled here
    blockings = candidates(base)
    log(f"machine: {json.dumps(machine.as_dict())}")
    times = measure(blockings, dtype=dtype, shapes=shapes, repeats=repeats)
    best, margin = pick(blockings, times)
    rows = []
    for i, (blk, t) in enumerate(zip(blockings, times)):
        gflops = [6 * math.prod(s) / statistics.median(ts) / 1e9 for s, ts in t.items()]
        geo, noise = score(t)
        rows.append({"blocking": blk.as_dict(), "geomean_ms": round(geo * 1e3, 3), "noise": round(noise, 4),
                     "gflops": [round(g, 1) for g in gflops]})
        log(f"{'*' if i == best else ' '} {'derived ' if i == 0 else 'candidate'} kc={blk.kc} pg={blk.pg} "
            f"pmb={blk.pmb} dwt={blk.dwt}: {geo * 1e3:8.2f} ms geomean, noise {noise:.1%}, GFLOP/s "
            + " / ".join(f"{g:.1f} at {'x'.join(map(str, s))}" for g, s in zip(gflops, t)))
    kept = blockings[best]
    cache = TuningCache(CACHE_KIND, machine)
    value = cache.get()
    value = dict(value) if isinstance(value, dict) else {}
    seen = _seen_before(value, dtype)
    sharing, sighting = None, None
    if base.parallel_min_macs < NEVER:  # more than one core
        single, shared = measure([kept.replace(parallel_min_macs=NEVER), kept.replace(parallel_min_macs=1)],
                                 dtype=dtype, shapes=THRESHOLD_SHAPES, repeats=repeats, min_sample_s=0.002)
        measured = pick_threshold(single, shared, base.parallel_min_macs)
        if measured > base.parallel_min_macs and seen is None:
            sighting = measured  # above the model's, a first time: noted, not stored
        threshold = measured if seen is None else min(measured, seen)
        sharing = {"derived": base.parallel_min_macs, "measured": measured, "seen_before": seen,
                   "us": {"x".join(map(str, sh)): [round(statistics.median(single[sh]) * 1e6, 1),
                                                   round(statistics.median(shared[sh]) * 1e6, 1)]
                          for sh in THRESHOLD_SHAPES}}
        log("one thread / shared, µs: " + ", ".join(f"{k} {a} / {b}" for k, (a, b) in sharing["us"].items()))
        log(f"parallel_min_macs: derived {base.parallel_min_macs}, measured {measured}"
            + (f", measured before {seen}: kept {threshold}" if seen is not None else ""))
        kept = kept.replace(parallel_min_macs=threshold)
    stored = sighting is None
    if stored:  # the derived blocking too: later processes do not measure again
        value[dtype] = kept.as_dict()
    else:  # the next process measures again
        value.pop(dtype, None)
        value[_sighting_key(dtype)] = sighting
    cache.store(value, "kernels.numba_cpu.tune's blocking")
    choice = "tuned" if best else "derived"
    log(f"choice: {choice} (needed {margin:.1%} over derived), cache file: {cache.path}"
        + ("" if stored else "; a threshold above the model's, seen once: not stored, the next process tunes again"))
    return {"dtype": dtype, "choice": choice, "blocking": kept.as_dict(), "margin": round(margin, 4),
            "candidates": rows, "sharing": sharing, "stored": stored, "cache_file": str(cache.path),
            "machine": machine.as_dict()}


def reset() -> str:
    """Removes this machine's tuned blockings (every dtype); returns the file's path."""
    cache = TuningCache(CACHE_KIND)
    cache.path.unlink(missing_ok=True)
    return str(cache.path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kernels.numba_cpu.tune", description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--repeats", type=int, default=7, help="timed samples per candidate and shape")
    parser.add_argument("--reset", action="store_true", help="forget this machine's tuned blockings and stop")
    args = parser.parse_args(argv)
    if args.reset:
        print(json.dumps({"reset": reset()}))
        return
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    from jaxnet.runtime import keep_host_memory

    keep_host_memory()  # as in the benchmarks: scratch memory is not page-faulted afresh each call
    summary = tune(args.dtype, args.repeats)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
