"""jaxnet.runtime / kernels.host_memory: the host allocator settings for training processes."""
import os
import platform
import subprocess
import sys

import pytest

from jaxnet import runtime

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _run(code: str, **env) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def test_keep_host_memory_applies_once_on_glibc_and_checks_its_threshold():
    with pytest.raises(ValueError, match="threshold_bytes"):
        runtime.keep_host_memory(2**31)
    first = runtime.keep_host_memory()
    assert isinstance(first, bool)
    if GLIBC:
        assert first  # mallopt accepted both thresholds
    assert runtime.keep_host_memory() is first  # idempotent: applied once per process


def test_single_arena_is_asked_for_separately():
    # In a fresh process (the arena setting would outlive this test here).
    code = ("from kernels import host_memory as h\n"
            "print(h.keep_host_memory(), h._state['single_arena'])\n"
            "print(h.keep_host_memory(single_arena=True), h._state['single_arena'], h.keep_host_memory())\n")
    got = _run(code)
    assert got == ([str(GLIBC), "False", str(GLIBC), str(GLIBC), str(GLIBC)])


def test_an_environment_variable_turns_it_off():
    code = "from jaxnet import runtime\nprint(runtime.keep_host_memory(), runtime.keep_host_memory(single_arena=True))\n"
    assert _run(code, JAXNET_KEEP_HOST_MEMORY="0") == ["False", "False"]
