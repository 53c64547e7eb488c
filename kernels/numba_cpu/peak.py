"""The CPU's multiply-add peak, measured: how many vector multiply-adds per second its cores retire.

    instructions()                       # {"f32_fma": Instruction(...), "bf16_dot": ..., "int8_dot": ...}
    rate("bf16_dot", threads=2)          # instructions per second, both cores together
    checksum("int8_dot", 1000)           # the loop's result, to check it computed what it claims

One loop per instruction kind, written in LLVM IR (as ``_quantized``'s tiles are): 16 independent
accumulator vectors, each updated twice per iteration from two register operands, no memory
traffic, so the loop runs at the instruction's throughput, not its latency. The kinds, where the
CPU (Numba's target) has them:

- ``f32_fma``: ``vfmadd`` on 16 float32 lanes (AVX-512; 8 lanes with AVX2's FMA): 2 ops a lane.
- ``bf16_dot``: ``vdpbf16ps`` (AVX512-BF16): each float32 lane adds a pair of bf16 products, 4 ops.
- ``int8_dot``: ``vpdpbusd`` (AVX512-VNNI): each int32 lane adds four u8 x s8 products, 8 ops.

``experiments.bench_peak`` puts XLA's own dots beside these peaks. Threads run the loop in
parallel (Numba releases the GIL), so ``rate(kind, threads=cores)`` is the all-core figure,
clock changes under load included.
"""
from __future__ import annotations

import dataclasses
import functools
import threading
import time

from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from kernels.numba_cpu._quantized import target_features as _features  # the tests swap it for other CPUs

ACCUMULATORS = 16  # independent vectors: more than any core's latency x issue width
STEPS = 2  # updates of each accumulator per loop iteration
KINDS = ("f32_fma", "bf16_dot", "int8_dot")
# The operands, as 32-bit patterns splatted to every lane, chosen so that a wrong lowering shows
# in ``checksum``: f32 1.5 and 2.0; bf16 pairs (1.5, 1.5) and (2.0, 2.0); bytes 0xFE (254 as
# vpdpbusd's unsigned operand, not -2) and 0xFD (-3 as its signed one).
OPERANDS = {"f32_fma": (0x3FC00000, 0x40000000), "bf16_dot": (0x3FC03FC0, 0x40004000),
            "int8_dot": (0xFEFEFEFE - 2**32, 0xFDFDFDFD - 2**32)}
# What one update adds to each lane with those operands: 1.5 * 2; 2 * (1.5 * 2); 4 * (254 * -3).
PER_UPDATE = {"f32_fma": 3, "bf16_dot": 6, "int8_dot": -3048}


@dataclasses.dataclass(frozen=True)
class Instruction:
    kind: str
    name: str  # the x86 mnemonic
    bits: int  # vector width
    ops: int  # arithmetic operations per instruction (a multiply-add is two)


def instructions() -> dict[str, Instruction]:
    """The kinds this CPU has, widest form: ``{kind: Instruction}`` (none on a CPU without FMA)."""
    have = _features()
    out = {}
    if "+avx512f" in have:
        out["f32_fma"] = Instruction("f32_fma", "vfmadd231ps zmm", 512, 32)
    elif "+fma" in have:
        out["f32_fma"] = Instruction("f32_fma", "vfmadd231ps ymm", 256, 16)
    if "+avx512bf16" in have:
        out["bf16_dot"] = Instruction("bf16_dot", "vdpbf16ps zmm", 512, 64)
    if "+avx512vnni" in have:
        out["int8_dot"] = Instruction("int8_dot", "vpdpbusd zmm", 512, 128)
    return out


