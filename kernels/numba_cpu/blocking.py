"""The numba GEMMs' cache blocking: derived from the machine's caches, or as tuned on it.

    b = derive(describe(), "float32")    # Blocking(kc=176, pg=23, pmb=64, ...) on a 32 KiB / 1 MiB core
    chosen("float32")                    # what the backend uses: the stored entry, tuned at first use

The values reach the kernels as FFI attributes of every call (``_handlers``), never as
compiled-in constants, so one compiled kernel serves every blocking. The register tile
(``_kernels.register_tile``: MR x NR = 8 x 32 in float32 with AVX-512, 4 x 16 with AVX2; float64
has MR / 2 rows) is compiled in; here it is an input (mr, NR), not an output.

``derive`` is the analytical model of BLIS (Low et al., 2016, "Analytical modeling is enough for
high-performance BLIS") for this kernel's loops, S the element size:

- L1: the strip of X (mr x kc), reused across a block's panels, and the micro-panel of W
  (kc x NR) streaming past it share all ways of L1 but one (left to the C tile and prefetches).
  x86 L1s are virtually indexed, so a way is a 4 KiB page: ``kc = (l1d - 4 KiB) / ((mr + NR) * S)``,
  down to a whole cache line.
- L2: a block's packed panels (kc x pg*NR) fill half of L2: ``pg = L2 / (2 * kc * NR * S)``.
- rows: ``pmb`` (a multiple of MR) at most ``ROWS_SHARED / cores``, so that a mid-size problem
  still gives each core two blocks to balance; at least ``MIN_STRIPS`` register-tile strips reuse
  each W block (2 * pmb / S flops per byte of it brought in from L3); and the C and X blocks
  (pmb x (pg*NR + kc)) fit the other half of L2.
- ``gemm_nt`` (4 x 4 tiles of dot products): a 4 x lb strip of a in half of L1,
  ``lb = L1 / (8 * S)``; the nb x lb panel of b in half of L2; square blocks, mb = nb.
- dW = x.T @ g reads x.T in place, a stride of x's row a step; from rows of ``dwt`` bytes x is
  transposed first. ``dwt`` is a page: from there the strip of X's kc lines falls in one L1 set
  (each way is a page) and each line on its own page. Shorter rows still share sets (a 2 KiB row
  two), and whether the copy repays that depends on the L1's ways and the transpose's speed
  (measured: not on a 12-way 48 KiB L1, yes on an 8-way 32 KiB one), so the tuner measures half
  and twice a page.
- threads: handing blocks to XLA's pool costs about ``HANDOFF_MACS`` multiply-adds of work, and
  c cores share a problem's work c ways, so sharing pays from ``HANDOFF_MACS * c / (c - 1)``;
  one core never shares.

``chosen(dtype)`` is the blocking in force: the entry that the tuner (``kernels.numba_cpu.tune``)
stored in ``TuningCache(CACHE_KIND)`` (keyed by the machine, the versions of jaxnet, jax,
jaxlib and numba and the kernels' sources): a neighbour measured faster than the derived blocking, or the derived one
where none was. With no entry, the first use in a process tunes (seconds; docs/benchmarks.md)
and stores one, so that later processes read it (processes meeting it at once: one tunes, the
others wait for its entry, so that a job's processes run the same blocking). ``$JAXNET_NUMBA_BLOCKING``:
"tuned" (the default), "stored" (the entry, else ``derive``; never measures: the test suite) or
"derived" (always ``derive``: reproducible runs). ``python -m kernels.numba_cpu.tune --reset``
forgets the entries.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import threading

import numpy as np

from kernels import timing
from kernels.machine import Machine, TuningCache, describe
from kernels.numba_cpu._kernels import BLOCKING_FIELDS, MR, NR, register_tile

CACHE_KIND = "numba_blocking"
ENV = "JAXNET_NUMBA_BLOCKING"
POLICIES = ("tuned", "stored", "derived")
PAGE = 4096  # bytes in a way of an x86 L1 (virtually indexed: sets x line = a page)
# Rows that a mid-size problem (256^3, the smallest in the benchmarks' 0.8x target range below
# 512) should split into two blocks per core.
ROWS_SHARED = 256
MIN_STRIPS = 4
# Multiply-adds that handing blocks to XLA's pool costs (from the 2-core threshold measured at
# 2^19: docs/benchmarks.md, "PARALLEL_MIN_MACS").
HANDOFF_MACS = 1 << 18
NEVER = 1 << 62  # parallel_min_macs of one core
# The largest problem (multiply-adds) at which the tuner times sharing (``tune.THRESHOLD_SHAPES``):
# a tuned ``parallel_min_macs`` above it says that sharing won at no size timed.
THRESHOLD_MAX_MACS = 1 << 24
_first_use = threading.RLock()  # one tuning at a time in a process
# Caches assumed where the machine does not report a size.
_DEFAULT_L1, _DEFAULT_L2 = 32 << 10, 256 << 10


@dataclasses.dataclass(frozen=True)
class Blocking:
    """Cache blocking of the numba GEMMs, in elements (see the module docstring)."""
    kc: int  # panel GEMM: reduction block
    pg: int  # panel GEMM: panels (NR columns each) per block
    pmb: int  # panel GEMM: rows per block, a multiple of MR
    mb: int  # gemm_nt: rows of a per block
    nb: int  # gemm_nt: rows of b per block
    lb: int  # gemm_nt: reduction pass
    dwt: int  # backward: dW transposes x first from rows of this many bytes
    parallel_min_macs: int  # problems with fewer multiply-adds run on the calling thread

    def validate(self, mr: int = MR) -> Blocking:
        """Returns self, or raises ValueError naming the first bad field (pmb: a multiple of ``mr``,
        the float32 tile's rows; default: this process's compiled tile)."""
        for field in dataclasses.fields(self):
            v = getattr(self, field.name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v < 1 << 63:
                raise ValueError(f"Blocking.{field.name} must be an int in [1, 2**63), got {v!r:.80}")
        if self.pmb % mr:
            raise ValueError(f"Blocking.pmb must be a multiple of {mr} (the register tile's rows), got {self.pmb}")
        return self

    def replace(self, **changes) -> Blocking:
        return dataclasses.replace(self, **changes)

    def attributes(self) -> dict[str, np.int64]:
        """The blocking attributes of an FFI call (``_handlers``)."""
        return {name: np.int64(getattr(self, name)) for name in BLOCKING_FIELDS}

    def as_dict(self) -> dict[str, int]:
        return {field.name: int(getattr(self, field.name)) for field in dataclasses.fields(self)}


def tile_rows(dtype, mr: int = MR) -> int:
    """The rows of a register tile of ``mr`` float32 rows (default: the compiled one) in ``dtype``
    (``_kernels._mr``)."""
    return mr if np.dtype(dtype) == np.float32 else mr // 2


def _down(v: float, q: int) -> int:
    """``v`` down to a multiple of ``q``, at least ``q``."""
    return max(q, int(v) // q * q)


def derive(machine: Machine, dtype="float32", tile: tuple[int, int] | None = None) -> Blocking:
    """The blocking of the module docstring's model for ``machine``'s caches and cores.

    Args:
      machine: a ``kernels.machine.Machine`` (sizes of 0, unknown, read as 32 KiB L1d, 256 KiB L2).
      dtype: "float32" or "float64" (what the kernels run in).
      tile: the float32 register tile ``(MR, NR)`` it is for; default ``register_tile`` of the
        machine's vector width (``chosen`` passes the tile compiled in this process).
    """
    if np.dtype(dtype) not in (np.float32, np.float64):
        raise ValueError(f"derive: dtype must be float32 or float64, got {str(dtype):.80}")
    rows32, nr = tile or register_tile(machine.vector_bits)
    s, mr = np.dtype(dtype).itemsize, tile_rows(dtype, rows32)
    l1 = max(machine.l1d or _DEFAULT_L1, 2 * PAGE)
    l2 = max(machine.l2 or _DEFAULT_L2, l1)
    line = max(machine.line // s, 1)
    cores = max(machine.cores, 1)
    kc = _down((l1 - PAGE) / ((mr + nr) * s), line)
    pg = max(1, l2 // (2 * kc * nr * s))
    pmb = min(ROWS_SHARED // (2 * cores), l2 // (2 * s * (pg * nr + kc)))
    pmb = _down(max(pmb, MIN_STRIPS * mr), rows32)
    lb = _down(l1 / (8 * s), line)
    nb = _down(l2 / (2 * lb * s), 4)
    threshold = HANDOFF_MACS * cores // (cores - 1) if cores > 1 else NEVER
    return Blocking(kc=kc, pg=pg, pmb=pmb, mb=nb, nb=nb, lb=lb, dwt=PAGE, parallel_min_macs=threshold).validate(rows32)


def load(dtype="float32", machine: Machine | None = None) -> Blocking | None:
    """The tuned blocking for ``dtype`` on ``machine`` (default: this one), or None: none stored,
    or unusable (stored under another key, fields missing, unknown or invalid)."""
    value = TuningCache(CACHE_KIND, machine).get()
    entry = value.get(str(np.dtype(dtype))) if isinstance(value, dict) else None
    try:
        return Blocking(**entry).validate()
    except (TypeError, ValueError):
        return None


@functools.cache
def chosen(dtype: str = "float32") -> Blocking:
    """The blocking for ``dtype`` in this process (decided once): ``load(dtype)``, else tuned now
    and stored (``tune.tune``); ``derive(describe(), dtype, (MR, NR))`` (for the tile compiled
    here) when ``$JAXNET_NUMBA_BLOCKING`` is "derived", or "stored" and nothing is stored."""
    env = os.environ.get(ENV, "") or "tuned"
    if env not in POLICIES:
        raise ValueError(f"${ENV} must be one of {', '.join(POLICIES)} ('tuned', the default), got {env!r:.80}")
    with _first_use:
        stored = load(dtype) if env != "derived" else None
        if stored or env != "tuned":
            return stored or derive(describe(), dtype, (MR, NR))
        from kernels.numba_cpu import tune  # it imports this module

        with TuningCache(CACHE_KIND).locked():  # one process of a job on this machine tunes
            stored = load(dtype)  # what another process stored while this one waited
            if stored:
                return stored
            # Usually first met while tracing a caller's jit: time the kernels away from that trace.
            tuned = timing.untraced(lambda: tune.tune(dtype, log=lambda *a: None))
            return Blocking(**tuned["blocking"]).validate()


__all__ = ["CACHE_KIND", "ENV", "POLICIES", "Blocking", "chosen", "derive", "load", "register_tile", "tile_rows"]
