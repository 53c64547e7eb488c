"""Host allocator settings for XLA's CPU runtime and the Numba kernels (no JAX import here).

    from jaxnet import runtime       # re-exports kernels.host_memory.keep_host_memory
    runtime.keep_host_memory()      # first thing in a training process

Applied by the ``experiments`` package on import and by the "numba" backend of
``kernels.fused_dense`` on first use (its scratch, e.g. 4 MB of packed panels per call at
1024^3, page-faulted on every call the same way: 3-4 ms, a quarter of the backward pass).

XLA's CPU runtime allocates one temporary buffer per execution of a compiled program (the
transformer LM's train step: ~450 MB for the activations kept for the backward pass) and frees it
when the step ends. glibc's malloc serves a block that large with a fresh ``mmap`` and gives it
back with ``munmap``, so every step page-faults (and the kernel zeroes) the whole buffer again:
measured 114k minor faults and ~40% of the LM's step time on a 2-core machine. Its worker threads
allocate from per-thread arenas whose heaps cannot hold such a block either, so they ``mmap`` it
whatever the threshold says. ``keep_host_memory`` makes freed memory stay in the process: one
arena, a large mmap threshold (big blocks come from the heap) and a large trim threshold (the
heap's free top is not returned to the kernel), so the second step reuses the first step's pages.

The price is resident memory: the process keeps its peak heap (the largest step's buffers)
instead of returning it between steps, which is what a caching allocator (PyTorch's on GPUs,
XLA's on GPUs) does anyway.
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

_state = {"applied": None}


def keep_host_memory(threshold_bytes: int = _INT_MAX) -> bool:
    """Keeps freed host memory in the process (glibc only; elsewhere a no-op returning False).

    Call it before JAX runs its first computation: threads that have already allocated keep
    their own arenas. Idempotent. ``MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=...
    MALLOC_TRIM_THRESHOLD_=...`` in the environment does the same for any process;
    ``JAXNET_KEEP_HOST_MEMORY=0`` turns this call into a no-op (returning False).

    Not for PyTorch processes: with one arena PyTorch's CPU autocast step ran ~1.8x slower here
    (its f32 step was unaffected), which is why ``experiments.bench_lm`` times PyTorch in a child
    process without these settings.

    Args:
      threshold_bytes: blocks below this size come from the heap, and up to this much free heap
        is kept; at most 2**31 - 1 (mallopt's int).

    Returns:
      True when the settings were applied (now or by an earlier call).
    """
    if not 0 < threshold_bytes <= _INT_MAX:
        raise ValueError(f"threshold_bytes must be in (0, 2**31 - 1], got {threshold_bytes}")
    if _state["applied"] is not None:
        return _state["applied"]
    ok = False
    if os.environ.get("JAXNET_KEEP_HOST_MEMORY", "1") == "0":
        pass
    elif sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
            mallopt = None
        if mallopt is not None:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            ok = all(mallopt(param, value) == 1 for param, value in (
                (_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, threshold_bytes), (_M_TRIM_THRESHOLD, threshold_bytes)))
    _state["applied"] = ok
    return ok


__all__ = ["keep_host_memory"]
