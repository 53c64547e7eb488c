"""``kernels.numba_cpu.bf16_gemm``: ``matmul(a, b)`` against the exact product of its bf16 operands
within a bound derived from the instruction's arithmetic, exact where every partial sum is; the
instruction it runs; bad input. No timing is asserted: ``experiments.bench_peak`` measures.

The bound. ``vdpbf16ps`` adds each product of two bf16 values (exact in float32: 8 + 8 significant
bits) to a float32 accumulator with one rounding, so a result is a K-term float32 sum: within
``gamma_K * M ~ K * eps32 / 2 * M`` of the exact one (Higham 3.1; ``M = |a| @ |b|`` in float64);
the test allows ``K * eps32 * M`` (the harness's two-sided bound, ``jaxnet.testing.tolerances``).
The instruction also treats inputs below float32's smallest normal as zero (each such term's
``|a b|`` may go missing) and flushes subnormal sums (at most ``tiny32`` per step).
"""
from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ml_dtypes import bfloat16
from numba import njit

from kernels.numba_cpu import bf16_gemm
from jaxnet.testing.tolerances import eps, tiny

MAX_SIZE = 70  # past two 32-column panels and the 8-row tiles, with ragged edges and an odd K
EPS32, TINY32 = eps(np.float32), tiny(np.float32)
MR, NR = bf16_gemm.MR, bf16_gemm.NR


def _needs_bf16():
    if not bf16_gemm.available():
        pytest.skip("this CPU (Numba's target) has no AVX512-BF16 (vdpbf16ps): bf16_gemm cannot run here")


def _values(rng, shape, kind):
    """bf16 operands: ``normal`` (standard normal), ``ints`` (integers in [-8, 8], every partial sum
    exact), ``edge`` (zeros of both signs, float32's subnormals and smallest normals, large and
    ordinary values mixed)."""
    if kind == "normal":
        x = rng.standard_normal(shape)
    elif kind == "ints":
        x = rng.integers(-8, 9, shape).astype(np.float64)
    else:
        pool = np.array([0.0, -0.0, 1e-39, -3e-40, TINY32, -TINY32, 2 * TINY32, 1.0, -2.5, 3e3, -1e15, 7e14])
        x = rng.choice(pool, shape) * rng.choice([1.0, 0.75, 1.5], shape)
    return x.astype(bfloat16)


