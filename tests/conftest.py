"""Test-wide settings.

- Hypothesis profiles: "ci" (derandomized, few examples; the default) and "thorough" (many
  examples, random), chosen with JAXNET_HYPOTHESIS_PROFILE=ci|thorough.
- Tests marked ``slow`` run only with JAXNET_SLOW=1 (or ``-m slow``); the default run stays under
  its 10-minute budget on 2 cores.
- Four fake CPU devices so sharding tests have a mesh to work with (set before jax starts).
- XLA's CPU code is generated without LLVM optimisation (``--xla_backend_optimization_level=0``):
  the tests build hundreds of tiny programs, and optimising them was most of the suite's time
  (a ``jax.random.uniform`` compiled in ~2 s instead of ~0.25 s) while running them is cheap.
  Results stay within every derived tolerance (they assume any summation order); the experiments
  and benchmarks run at XLA's default level. Set the flag in XLA_FLAGS to test at another level.
  Where XLA still has them, its older CPU emitters too (``--xla_cpu_use_fusion_emitters=false``)
  and one LLVM module per program (``--xla_cpu_parallel_codegen_split_count=1``).
- With pytest-xdist (``make test`` runs ``-n auto``), the controller fills Numba's on-disk cache
  before the workers start (one process per dtype and one for the int8 and many-MLP handlers, in parallel), so
  that no two workers compile the same handler (a cold compile is tens of seconds each).
- Each test process keeps JAX's persistent compilation cache in its own temporary folder (removed
  at exit), so that a program another test already compiled is loaded, not compiled again (tests
  build the same small train steps many times over through fresh closures, which jit's in-memory
  cache does not share). Per process: a reader never meets another process's half-written entry.
  A JAX_COMPILATION_CACHE_DIR set by the user is left as it is.
"""
import atexit
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
# Flags that make XLA compile the tests' small programs faster, where this XLA has them: its older
# CPU emitters (a small train step compiles ~2.5x faster than with its fusion emitters), and one
# LLVM module per program rather than several compiled on a thread pool (-13% of compile time,
# -6% of the suite's; docs/benchmarks.md). An unknown flag aborts the process, so a child process
# tries them first (once; workers inherit the answer in JAXNET_TEST_COMPILE_FLAGS).
_COMPILE_FLAGS = ("--xla_cpu_use_fusion_emitters=false", "--xla_cpu_parallel_codegen_split_count=1")


def _accepted(flags) -> bool:
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True, timeout=300,
                           env=dict(os.environ, XLA_FLAGS=" ".join([os.environ["XLA_FLAGS"], *flags]),
                                    JAX_PLATFORMS="cpu"))
    return probe.returncode == 0


_wanted = [f for f in _COMPILE_FLAGS if f.split("=")[0] not in os.environ["XLA_FLAGS"]]  # the user's win
if _wanted and "JAXNET_TEST_COMPILE_FLAGS" not in os.environ:
    _ok = _wanted if _accepted(_wanted) else [f for f in _wanted if _accepted([f])]
    os.environ["JAXNET_TEST_COMPILE_FLAGS"] = " ".join(_ok)
os.environ["XLA_FLAGS"] += "".join(f" {f}" for f in _wanted if f in os.environ.get("JAXNET_TEST_COMPILE_FLAGS", ""))
# The numba kernels' blocking: the derived one (or one the user stored), never tuned at first use,
# which would add seconds to each worker's first numba call (test_numba_blocking.py tests that path).
os.environ.setdefault("JAXNET_NUMBA_BLOCKING", "stored")
# backend="auto" (kernels.autotune) stores what it measures in this session's folder, not ~/.cache.
if not os.environ.get("JAXNET_TUNING_DIR"):
    os.environ["JAXNET_TUNING_DIR"] = tempfile.mkdtemp(prefix="jaxnet-test-tuning-")
    atexit.register(shutil.rmtree, os.environ["JAXNET_TUNING_DIR"], ignore_errors=True)

import pytest

from jaxnet.testing import profiles

profiles.load_profile()  # "ci" or "thorough" from JAXNET_HYPOTHESIS_PROFILE (jaxnet/testing/profiles.py)


# The longest files first, by their test time (the rest take under 9 s each and keep collection
# order): xdist's --dist loadfile hands out files in collection order when run with
# --no-loadscope-reorder (the Makefile's; by default it sorts them by test count), and a long file
# left for the end would run alone on one core while the other waits.
LONGEST_FIRST = ("test_parallel.py", "test_checkpoint.py", "test_transformer.py", "test_numba_fused_dense.py",
                 "test_testing_harness.py", "test_cli_verify.py", "test_experiments.py", "test_train.py",
                 "test_pallas_fused_dense.py", "test_docs.py", "test_xla_fused_dense.py", "test_train_writers.py",
                 "test_compress.py", "test_explain.py", "test_recsys.py", "test_autotune.py", "test_losses.py",
                 "test_testing_bad_inputs.py", "test_quantized_dense.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    if os.environ.get("JAXNET_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    skip_slow = pytest.mark.skip(reason="slow: opt in with JAXNET_SLOW=1 or -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


def pytest_configure(config):
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        _precompile_numba_handlers()  # the xdist controller, which runs no test
    else:
        _process_compilation_cache()


def _process_compilation_cache():
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    from experiments.common import enable_compilation_cache

    path = tempfile.mkdtemp(prefix="jaxnet-test-xla-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    enable_compilation_cache(path)  # every program, however quick to compile


def _precompile_numba_handlers():
    """Best effort: a failure here is reported by the tests that call the numba backend."""
    codes = ["from kernels.numba_cpu import precompile; precompile(('float32',))",
             "from kernels.numba_cpu import precompile; precompile(('float64',))",
             "from kernels.numba_cpu.quantized import precompile; precompile(); "
             "from kernels.numba_cpu import mlp_sgd; mlp_sgd.precompile()"]
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for code in codes]
    for proc in procs:
        try:
            proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
