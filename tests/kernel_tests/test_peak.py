"""``kernels.numba_cpu.peak``: each loop computes what it claims with the instruction it names; the
kinds offered follow the CPU's features; bad requests get clear errors. No timing is asserted:
``experiments.bench_peak`` measures."""
from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.numba_cpu import peak

HAVE = peak.instructions()
MNEMONIC = {"f32_fma": r"vfmadd\d{3}ps", "bf16_dot": r"vdpbf16ps", "int8_dot": r"vpdpbusd"}


def _needs(kind):
    if kind not in HAVE:
        pytest.skip(f"this CPU (Numba's target) has no {kind} instruction")


@pytest.mark.parametrize("kind", peak.KINDS)
@settings(max_examples=5, deadline=None)
@given(iterations=st.integers(0, 20_000))
def test_loop_sums_its_updates(kind, iterations):
    # f32 and bf16 sums stay exact below 2**24 (20,000 iterations: 32 * 20,000 * 6 = 3.84e6).
    _needs(kind)
    want = peak.ACCUMULATORS * peak.STEPS * iterations * peak.PER_UPDATE[kind]
    assert peak.checksum(kind, iterations) == want


@pytest.mark.parametrize("kind", peak.KINDS)
def test_loop_runs_the_instruction_it_names(kind):
    _needs(kind)
    peak.checksum(kind, 1)
    asm = "\n".join(peak._compiled(kind).inspect_asm().values())
    width = "zmm" if HAVE[kind].bits == 512 else "ymm"
    found = re.findall(MNEMONIC[kind] + r"\s+%?" + width, asm)
    # Every update of one iteration is an instruction of its own (unrolling may copy the body).
    assert len(found) >= peak.ACCUMULATORS * peak.STEPS


@pytest.mark.parametrize("features, want", [
    ({"+avx512f", "+avx512bf16", "+avx512vnni", "+fma"}, {"f32_fma": 512, "bf16_dot": 512, "int8_dot": 512}),
    ({"+avx512f", "-avx512bf16", "+avx512vnni", "+fma"}, {"f32_fma": 512, "int8_dot": 512}),
    ({"-avx512f", "+avx2", "+fma"}, {"f32_fma": 256}),
    ({"+avx2", "-fma"}, {}),
])
def test_instructions_follow_the_features(monkeypatch, features, want):
    monkeypatch.setattr(peak, "_features", lambda: features)
    got = peak.instructions()
    assert {k: v.bits for k, v in got.items()} == want
    for inst in got.values():  # ops: lanes x products per lane x 2
        lanes = inst.bits // 32
        assert inst.ops == lanes * {"f32_fma": 1, "bf16_dot": 2, "int8_dot": 4}[inst.kind] * 2


def test_the_avx2_form_runs_on_ymm_registers(monkeypatch):
    # What a CPU with FMA but no AVX-512 (Zen 1) gets: 8 lanes, 16 ops an instruction.
    if "f32_fma" not in HAVE:
        pytest.skip("this CPU has no FMA")
    monkeypatch.setattr(peak, "_features", lambda: {"-avx512f", "+avx2", "+fma"})
    peak._compiled.cache_clear()
    try:
        assert peak.checksum("f32_fma", 100) == peak.ACCUMULATORS * peak.STEPS * 100 * peak.PER_UPDATE["f32_fma"]
        asm = "\n".join(peak._compiled("f32_fma").inspect_asm().values())
        assert len(re.findall(MNEMONIC["f32_fma"] + r"\s+%?ymm", asm)) >= peak.ACCUMULATORS * peak.STEPS
        assert not re.findall(MNEMONIC["f32_fma"] + r"\s+%?zmm", asm)
    finally:
        peak._compiled.cache_clear()


def test_a_kind_the_cpu_lacks_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(peak, "_features", lambda: {"-avx512f", "+avx2", "+fma"})
    peak._compiled.cache_clear()
    try:
        with pytest.raises(ValueError, match="no 'bf16_dot' instruction"):
            peak.checksum("bf16_dot", 1)
    finally:
        peak._compiled.cache_clear()


@pytest.mark.parametrize("kwargs", [{"threads": 0}, {"seconds": 0.0}, {"repeats": 0}])
def test_rate_refuses_nonpositive_settings(kwargs):
    with pytest.raises(ValueError, match="must be positive"):
        peak.rate(next(iter(HAVE), "f32_fma"), **kwargs)


def test_rate_is_positive_on_one_and_two_threads():
    kind = next(iter(HAVE), None)
    if kind is None:
        pytest.skip("this CPU has no FMA")
    assert peak.rate(kind, threads=1, seconds=0.005, repeats=1) > 0
    assert peak.rate(kind, threads=2, seconds=0.005, repeats=1) > 0
