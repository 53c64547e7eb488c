"""Pallas kernels for ``fused_dense`` (backend "pallas"): Triton lowering on a GPU, interpret
mode elsewhere. Importing this package registers the backend with ``kernels.dispatch``; "auto"
picks it only on a GPU (on CPU it is correct but slow, which is what interpret mode is for).
"""
from kernels.dispatch import register_backend
from kernels.pallas_gpu.blocks import GPU_DEFAULT, INTERPRET_DEFAULT, BlockConfig
from kernels.pallas_gpu.ops import LOWERINGS, fused_dense, resolve_lowering
from kernels.pallas_gpu.tuning import GPU_CANDIDATES, autotune


def _backend_fn(x, w, b, activation):
    return fused_dense(x, w, b, activation=activation)


# Rank 10 beats XLA (100) on a GPU; no CPU rank, so "auto" never picks interpret mode.
register_backend("pallas", _backend_fn, is_available=lambda: True, auto_rank={"gpu": 10})

__all__ = ["GPU_CANDIDATES", "GPU_DEFAULT", "INTERPRET_DEFAULT", "LOWERINGS", "BlockConfig", "autotune",
           "fused_dense", "resolve_lowering"]
