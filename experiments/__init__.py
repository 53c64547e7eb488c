"""Runnable studies, one per module: ``python -m experiments.NAME [--flags]``.

Importing the package (which ``python -m experiments.NAME`` does before anything else, JAX
included) keeps freed host memory in the process (``jaxnet.runtime.keep_host_memory``): without
it compiled programs page-fault their temporary buffers afresh on every call. The language-model
experiments also ask for a single malloc arena (see kernels/host_memory.py).
"""
from jaxnet import runtime as _runtime

_runtime.keep_host_memory()
