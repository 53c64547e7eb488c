"""jaxnet.runtime: the host allocator settings for training processes."""
import platform
import sys

import pytest

from jaxnet import runtime
from kernels import host_memory


def test_keep_host_memory_applies_once_on_glibc_and_checks_its_threshold():
    with pytest.raises(ValueError, match="threshold_bytes"):
        runtime.keep_host_memory(2**31)
    first = runtime.keep_host_memory()
    assert isinstance(first, bool)
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert first  # mallopt accepted all three settings
    assert runtime.keep_host_memory() is first  # idempotent: applied once per process


def test_the_experiments_package_applies_it():
    import experiments  # noqa: F401  (its __init__ calls keep_host_memory)

    assert host_memory._state["applied"] is not None


def test_an_environment_variable_turns_it_off():
    import subprocess

    out = subprocess.run([sys.executable, "-c", "from jaxnet import runtime; print(runtime.keep_host_memory())"],
                         env={"JAXNET_KEEP_HOST_MEMORY": "0", "PATH": ""}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
