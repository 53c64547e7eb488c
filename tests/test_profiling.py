"""jaxnet.profiling: HLO instructions classified, a traced step summed per instruction."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import pytest

from jaxnet import profiling

# A module in the shape of XLA:CPU's compiled text: a fusion calling a computation that calls
# another with a dot, a custom call to a dense kernel and one to something else.
SYNTHETIC = """HloModule jit_step, entry_computation_layout={(f32[8,4]{1,0})->f32[8,4]{1,0}}

%inner (p0: f32[8,4], p1: f32[4,4]) -> f32[8,4] {
  %p0 = f32[8,4]{1,0} parameter(0)
  %p1 = f32[4,4]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%outer (q0: f32[8,4], q1: f32[4,4]) -> f32[8,4] {
  %q0 = f32[8,4]{1,0} parameter(0)
  %q1 = f32[4,4]{1,0} parameter(1)
  ROOT %call.2 = f32[8,4]{1,0} call(%q0, %q1), to_apply=%inner
}

%fused_add (r0: f32[8,4]) -> f32[8,4] {
  %r0 = f32[8,4]{1,0} parameter(0)
  ROOT %add.3 = f32[8,4]{1,0} add(%r0, %r0)
}

ENTRY %main.9 (x: f32[8,4]) -> f32[8,4] {
  %x = f32[8,4]{1,0} parameter(0)
  %w = f32[4,4]{1,0} constant({...})
  %ynn_fusion.4 = f32[8,4]{1,0} fusion(%x, %w), kind=kCustom, calls=%outer, metadata={op_name="jit(f)/jvp(N)/dot"}
  %custom-call.5 = f32[8,4] custom-call(%x), custom_call_target="x_fused_dense", metadata={op_name="transpose(a)"}
  %custom-call.6 = f32[8,4]{1,0} custom-call(%x), custom_call_target="sort_rows", metadata={op_name="transpose(a)"}
  ROOT %add_fusion.7 = f32[8,4]{1,0} fusion(%ynn_fusion.4), kind=kLoop, calls=%fused_add, metadata={op_name="f/add"}
}
"""


def test_instructions_are_matmuls_through_calls_and_dense_custom_calls():
    info = profiling.hlo_instructions(SYNTHETIC)
    assert info["ynn_fusion.4"] == {"kind": "matmul", "pass": "forward", "opcode": "fusion"}
    assert info["custom-call.5"] == {"kind": "matmul", "pass": "backward", "opcode": "custom-call"}
    assert info["custom-call.6"]["kind"] == "other" and info["custom-call.6"]["pass"] == "backward"
    assert info["add_fusion.7"] == {"kind": "other", "pass": "update", "opcode": "fusion"}
    assert info["dot.1"]["kind"] == "matmul" and info["add.3"]["kind"] == "other"
    assert info["dot.1"]["pass"] == "unattributed"  # no metadata


def _loss(w, x):
    return jnp.sum(jnp.tanh(x @ w) ** 2)


def _compiled_grad():
    x = jax.random.normal(jax.random.key(0), (256, 128))
    w = jax.random.normal(jax.random.key(1), (128, 128)) / 12
    step = jax.jit(jax.grad(_loss))
    return step.lower(w, x).compile(), (w, x)


def test_a_compiled_gradient_has_matmuls_in_both_passes_and_other_work():
    compiled, _ = _compiled_grad()
    info = profiling.hlo_instructions(compiled.as_text())
    kinds = {(v["pass"], v["kind"]) for v in info.values()}
    assert {("forward", "matmul"), ("backward", "matmul")} <= kinds
    assert any(v["kind"] == "other" for v in info.values())


def test_a_traced_step_sums_to_its_parts(tmp_path):
    compiled, args = _compiled_grad()
    jax.block_until_ready(compiled(*args))
    steps = 3
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(steps):
            out = compiled(*args)
        jax.block_until_ready(out)
    s = profiling.step_breakdown(tmp_path, compiled.as_text(), steps=steps, cores=2)
    assert s["instructions_seen"] >= 2
    assert s["by_kind"]["matmul"] > 0 and s["by_kind"]["other"] > 0
    assert math.isclose(s["busy_s"], sum(s["by_kind"].values()))
    for kind in profiling.KINDS:
        assert math.isclose(s["by_kind"][kind], sum(p[kind] for p in s["by_pass"].values()))
    assert s["matmul_bound_s"] == s["by_kind"]["matmul"] / 2
    assert s["top"][0]["s"] == max(t["s"] for t in s["top"])
    # Per step: three calls of a 2 x 256 x 128 x 128 forward and its gradients are well under a second.
    assert 0 < s["busy_s"] < 1.0
    table = profiling.breakdown_table(s)
    assert table.count("\n") == 1 + len(profiling.PASSES) + 1


def test_the_numba_backend_counts_as_matmul():
    from kernels import fused_dense

    x = jnp.ones((16, 8))
    w = jnp.ones((8, 4))
    text = jax.jit(lambda x, w: fused_dense(x, w, activation="relu", backend="numba")).lower(x, w).compile().as_text()
    customs = {n: v for n, v in profiling.hlo_instructions(text).items() if v["opcode"] == "custom-call"}
    assert customs and all(v["kind"] == "matmul" for v in customs.values())


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="compiled HLO module"):
        profiling.hlo_instructions("not hlo")
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        profiling.step_breakdown(tmp_path, SYNTHETIC, steps=0)
    with pytest.raises(FileNotFoundError, match="no \\*.trace.json.gz"):
        profiling.step_breakdown(tmp_path, SYNTHETIC, steps=1)
    # A trace of another program holds none of this module's instructions.
    f = jax.jit(lambda v: jnp.sort(v) * 3)
    with jax.profiler.trace(str(tmp_path)):
        jax.block_until_ready(f(jnp.arange(5.0)))
    with pytest.raises(ValueError, match="none of this module's"):
        profiling.step_breakdown(tmp_path, SYNTHETIC, steps=1)
    (tmp_path / "x" / "broken.trace.json.gz").parent.mkdir()
    (tmp_path / "x" / "broken.trace.json.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="cannot read the trace"):
        profiling.instruction_seconds(tmp_path, {"a"})
