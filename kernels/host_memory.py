"""Host allocator settings for XLA's CPU runtime and the Numba kernels (no JAX import here).

    from jaxnet import runtime                        # re-exports keep_host_memory
    runtime.keep_host_memory()                       # any process: big blocks stay in the heap
    runtime.keep_host_memory(single_arena=True)      # a training process with huge steps

Nothing calls this on import: an entry point opts in (every experiment's ``main`` does, through
``experiments.common.prepare_process``; a library user may call it first thing in a script).

Why: XLA's CPU runtime allocates one temporary buffer per execution of a compiled program (the
activations a train step keeps for its backward pass) and frees it when the step ends; the Numba
kernels allocate their scratch (packed panels) per call. glibc's malloc serves blocks that large
with a fresh ``mmap`` and returns them with ``munmap``, so every call page-faults (and the kernel
zeroes) them again. ``keep_host_memory`` raises glibc's mmap threshold (big blocks come from the
heap) and trim threshold (the heap's free top is kept), so later calls reuse the pages. Blocks
larger than a thread's heap (64 MB), allocated on XLA's worker threads, still get a fresh
``mmap`` from those threads' own arenas; ``single_arena=True`` makes every thread use the main
heap, which can hold them. One arena makes threads share one malloc lock, which slows small
programs, so only the language-model experiments ask for it. The figures behind both are in
docs/benchmarks.md (Language: "Step overhead"; the Numba kernels: their scratch memory).

The price is resident memory: the process keeps its peak heap instead of returning it between
steps, as a caching allocator (PyTorch's or XLA's on GPUs) does anyway.
``JAXNET_KEEP_HOST_MEMORY=0`` turns every call into a no-op.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# mallopt takes an int: the largest threshold it can express (2 GiB - 1).
_INT_MAX = 2**31 - 1

_state = {"applied": None, "single_arena": False}


def _mallopt():
    """glibc's ``mallopt``, or None (not Linux, not glibc, or turned off by the environment)."""
    if os.environ.get("JAXNET_KEEP_HOST_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def keep_host_memory(threshold_bytes: int = _INT_MAX, *, single_arena: bool = False) -> bool:
    """Keeps freed host memory in the process (glibc only; elsewhere a no-op returning False).

    Idempotent: the thresholds are set by the first call, the single arena by the first call
    that asks for it. ``single_arena`` must come before JAX runs its first computation (threads
    that have already allocated keep their own arenas). ``MALLOC_ARENA_MAX=1
    MALLOC_MMAP_THRESHOLD_=... MALLOC_TRIM_THRESHOLD_=...`` in the environment does the same for
    any process.

    Not for PyTorch processes: one arena slows PyTorch's CPU autocast step (docs/benchmarks.md),
    which is why ``experiments.bench_lm`` times PyTorch in a child process without these settings.

    Args:
      threshold_bytes: blocks below this size come from the heap, and up to this much free heap
        is kept; at most 2**31 - 1 (mallopt's int).
      single_arena: every thread allocates from the main heap (see the module docstring).

    Returns:
      True when the settings asked for are in place (now or from an earlier call).
    """
    if not 0 < threshold_bytes <= _INT_MAX:
        raise ValueError(f"threshold_bytes must be in (0, 2**31 - 1], got {threshold_bytes}")
    if _state["applied"] is None or (single_arena and _state["applied"] and not _state["single_arena"]):
        mallopt = _mallopt()
        ok = mallopt is not None
        if ok and _state["applied"] is None:
            ok = all(mallopt(param, threshold_bytes) == 1 for param in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD))
        if ok and single_arena:
            ok = _state["single_arena"] = mallopt(_M_ARENA_MAX, 1) == 1
        _state["applied"] = ok
    return bool(_state["applied"]) and (_state["single_arena"] or not single_arena)


__all__ = ["keep_host_memory"]
