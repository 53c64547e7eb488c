"""Runnable studies, one per module: ``python -m experiments.NAME [--flags]``.

Importing the package (which ``python -m experiments.NAME`` does before anything else, JAX
included) keeps freed host memory in the process (``jaxnet.runtime.keep_host_memory``): without it
every compiled step page-faults its temporary buffers afresh.
"""
from jaxnet import runtime as _runtime

_runtime.keep_host_memory()
