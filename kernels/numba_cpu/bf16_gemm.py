"""A bfloat16 GEMM on AVX512-BF16: ``c = a @ b`` for bf16 ``a [M, K]`` and ``b [K, N]``, float32 out.

    from kernels.numba_cpu import bf16_gemm
    c = bf16_gemm.matmul(a, b, threads=2)    # a, b: NumPy bfloat16 (ml_dtypes, jnp.bfloat16)

The micro-kernel of issue 21's bf16 moonshot (a Numba kernel that beats XLA's bf16 dot), on host
arrays: ``experiments.bench_peak`` times it beside XLA's bf16 dot. It is not yet a ``fused_dense``
backend (no FFI handler, no bias or activation, no backward; threads are Python threads here, not
XLA's pool).

``vdpbf16ps`` adds to each float32 lane the products of one pair of bf16 values from each
operand. A tile of ``MR`` rows x 32 columns is 2 * MR accumulator vectors held in registers over
the whole reduction (``_tile``, LLVM IR as in ``_quantized``): each step broadcasts a row's pair
``a[i, 2l:2l+2]`` (four bytes, read in place) against two vectors of b's packed pairs. b is packed
once per call (``pack_pairs``): panel after panel of 32 columns, for each pair of rows the 64
values ``b[2l, j], b[2l+1, j]`` interleaved, zero-padded to a whole panel and an even K. Rows are
taken ``ROW_CHUNK`` at a time through every panel, so that a chunk of a stays in L2 while b's
panels pass.

Arithmetic, as the instruction is defined (Intel's SDM; MXCSR is not consulted): each product of
two bf16 values is exact in float32 and is added to the accumulator with one rounding to nearest
even, the pair's odd element first; inputs below float32's smallest normal count as zero and
subnormal results are flushed to zero. So ``c`` is a K-term float32 sum in a fixed order, within
``K * eps32 * (|a| @ |b|)`` of the exact product plus what the flushes drop
(tests/kernel_tests/test_bf16_gemm.py derives the bound).
"""
from __future__ import annotations

import concurrent.futures
import functools

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from kernels.numba_cpu._quantized import _data, _i64, _reduction_loop, _splat
from kernels.numba_cpu._quantized import target_features as _features  # the tests swap it for other CPUs
from kernels.numba_cpu.peak import _BFloat

MR = 8  # rows per tile
NV = 2  # vectors of 16 float32 lanes per tile row: MR * NV accumulators, NV panel vectors, a broadcast
NR = 16 * NV  # columns per tile and per packed panel
ROW_CHUNK = 256  # rows of a per pass over b's panels (a chunk of a in L2 while the panels pass)
_OPTS = dict(cache=True, boundscheck=False, nogil=True)


def available() -> bool:
    """Whether Numba compiles for a CPU with AVX512-BF16 (``vdpbf16ps``)."""
    return "+avx512bf16" in _features()


@intrinsic
def _tile(typingctx, a, ao, lda, b, bo, kp, c, co, ldc):
    """``c[co + r*ldc + j] = sum_{k < 2 kp} a[ao + r*lda + k] * b[k, j]`` for r < MR, j < NR: a
    row-major bf16 bits (uint16 1-D), b a panel packed by ``pack_pairs`` at ``b[bo:]`` (64-byte
    aligned), c float32 1-D (a partial tile runs on a zero-padded copy: ``_rows``)."""
    def codegen(context, builder, sig, args):
        ao_, lda_, bo_, kp_, co_, ldc_ = (_i64(context, builder, args[i], sig.args[i]) for i in (1, 2, 4, 5, 7, 8))
        ap, bp, cp = (_data(context, builder, sig.args[i], args[i]) for i in (0, 3, 6))
        i16, i32, i64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)
        vf, v32 = ir.VectorType(ir.FloatType(), 16), ir.VectorType(i32, 16)
        v16, vb = ir.VectorType(i16, 32), ir.VectorType(_BFloat(), 32)
        name = "llvm.x86.avx512bf16.dpbf16ps.512"
        dot = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(vf, [vf, vb, vb]), name)

        def body(l, accs):
            step = builder.add(bo_, builder.mul(l, i64(2 * NR)))
            panel = [builder.bitcast(builder.load(builder.bitcast(
                builder.gep(bp, [builder.add(step, i64(16 * 2 * h))], inbounds=True), v16.as_pointer()), align=64), vb)
                for h in range(NV)]
            k0 = builder.mul(l, i64(2))
            new = []
            for r in range(MR):
                at = builder.add(builder.add(ao_, builder.mul(i64(r), lda_)), k0)
                pair = builder.load(builder.bitcast(builder.gep(ap, [at], inbounds=True), i32.as_pointer()), align=2)
                av = builder.bitcast(_splat(builder, pair, v32), vb)
                new += [builder.call(dot, [accs[NV * r + h], av, panel[h]]) for h in range(NV)]
            return new

        final = _reduction_loop(builder, kp_, [ir.Constant(vf, None)] * (NV * MR), body)
        for i, v in enumerate(final):
            r, h = divmod(i, NV)
            at = builder.add(builder.add(co_, builder.mul(i64(r), ldc_)), i64(16 * h))
            builder.store(v, builder.bitcast(builder.gep(cp, [at], inbounds=True), vf.as_pointer()), align=4)
        return context.get_dummy_value()
    return types.none(a, ao, lda, b, bo, kp, c, co, ldc), codegen


