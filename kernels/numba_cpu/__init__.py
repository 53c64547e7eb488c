"""The "numba" backend of ``kernels.fused_dense``: Numba CPU kernels behind XLA's typed FFI.

Importing this package only registers the backend with ``kernels.dispatch``: nothing is compiled,
nothing on disk or in the process changes. At the first call of a (kernel, dtype, activation),
its handler is compiled (or loaded from Numba's on-disk cache), with the units it calls
(``_handlers``), and registered with XLA; just before the first one, ``_cache.drop_if_stale``
drops a Numba cache written by older sources of this package.
``precompile(dtypes)`` does the compiling up front, for a caller that wants it done at once.
"""
from kernels.dispatch import register_backend
from kernels.numba_cpu.backend import fused_dense, is_available, precompile

# A CPU rank behind XLA's: "auto" measures it against XLA per shape (kernels.autotune); JAXNET_AUTO=rank keeps XLA.
register_backend("numba", fused_dense, is_available=is_available, auto_rank={"cpu": 200})

__all__ = ["fused_dense", "is_available", "precompile"]
