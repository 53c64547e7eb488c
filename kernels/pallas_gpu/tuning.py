"""Block-size choice per problem shape: measured on a GPU, the default elsewhere.

``autotune`` times each candidate ``BlockConfig`` on the real kernels (forward, or forward +
backward) and caches the fastest per (M, N, K, dtype, activation) for the life of the process;
``fused_dense(config=None)`` then picks the cached choice up at trace time. On CPU (interpret
mode) timing says nothing about a GPU, so ``autotune`` returns the interpret default untimed.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.pallas_gpu.blocks import BlockConfig, clear_cache, default_config, problem_key, remember, tuned
from kernels.pallas_gpu.ops import fused_dense, resolve_lowering
from kernels.timing import median_of, timed_call

# Candidates for bf16/f16 on Hopper-class GPUs (tile, warps, pipeline depth), best-known first.
GPU_CANDIDATES = (
    BlockConfig(block_m=128, block_n=128, block_k=64, num_warps=4, num_stages=3),
    BlockConfig(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3),
    BlockConfig(block_m=256, block_n=128, block_k=64, num_warps=8, num_stages=3),
    BlockConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4),
    BlockConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4),
    BlockConfig(block_m=128, block_n=64, block_k=32, num_warps=4, num_stages=4),
)


def autotune(m: int, n: int, k: int, dtype=jnp.bfloat16, activation: str = "relu", *,
             candidates=GPU_CANDIDATES, backward: bool = True, repeats: int = 5,
             lowering: str = "auto", min_sample_s: float = 0.02) -> BlockConfig:
    """Returns (and caches) the fastest candidate for ``x: [m, k] @ w: [k, n]``.

    Off-GPU it returns the interpret default without timing anything. Candidates that fail to
    compile (e.g. too much shared memory for their stage count) are skipped; if all fail, the
    last error is raised. Each sample runs calls back to back for ``min_sample_s`` as
    ``kernels.pallas_gpu.bench`` does, so per-call dispatch does not blur the ranking.
    """
    lowering = resolve_lowering(lowering)
    if lowering == "interpret":
        return default_config(lowering)
    key = problem_key(m, n, k, dtype, activation)
    known = tuned(key)
    if known is not None:
        return known
    kx, kw, kb = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (m, k), dtype)
    w = (jax.random.normal(kw, (k, n), jnp.float32) / jnp.sqrt(k)).astype(dtype)
    b = jax.random.normal(kb, (n,), dtype)
    best, best_t, last_err = None, float("inf"), None
    for cfg in candidates:
        def fwd(x, w, b, cfg=cfg):
            return fused_dense(x, w, b, activation=activation, config=cfg, lowering=lowering)

        if backward:
            def step(x, w, b, fwd=fwd):
                y, vjp = jax.vjp(fwd, x, w, b)
                return vjp(y)
        else:
            step = fwd
        try:
            t = median_of(timed_call(jax.jit(step), (x, w, b), min_sample_s=min_sample_s), repeats, 1)
        except Exception as err:  # noqa: BLE001 - a candidate that does not compile is skipped
            last_err = err
            continue
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        raise RuntimeError(f"autotune: no candidate compiled for {key}; the last error: "
                           f"{type(last_err).__name__}: {str(last_err)[:300]}") from last_err
    remember(key, best)
    return best


__all__ = ["GPU_CANDIDATES", "autotune", "clear_cache"]