@njit(**_OPTS)
def _pack(b, out):
    """``out[(p kp + l) 2 NR + 2 j + i] = b[2 l + i, NR p + j]``, zero past b's edges (``pack_pairs``)."""
    K, N = b.shape
    kp, npan = (K + 1) // 2, (N + NR - 1) // NR
    for p in range(npan):
        for l in range(kp):
            base = (p * kp + l) * 2 * NR
            for i in range(2):
                k = 2 * l + i
                for j in range(NR):
                    col = p * NR + j
                    out[base + 2 * j + i] = b[k, col] if k < K and col < N else 0


def pack_pairs(b_bits: np.ndarray) -> np.ndarray:
    """b's bf16 bits ``[K, N]`` (uint16) in ``_tile``'s layout: ``[ceil(N / NR), ceil(K / 2), 2 NR]``
    flat, 64-byte aligned."""
    K, N = b_bits.shape
    size = (N + NR - 1) // NR * NR * ((K + 1) // 2 * 2)
    raw = np.empty(size + 32, np.uint16)
    start = (-raw.ctypes.data % 64) // 2
    out = raw[start:start + size]
    _pack(b_bits, out)
    return out


@njit(**_OPTS)
def _rows(a, lda, packed, kp, c, ldc, r0, r1):
    """Rows ``r0:r1`` of ``c = a @ b``: a bf16 bits ``[M, lda]`` flat (lda = 2 kp, zero-padded),
    packed b (``pack_pairs``), c float32 ``[M, ldc]`` flat (ldc = a whole number of panels); r0 a
    multiple of MR. Each tile runs the whole reduction: blocking k (so that a panel's slice stays
    in L1) measured slower on Zen 4 up to K = 2048 (docs/benchmarks.md)."""
    npan = ldc // NR
    full = r0 + (r1 - r0) // MR * MR
    for m0 in range(r0, full, ROW_CHUNK):
        m1 = min(m0 + ROW_CHUNK, full)
        for p in range(npan):
            for i in range(m0, m1, MR):
                _tile(a, i * lda, lda, packed, p * kp * 2 * NR, kp, c, i * ldc + p * NR, ldc)
    if full < r1:  # the last rows, fewer than MR: through a zero-padded copy, then copied out
        tail = r1 - full
        ta = np.zeros(MR * lda, np.uint16)
        ta[:tail * lda] = a[full * lda:r1 * lda]
        tc = np.empty(MR * ldc, np.float32)
        for p in range(npan):
            _tile(ta, 0, lda, packed, p * kp * 2 * NR, kp, tc, p * NR, ldc)
        c[full * ldc:r1 * ldc] = tc[:tail * ldc]


@functools.cache
def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="jaxnet-bf16-gemm")


def _bits(name: str, x) -> np.ndarray:
    """x's bf16 bits as uint16, after checking that x is a 2-D bfloat16 array."""
    x = np.asarray(x)
    if x.ndim != 2 or x.dtype.name != "bfloat16":
        raise TypeError(f"bf16_gemm.matmul: {name} must be a 2-D bfloat16 array, got {x.dtype.name} of shape "
                        f"{x.shape}")
    return x.view(np.uint16)


def matmul(a, b, *, threads: int = 1) -> np.ndarray:
    """``a @ b`` accumulated in float32 on ``vdpbf16ps``: a ``[M, K]``, b ``[K, N]`` bfloat16 (NumPy
    arrays or anything ``np.asarray`` takes); returns float32 ``[M, N]``. ``threads`` splits the rows.

    Raises RuntimeError on a CPU without AVX512-BF16, TypeError and ValueError on bad operands."""
    if not available():
        raise RuntimeError("bf16_gemm.matmul: this CPU (Numba's target) has no AVX512-BF16 (vdpbf16ps); "
                           "run XLA's bf16 dot instead")
    a16, b16 = _bits("a", a), _bits("b", b)
    (M, K), (K2, N) = a16.shape, b16.shape
    if K != K2:
        raise ValueError(f"bf16_gemm.matmul: a is [M, K] = {list(a16.shape)} and b [K, N] = {list(b16.shape)}: "
                         f"K differs")
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"bf16_gemm.matmul: threads must be a positive int, got {threads!r}")
    kp, npad = (K + 1) // 2, (N + NR - 1) // NR * NR
    if M == 0 or N == 0 or K == 0:
        return np.zeros((M, N), np.float32)
    lda = 2 * kp
    if lda != K:  # odd K: a zero column makes every row a whole number of pairs
        a16 = np.concatenate([a16, np.zeros((M, 1), np.uint16)], axis=1)
    a_flat = np.ascontiguousarray(a16).reshape(-1)
    packed = pack_pairs(np.ascontiguousarray(b16))
    c = np.empty((M, npad), np.float32)
    c_flat = c.reshape(-1)
    bounds = [M * t // threads // MR * MR for t in range(threads)] + [M]
    parts = [(r0, r1) for r0, r1 in zip(bounds, bounds[1:]) if r1 > r0]
    helpers = [_pool(threads - 1).submit(_rows, a_flat, lda, packed, kp, c_flat, npad, r0, r1)
               for r0, r1 in parts[1:]]
    _rows(a_flat, lda, packed, kp, c_flat, npad, *parts[0])
    for h in helpers:
        h.result()
    return c if npad == N else np.ascontiguousarray(c[:, :N])


__all__ = ["MR", "NR", "ROW_CHUNK", "available", "matmul", "pack_pairs"]
