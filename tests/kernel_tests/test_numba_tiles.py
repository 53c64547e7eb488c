"""The numba panel GEMM's register tile (``kernels.numba_cpu._kernels.TILES``): one per vector
width, each within its width's vector registers, chosen by the machine (or ``$JAXNET_NUMBA_TILE``),
part of the Numba cache's digest, and correct on every kernel path whichever tile is compiled.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from kernels import machine
from kernels.numba_cpu import _cache, _kernels
from kernels.numba_cpu._kernels import MR, NR, TILE_ENV, TILES, register_tile

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Vector registers of each width on x86-64 (AVX-512: 32 zmm; AVX/AVX2 and SSE: 16 ymm / xmm).
REGISTERS = {512: 32, 256: 16, 128: 16}


@pytest.mark.parametrize("bits", sorted(TILES))
def test_each_tile_fits_its_vector_registers(bits):
    """A step of the tile's loop holds its accumulators, one broadcast value per row and one row of
    the panel in registers (fewer registers than that and LLVM spills: 8 x 32 on AVX2 measured
    half of XLA's speed, docs/benchmarks.md), in float32 (MR rows) and float64 (MR / 2 rows)."""
    mr, nr = register_tile(bits)
    assert mr % 2 == 0 and 1 <= mr <= 8  # float64 takes half the rows; _panel_tiles has 8 row slots
    for itemsize, rows in ((4, mr), (8, mr // 2)):
        lanes = bits // (8 * itemsize)
        assert nr % lanes == 0, (bits, itemsize)
        vectors_a_row = nr // lanes
        assert rows * vectors_a_row + rows + vectors_a_row <= REGISTERS[bits], (bits, itemsize)


def test_the_machine_picks_the_tile_of_its_widest_vectors():
    avx512 = machine.Machine("x", frozenset({"avx", "avx2", "fma", "avx512f"}), cores=2, l1d=0, l2=0, l3=0)
    avx2 = machine.Machine("x", frozenset({"avx", "avx2", "fma"}), cores=2, l1d=0, l2=0, l3=0)
    sse = machine.Machine("x", frozenset({"sse4_2"}), cores=2, l1d=0, l2=0, l3=0)
    assert [register_tile(m.vector_bits) for m in (avx512, avx2, sse)] == [TILES[512], TILES[256], TILES[128]]
    assert register_tile(1024) == TILES[512] and register_tile(64) == TILES[128]
    if not os.environ.get(TILE_ENV):
        assert (MR, NR) == register_tile(machine.describe().vector_bits)


def test_tile_env_is_checked(monkeypatch):
    monkeypatch.setenv(TILE_ENV, "4x16")
    assert _kernels._tile_in_force() == (4, 16)
    monkeypatch.setenv(TILE_ENV, "7x7")
    with pytest.raises(ValueError, match=TILE_ENV):
        _kernels._tile_in_force()


def test_the_tile_is_part_of_the_cache_digest(monkeypatch):
    """The tile is a module global that Numba freezes into the compiled code, and Numba keys its
    cache on the source alone: code cached with one tile must not be loaded with another."""
    here = _cache.digest()
    other = next(t for t in TILES.values() if t != (MR, NR))
    monkeypatch.setattr(_kernels, "MR", other[0])
    monkeypatch.setattr(_kernels, "NR", other[1])
    assert _cache.digest() != here


@pytest.mark.slow
@pytest.mark.parametrize("tile", [t for t in TILES.values() if t != (MR, NR)], ids=lambda t: f"{t[0]}x{t[1]}")
def test_every_kernel_path_with_the_other_tiles(tile, tmp_path):
    """The kernel-path tests (relu with and without ties, float32 and float64, both thread pools;
    transposes and panel packing) in a process that compiles another width's tile, with a Numba cache
    of its own: any tile runs on any x86-64 CPU, only its speed depends on the registers. Opt-in
    (slow): each process compiles the kernels afresh, 70-90 s, and the default suite already runs
    every test with this machine's tile."""
    env = {**os.environ, TILE_ENV: f"{tile[0]}x{tile[1]}", "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    env.pop("PYTEST_XDIST_WORKER", None)
    probe = [sys.executable, "-c", "from kernels.numba_cpu._kernels import MR, NR; print(MR, NR)"]
    in_force = subprocess.run(probe, cwd=ROOT, env=env, capture_output=True, text=True).stdout.split()
    assert in_force == [str(tile[0]), str(tile[1])]
    test = "tests/kernel_tests/test_numba_fused_dense.py"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", "-W", "error", test,
           "-k", "exact_zeros or transposes_and_panel_packing"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert " passed" in done.stdout and " failed" not in done.stdout
