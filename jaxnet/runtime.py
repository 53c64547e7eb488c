"""Process-level settings for training on the CPU: ``keep_host_memory`` (see ``kernels.host_memory``)."""
from kernels.host_memory import keep_host_memory

__all__ = ["keep_host_memory"]
