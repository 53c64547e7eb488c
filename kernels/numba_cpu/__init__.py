"""The "numba" backend of ``kernels.fused_dense``: Numba CPU kernels behind XLA's typed FFI.

Importing this package registers the backend with ``kernels.dispatch``; the Numba handlers are
compiled (or loaded from Numba's on-disk cache) and registered with XLA on first use.
"""
from kernels.dispatch import register_backend
from kernels.numba_cpu.backend import fused_dense, is_available

register_backend("numba", fused_dense, is_available=is_available)

__all__ = ["fused_dense", "is_available"]
