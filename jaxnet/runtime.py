"""Process-level settings for training on the CPU (``keep_host_memory``, see ``kernels.host_memory``)
and what a result records about where it ran (``cpu_model``, ``versions``)."""
from __future__ import annotations

import platform
import subprocess
from importlib import metadata

from kernels.host_memory import keep_host_memory


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` gives it (``/proc/cpuinfo`` or the platform otherwise)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown"


def versions() -> dict[str, str]:
    """Python and the installed versions of the packages a result depends on."""
    out = {"python": platform.python_version()}
    for name in ("jaxnet", "jax", "jaxlib", "flax", "optax", "numba", "orbax-checkpoint"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


__all__ = ["cpu_model", "keep_host_memory", "versions"]
