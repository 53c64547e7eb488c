"""experiments.bench_kernels: the dtype it times is the dtype asked for."""
import subprocess
import sys

import pytest

from experiments import bench_kernels

CHECK = """
from experiments import bench_kernels as bk
config = bk.Config(dtype="float64")
bk.prepare_dtype(config)
print(*(a.dtype for a in bk._problem((4, 3, 2), config)))
"""


def test_float64_problems_are_float64_not_truncated():
    # In a subprocess: float64 turns on jax_enable_x64 for the whole process.
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["float64"] * 4, out.stdout + out.stderr


def test_unsupported_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="bfloat16"):
        bench_kernels.prepare_dtype(bench_kernels.Config(dtype="bfloat16"))
