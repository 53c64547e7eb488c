"""Process-level settings for training on the CPU (``keep_host_memory``, see ``kernels.host_memory``)
and what a result records about where it ran (``cpu_model``, ``machine``, ``versions``)."""
from __future__ import annotations

import platform

from kernels.host_memory import keep_host_memory
from kernels.machine import cpu_model, describe
from kernels.machine import versions as package_versions


def machine() -> dict:
    """The CPU a result ran on: model, ISA features, cores, cache sizes (``kernels.machine``)."""
    return describe().as_dict()


def versions() -> dict[str, str]:
    """Python and the installed versions of the packages a result depends on."""
    packages = ("jaxnet", "jax", "jaxlib", "flax", "optax", "numba", "orbax-checkpoint")
    return {"python": platform.python_version(), **package_versions(packages)}


__all__ = ["cpu_model", "keep_host_memory", "machine", "versions"]
