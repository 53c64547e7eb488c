"""Block configurations of the Pallas kernels and the autotuned choice per shape: a leaf module
(imports nothing of ``kernels.pallas_gpu``), read by ``ops`` at trace time and written by ``tuning``.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and launch parameters, shared by the forward, dx and dW kernels.

    The forward tile is (block_m, block_n) walking K by block_k; dx's tile is (block_m, block_k)
    walking N by block_n; dW's is (block_k, block_n) walking M by block_m. On a GPU the blocks
    must be powers of two of at least 16 (``tl.dot``); they are shrunk to fit small dimensions.
    """

    block_m: int = 128  # rows of x per tile
    block_n: int = 128  # columns of w per tile
    block_k: int = 64  # reduction step of the forward (and tile width of dx / dW)
    group_m: int = 8  # row tiles per launch group (L2 reuse of w panels; Triton tutorial 03)
    num_warps: int = 4  # Triton only
    num_stages: int = 3  # Triton only: software-pipelining depth of the reduction loop

    def replace(self, **kw) -> "BlockConfig":
        return dataclasses.replace(self, **kw)


# Interpret mode pays per grid step, not per flop: large tiles, few steps.
INTERPRET_DEFAULT = BlockConfig(block_m=128, block_n=128, block_k=128, group_m=1)
GPU_DEFAULT = BlockConfig()


# Shared memory one Triton program may use on Hopper (H100, H200: the 227 KiB opt-in maximum).
SHARED_MEMORY_BYTES = 232_448
# Kept free beside the pipeline's buffers for Triton's own scratch (epilogue layout conversions).
SHARED_MEMORY_RESERVE = 64 * 1024


def pipeline_stages(num_stages: int, stage_bytes: int) -> int:
    """The deepest software pipeline, at most ``num_stages``, whose buffers fit in shared memory.

    ``stage_bytes``: what one trip of the kernel's reduction loop loads (its tiles). Triton keeps
    ``num_stages - 1`` copies of them in shared memory; the backward kernels load three tiles per
    trip (dy, act'(z) in float32, and w or x), so a config the forward runs at 3 stages may fit
    only 2 (or 1) there.
    """
    fit = 1 + max(0, SHARED_MEMORY_BYTES - SHARED_MEMORY_RESERVE) // max(1, stage_bytes)
    return max(1, min(num_stages, fit))


def default_config(lowering: str) -> BlockConfig:
    return INTERPRET_DEFAULT if lowering == "interpret" else GPU_DEFAULT


# The autotuned choice per problem, for the life of the process: (M, N, K, dtype, activation) -> config.
_TUNED: dict[tuple, BlockConfig] = {}


def problem_key(m, n, k, dtype, activation) -> tuple:
    return (int(m), int(n), int(k), jnp.dtype(dtype).name, activation)


def cached_config(m, n, k, dtype, activation, lowering) -> BlockConfig:
    """The autotuned config for this problem if one is cached, else the lowering's default."""
    if lowering == "interpret":
        return default_config(lowering)
    return _TUNED.get(problem_key(m, n, k, dtype, activation), default_config(lowering))


def remember(key: tuple, config: BlockConfig) -> None:
    """Records ``config`` as the choice for ``key`` (from ``problem_key``)."""
    _TUNED[key] = config


def tuned(key: tuple) -> BlockConfig | None:
    return _TUNED.get(key)


def clear_cache() -> None:
    _TUNED.clear()