class _BFloat(ir.Type):
    """LLVM's ``bfloat`` (llvmlite has no class for it): ``vdpbf16ps``'s operand lanes."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash("bfloat")


def _update(builder, inst: Instruction):
    """``(accumulator type, update(acc, a_bits, b_bits))`` for ``inst``, operands as i32 splats."""
    module, i32 = builder.module, ir.IntType(32)
    lanes = inst.bits // 32
    vf, vi = ir.VectorType(ir.FloatType(), lanes), ir.VectorType(i32, lanes)

    def declare(name, ret, args):
        return module.globals.get(name) or ir.Function(module, ir.FunctionType(ret, args), name)

    if inst.kind == "f32_fma":
        fma = declare(f"llvm.fma.v{lanes}f32", vf, [vf] * 3)
        return vf, lambda acc, a, b: builder.call(fma, [builder.bitcast(a, vf), builder.bitcast(b, vf), acc])
    if inst.kind == "bf16_dot":
        vb = ir.VectorType(_BFloat(), 2 * lanes)
        dot = declare("llvm.x86.avx512bf16.dpbf16ps.512", vf, [vf, vb, vb])
        return vf, lambda acc, a, b: builder.call(dot, [acc, builder.bitcast(a, vb), builder.bitcast(b, vb)])
    dot = declare("llvm.x86.avx512.vpdpbusd.512", vi, [vi] * 3)
    return vi, lambda acc, a, b: builder.call(dot, [acc, a, b])


def _loop_intrinsic(inst: Instruction):
    @intrinsic
    def loop(typingctx, n, a_bits, b_bits):
        """``n`` iterations of ``STEPS`` updates of each of ``ACCUMULATORS`` vectors; returns lane 0
        of their sum (int64)."""
        def codegen(context, builder, sig, args):
            i32, i64 = ir.IntType(32), ir.IntType(64)
            n_ = context.cast(builder, args[0], sig.args[0], types.int64)
            acc_t, update = _update(builder, inst)
            splat = [builder.shuffle_vector(
                builder.insert_element(ir.Constant(ir.VectorType(i32, acc_t.count), ir.Undefined),
                                       builder.trunc(context.cast(builder, v, t, types.int64), i32), i32(0)),
                ir.Constant(ir.VectorType(i32, acc_t.count), ir.Undefined),
                ir.Constant(ir.VectorType(i32, acc_t.count), [0] * acc_t.count))
                for v, t in zip(args[1:], sig.args[1:])]
            pre = builder.block
            body, done = builder.append_basic_block("peak_loop"), builder.append_basic_block("peak_done")
            builder.cbranch(builder.icmp_signed(">", n_, i64(0)), body, done)
            builder.position_at_start(body)
            count = builder.phi(i64)
            accs = [builder.phi(acc_t) for _ in range(ACCUMULATORS)]
            new = accs
            for _ in range(STEPS):
                new = [update(acc, *splat) for acc in new]
            count1 = builder.add(count, i64(1))
            end = builder.block
            builder.cbranch(builder.icmp_signed("<", count1, n_), body, done)
            count.add_incoming(i64(0), pre)
            count.add_incoming(count1, end)
            for phi, value in zip(accs, new):
                phi.add_incoming(ir.Constant(acc_t, None), pre)
                phi.add_incoming(value, end)
            builder.position_at_end(done)
            outs = []
            for value in new:  # every phi first: LLVM wants them at the top of the block
                outs.append(builder.phi(acc_t))
                outs[-1].add_incoming(ir.Constant(acc_t, None), pre)
                outs[-1].add_incoming(value, end)
            is_float = isinstance(acc_t.element, ir.FloatType)
            total = outs[0]
            for out in outs[1:]:
                total = builder.fadd(total, out) if is_float else builder.add(total, out)
            lane = builder.extract_element(total, i32(0))
            return builder.fptosi(lane, i64) if is_float else builder.sext(lane, i64)
        return types.int64(n, a_bits, b_bits), codegen
    return loop


@functools.lru_cache(maxsize=None)
def _compiled(kind: str):
    have = instructions()
    if kind not in have:
        raise ValueError(f"kernels.numba_cpu.peak: this CPU has no {kind!r} instruction "
                         f"(it has {sorted(have)}; kinds: {KINDS})")
    loop = _loop_intrinsic(have[kind])

    @njit(nogil=True, cache=False)
    def run(n, a_bits, b_bits):
        return loop(n, a_bits, b_bits)

    return run


def checksum(kind: str, iterations: int) -> int:
    """The loop's result after ``iterations``: ``ACCUMULATORS * STEPS * iterations * PER_UPDATE[kind]``
    when the instructions computed what they claim (float kinds exact below 2**24)."""
    return int(_compiled(kind)(int(iterations), *OPERANDS[kind]))


def rate(kind: str, *, threads: int = 1, seconds: float = 0.2, repeats: int = 3) -> float:
    """Instructions per second of ``kind``, ``threads`` loops in parallel, the best of ``repeats``
    timings of about ``seconds`` each (a peak: the fastest the cores went)."""
    if threads < 1 or seconds <= 0 or repeats < 1:
        raise ValueError(f"kernels.numba_cpu.peak.rate: threads, seconds and repeats must be positive, got "
                         f"{threads}, {seconds}, {repeats}")
    run = _compiled(kind)
    a, b = OPERANDS[kind]
    t0 = time.perf_counter()
    run(100_000, a, b)
    n = max(1000, int(100_000 * seconds / max(time.perf_counter() - t0, 1e-6)))
    run(n, a, b)  # untimed: the core's clock settles under the new load
    best = float("inf")
    for _ in range(repeats):
        start = threading.Barrier(threads + 1)

        def work():
            start.wait()
            run(n, a, b)

        pool = [threading.Thread(target=work) for _ in range(threads)]
        for thread in pool:
            thread.start()
        start.wait()
        t0 = time.perf_counter()
        for thread in pool:
            thread.join()
        best = min(best, time.perf_counter() - t0)
    return threads * n * ACCUMULATORS * STEPS / best


__all__ = ["ACCUMULATORS", "KINDS", "OPERANDS", "PER_UPDATE", "STEPS", "Instruction", "checksum", "instructions", "rate"]