def _bound(a, b):
    """Per element: ``K eps32 M + K tiny32`` plus the terms with an input below float32's smallest
    normal (the instruction counts such inputs as zero)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    K = a.shape[1]
    daz_a = np.where(np.abs(a64) < TINY32, np.abs(a64), 0.0)
    daz_b = np.where(np.abs(b64) < TINY32, np.abs(b64), 0.0)
    # |a b| over the terms with a flushed input: |a_daz| |b| + |a| |b_daz| counts a term with both twice.
    daz = daz_a @ np.abs(b64) + np.abs(a64) @ daz_b
    return K * EPS32 * (np.abs(a64) @ np.abs(b64)) + K * TINY32 + daz


@settings(deadline=None, max_examples=40)
@given(m=st.integers(0, MAX_SIZE), n=st.integers(0, MAX_SIZE),
       k=st.one_of(st.integers(0, MAX_SIZE), st.integers(MAX_SIZE, 800)),  # up to a long reduction
       kind=st.sampled_from(["normal", "ints", "edge"]), threads=st.sampled_from([1, 2, 3]),
       seed=st.integers(0, 2**32 - 1))
def test_matmul_is_the_product_within_the_derived_bound(m, k, n, kind, threads, seed):
    _needs_bf16()
    rng = np.random.default_rng(seed)
    a, b = _values(rng, (m, k), kind), _values(rng, (k, n), kind)
    c = bf16_gemm.matmul(a, b, threads=threads)
    assert c.shape == (m, n) and c.dtype == np.float32 and c.flags.c_contiguous
    exact = a.astype(np.float64) @ b.astype(np.float64)
    if kind == "ints":  # |partial sums| <= K * 64 < 2**24: every one is exact in float32
        np.testing.assert_array_equal(c, exact)
    else:
        err, bound = np.abs(c.astype(np.float64) - exact), _bound(a, b)
        worst = np.unravel_index(np.argmax(err - bound), err.shape) if err.size else None
        assert np.all(err <= bound), (f"{m}x{k}x{n} {kind}: |c - exact| {err[worst]:.3e} > bound "
                                      f"{bound[worst]:.3e} at {worst}")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("k", [1, 4, 5, 517])
def test_rows_tiles_and_panels_each_land_in_their_own_place(threads, k):
    # c[i, j] = row code i x column code j (twice: from k's first and last), products exact in
    # float32 and distinct enough that an output written to another row tile, row chunk or panel,
    # or left unwritten, shows. K odd: a is padded with a zero column. The other k are zero.
    _needs_bf16()
    m, n = bf16_gemm.ROW_CHUNK + MR + 3, 2 * NR + 7
    rows = (np.arange(m) % 128 + 1) * 2.0 ** (np.arange(m) // 128)  # 8 significant bits at most
    cols = np.arange(n) + 1.0
    a, b = np.zeros((m, k), bfloat16), np.zeros((k, n), bfloat16)
    a[:, 0], a[:, k - 1], b[0], b[k - 1] = rows, rows, cols, cols
    want = np.outer(rows, cols) * (1 if k == 1 else 2)
    np.testing.assert_array_equal(bf16_gemm.matmul(a, b, threads=threads), want.astype(np.float32))


def test_a_nan_in_a_row_reaches_every_output_of_that_row():
    _needs_bf16()
    a = np.ones((9, 6), bfloat16)
    a[4, 3] = np.nan
    c = bf16_gemm.matmul(a, np.ones((6, 40), bfloat16))
    assert np.isnan(c[4]).all() and np.isfinite(np.delete(c, 4, axis=0)).all()


def test_the_tile_runs_vdpbf16ps_on_zmm():
    _needs_bf16()

    @njit(cache=False)  # the module's own functions are cached, and cached code cannot be inspected
    def one_tile(a, packed, kp, c):
        bf16_gemm._tile(a, 0, 2 * kp, packed, 0, kp, c, 0, NR)

    b = np.ones((4, NR), bfloat16).view(np.uint16)
    c = np.zeros(MR * NR, np.float32)
    one_tile(np.ones(MR * 4, bfloat16).view(np.uint16), bf16_gemm.pack_pairs(b), 2, c)
    assert (c == 4).all()
    asm = "\n".join(one_tile.inspect_asm().values())
    # 16 accumulator updates a step, each one instruction on a 512-bit register.
    assert len(re.findall(r"vdpbf16ps\s+%?zmm", asm)) >= 2 * MR


@pytest.mark.parametrize("a, b, error, match", [
    (np.ones((2, 3), np.float32), np.ones((3, 4), bfloat16), TypeError,
     "a must be a 2-D bfloat16 array, got float32"),
    (np.ones((2, 3), bfloat16), np.ones(3, bfloat16), TypeError,
     r"b must be a 2-D bfloat16 array, got bfloat16 of shape \(3,\)"),
    (np.ones((2, 3), bfloat16), np.ones((4, 5), bfloat16), ValueError,
     r"\[2, 3\] and b \[K, N\] = \[4, 5\]: K differs"),
])
def test_bad_operands_get_clear_errors(a, b, error, match):
    _needs_bf16()
    with pytest.raises(error, match=match):
        bf16_gemm.matmul(a, b)


def test_bad_threads_and_a_cpu_without_bf16_get_clear_errors(monkeypatch):
    a, b = np.ones((2, 2), bfloat16), np.ones((2, 2), bfloat16)
    if bf16_gemm.available():
        with pytest.raises(ValueError, match="threads must be a positive int, got 0"):
            bf16_gemm.matmul(a, b, threads=0)
    monkeypatch.setattr(bf16_gemm, "_features", lambda: {"+avx512f", "-avx512bf16"})
    with pytest.raises(RuntimeError, match="no AVX512-BF16"):
        bf16_gemm.matmul(a, b)
