"""Property tests of ``fused_dense(backend="pallas")``: values and the gradients in x, w and b.

Every property runs twice: in interpret mode on CPU (small shapes, small blocks so that the
padding to whole blocks is exercised on every axis) and, marked ``gpu``, lowered for real on a
GPU with GPU-sized blocks. Each example is checked against the jax reference
(``kernels.reference.fused_dense``) and against float64 NumPy (``fused_dense_numpy`` plus the
analytic derivatives below).
"""
from __future__ import annotations

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

import kernels
from kernels import activations, dispatch, reference
from kernels.pallas_gpu import BlockConfig, autotune, fused_dense, resolve_lowering
from kernels.pallas_gpu import blocks
from kernels.pallas_gpu import ops as fd_module
from jaxnet.testing import tolerances

ON_GPU = jax.default_backend() == "gpu"
gpu_only = pytest.mark.skipif(not ON_GPU, reason=f"needs a GPU; jax.default_backend() is {jax.default_backend()!r}")


def triton_deprecation(fn):
    """JAX 0.11 deprecates the Pallas Triton lowering (a DeprecationWarning at each lowering, checked in
    test_jax_versions.py; one raised by the import would be re-issued by kernels.pallas_gpu as a
    FutureWarning); the kernels still use it there, so those two are allowed."""
    fn = pytest.mark.filterwarnings("ignore:.*[Tt]riton.*:DeprecationWarning")(fn)
    return pytest.mark.filterwarnings("ignore:kernels.pallas_gpu uses the Pallas Triton lowering:FutureWarning")(fn)

# Tolerances: the shared model of the verification harness (jaxnet.testing.tolerances,
# FusedDenseBounds), derived per element from the inputs: the accumulation error of z in any order,
# the evaluation of act and act' (amplified where act' is a small difference of large terms, as
# gelu_tanh's is: Triton's tanh and XLA's differ by ulps there), dz rounded to the input dtype
# before the backward matmuls (the bf16/f16 tensor-core path) and one ulp of the stored result.
ACTIVATIONS = activations.NAMES


def _numpy_value_and_grads(x, w, b, dy, activation):
    """float64 y and (dx, dw, db) from the float64 reference forward and backward."""
    y, *grads = reference.fused_dense_vjp_numpy(x, w, None if b is None else np.asarray(b, np.float64), dy,
                                                activation=activation)
    return y, tuple(grads)


def _assert_close(got, want, tol, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)  # bf16 upcast first
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err = np.abs(got - want)
    bad = ~(err <= tol)  # also catches NaN
    assert not bad.any(), (
        f"{what}: {bad.sum()} of {bad.size} elements off; worst |err|/tol="
        f"{np.nanmax(np.where(np.isnan(err), np.inf, err / np.maximum(tol, 1e-300))):.3g}"
    )


def _value_and_grads(fn, x, w, b, dy, activation):
    """(y, dx, dw, db) of ``fn`` under one jit; db is None without a bias."""
    def f(x, w, b, dy):
        y, vjp = jax.vjp(lambda x, w, b: fn(x, w, b, activation=activation), x, w, b)
        return (y, *vjp(dy))

    return jax.jit(f)(x, w, b, dy)


def _check_problem(p, fn):
    """The property: fn's value and three gradients match the jax and the float64 references."""
    lead, k, n, dtype, activation, has_bias, seed = p
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.uniform(-1, 1, (*lead, k)), dtype)
    w = jnp.asarray(rng.uniform(-1, 1, (k, n)), dtype)
    b = jnp.asarray(rng.uniform(-1, 1, (n,)), dtype) if has_bias else None
    bounds = tolerances.FusedDenseBounds.from_inputs(x, w, b, activation)
    # No check depends on which side of relu's kink a rounded z falls (tolerances docstring).
    dy = jnp.asarray(np.where(bounds.kink_mask(), 0.0, rng.uniform(-1, 1, (*lead, n))), dtype)
    got = _value_and_grads(fn, x, w, b, dy, activation)
    ref = _value_and_grads(reference.fused_dense, x, w, b, dy, activation)
    exact_y, exact_grads = _numpy_value_and_grads(x, w, b, dy, activation)
    grad_tols = bounds.grads(dy, dict(zip("xwb", ref[1:] if b is not None else ref[1:3])))
    tols = (bounds.forward(ref[0]), grad_tols["x"], grad_tols["w"], grad_tols.get("b"))
    for name, g, r, e, tol in zip(("y", "dx", "dw", "db"), got, ref, (exact_y, *exact_grads), tols):
        if name == "db" and b is None:
            continue
        assert g.dtype == r.dtype, f"{name}: dtype {g.dtype} != reference {r.dtype}"
        _assert_close(g, r, tol, f"{name} vs jax reference ({dtype}, {activation})")
        _assert_close(g, e, tol, f"{name} vs float64 numpy ({dtype}, {activation})")


@st.composite
def problems(draw, dims, leads, n_leads=(1, 2, 0), dtypes=("float32", "bfloat16", "float16")):
    """(lead, K, N, dtype, activation, has_bias, seed) of one fused_dense call."""
    n_lead = draw(st.sampled_from(n_leads), label="n_lead")  # 0: x is a single row [K]
    lead = tuple(draw(st.sampled_from(leads), label=f"lead[{i}]") for i in range(n_lead))
    k = draw(st.sampled_from(dims), label="K")
    n = draw(st.sampled_from(dims), label="N")
    dtype = draw(st.sampled_from(dtypes), label="dtype")
    activation = draw(st.sampled_from(ACTIVATIONS), label="activation")
    has_bias = draw(st.booleans(), label="has_bias")
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    return lead, k, n, dtype, activation, has_bias, seed


# Small blocks, so that 1s, primes and sizes past a block all leave a partial block to pad.
_SMALL_BLOCKS = (BlockConfig(4, 4, 4, group_m=1), BlockConfig(8, 8, 8, group_m=2),
                 BlockConfig(8, 4, 16, group_m=8), BlockConfig(16, 8, 4, group_m=3))


@given(p=problems(dims=(1, 2, 3, 5, 8, 13, 17), leads=(1, 2, 3, 5, 7, 13, 0)),
       config=st.sampled_from(_SMALL_BLOCKS))
def test_interpret_values_and_grads_match_references(p, config):
    lead, k, n = p[:3]
    rows = math.prod(lead)
    event("zero-size batch" if rows == 0 else f"{len(lead)} batch dims")
    event("partial blocks" if (rows % config.block_m, n % config.block_n, k % config.block_k) != (0, 0, 0)
          else "whole blocks")

    def fn(x, w, b, activation):
        return fused_dense(x, w, b, activation=activation, config=config, lowering="interpret")

    _check_problem(p, fn)


@pytest.mark.gpu
@gpu_only
@triton_deprecation
@settings(max_examples=max(5, settings.default.max_examples // 2))  # Triton compiles take seconds
@given(p=problems(dims=(1, 16, 17, 64, 127, 129, 300), leads=(1, 3, 31, 128, 257, 1031, 0), n_leads=(1, 2)),
       config=st.sampled_from((BlockConfig(16, 16, 16, num_warps=4, num_stages=2),
                               BlockConfig(64, 32, 32), BlockConfig())))
def test_gpu_values_and_grads_match_references(p, config):
    assume(math.prod(p[0]) <= 1 << 13)  # keeps the float64 NumPy reference quick

    def fn(x, w, b, activation):
        return fused_dense(x, w, b, activation=activation, config=config, lowering="triton")

    _check_problem(p, fn)


@pytest.mark.gpu
@gpu_only
@triton_deprecation
def test_gpu_dispatch_auto_picks_pallas_and_autotune_caches():
    assert dispatch.resolve("auto").name == "pallas"
    assert resolve_lowering() == "triton"
    cfg = autotune(256, 256, 256, jnp.bfloat16, "gelu", candidates=(BlockConfig(), BlockConfig(64, 64, 32)),
                   repeats=2)
    assert autotune(256, 256, 256, jnp.bfloat16, "gelu") is cfg


@triton_deprecation
@pytest.mark.parametrize("activation,dtype", [(a, "bfloat16") for a in ACTIVATIONS]
                         + [("gelu", "float32"), ("relu", "float16")])
def test_kernels_lower_through_the_triton_lowering(activation, dtype):
    """Without a GPU: every primitive of the three kernels has a Pallas Triton lowering rule (lax.erf,
    for one, has none), with GPU-sized blocks and partial blocks on every axis. Lowered for an
    abstract H200 (``lower_for_gpu``), which JAX >= 0.11 needs where there is no GPU."""
    x = jax.ShapeDtypeStruct((2, 150, 200), dtype)
    w, b = jax.ShapeDtypeStruct((200, 130), dtype), jax.ShapeDtypeStruct((130,), dtype)
    text = fd_module.lower_for_gpu(x, w, b, activation=activation, config=BlockConfig(64, 64, 32)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3  # forward, dx, dW (+db)


@triton_deprecation
def test_pipeline_depth_fits_shared_memory():
    """Triton keeps num_stages - 1 copies of a loop trip's tiles in shared memory (227 KiB on an
    H200); the backward loads act'(z) in float32 beside dy and w, so at the default 128 x 128 x 64
    blocks it runs 2 stages where the forward runs 3 (3 asked 278,528 bytes there and failed)."""
    limit = blocks.SHARED_MEMORY_BYTES - blocks.SHARED_MEMORY_RESERVE
    assert blocks.pipeline_stages(3, 32 * 1024) == 3  # forward tiles: 16 KiB of x + 16 KiB of w
    assert blocks.pipeline_stages(3, 112 * 1024) == 2  # dx: dy 32 KiB + act'(z) 64 KiB + w 16 KiB
    assert blocks.pipeline_stages(4, limit // 3) == 4 and blocks.pipeline_stages(5, limit // 3) == 4
    assert blocks.pipeline_stages(3, limit + 1) == 1  # never below one stage
    x = jax.ShapeDtypeStruct((512, 512), jnp.bfloat16)
    w, b = jax.ShapeDtypeStruct((512, 512), jnp.bfloat16), jax.ShapeDtypeStruct((512,), jnp.bfloat16)
    for activation, stages in (("relu", [3, 2, 2]), ("identity", [3, 3, 3])):  # fwd, dx, dW
        text = fd_module.lower_for_gpu(x, w, b, activation=activation, config=BlockConfig(128, 128, 64)).as_text()
        assert [int(s) for s in re.findall(r"num_stages = (\d+) : i32", text)] == stages, activation


def test_via_dispatch_jit_and_eager_agree():
    """The public entry point, eager and under jit(grad), on a shape past the default block."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (3, 130, 7)), jnp.float32)
    w = jnp.asarray(rng.uniform(-1, 1, (7, 5)), jnp.float32)
    b = jnp.asarray(rng.uniform(-1, 1, (5,)), jnp.float32)
    c = jnp.asarray(rng.uniform(-1, 1, (3, 130, 5)), jnp.float32)  # the cotangent of y, exactly

    def loss(backend):
        return lambda x, w, b: jnp.sum(c * kernels.fused_dense(x, w, b, activation="gelu", backend=backend))

    want = jax.grad(loss("xla"), argnums=(0, 1, 2))(x, w, b)
    tols = tolerances.FusedDenseBounds.from_inputs(x, w, b, "gelu").grads(c, dict(zip("xwb", want)))
    for got in (jax.grad(loss("pallas"), argnums=(0, 1, 2))(x, w, b),
                jax.jit(jax.grad(loss("pallas"), argnums=(0, 1, 2)))(x, w, b)):
        for g, r, name in zip(got, want, "xwb"):
            _assert_close(g, r, tols[name], f"grad {name}")


def test_vmap_over_x_and_over_w():
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.uniform(-1, 1, (3, 6, 5)), jnp.bfloat16)
    ws = jnp.asarray(rng.uniform(-1, 1, (3, 5, 9)), jnp.bfloat16)
    b = jnp.asarray(rng.uniform(-1, 1, (9,)), jnp.bfloat16)
    cfg = BlockConfig(4, 8, 4)
    pallas = lambda x, w: fused_dense(x, w, b, activation="silu", config=cfg)  # noqa: E731
    ref = lambda x, w: reference.fused_dense(x, w, b, activation="silu")  # noqa: E731
    bounds = [tolerances.FusedDenseBounds.from_inputs(xs[i], ws[i], b, "silu") for i in range(3)]
    want_y = jax.vmap(ref)(xs, ws)
    _assert_close(jax.vmap(pallas, (0, 0))(xs, ws), want_y, np.stack([bd.forward(y) for bd, y in zip(bounds, want_y)]),
                  "vmap y over x and w")
    bounds_x = [tolerances.FusedDenseBounds.from_inputs(xs[i], ws[0], b, "silu") for i in range(3)]
    want_y = jax.vmap(ref, (0, None))(xs, ws[0])
    _assert_close(jax.vmap(pallas, (0, None))(xs, ws[0]), want_y,
                  np.stack([bd.forward(y) for bd, y in zip(bounds_x, want_y)]), "vmap y over x")
    per_example = jax.vmap(jax.grad(lambda x, w: pallas(x, w).astype(jnp.float32).sum(), argnums=1))(xs, ws)
    want = jax.vmap(jax.grad(lambda x, w: ref(x, w).astype(jnp.float32).sum(), argnums=1))(xs, ws)
    ones = np.ones((6, 9))  # the cotangent of each y
    _assert_close(per_example, want, np.stack([bd.grads(ones, {"w": g})["w"] for bd, g in zip(bounds, want)]),
                  "vmap grad w")


def test_float64_in_interpret_mode():
    with jax.enable_x64(True):
        _check_problem(((7,), 13, 5, "float64", "gelu", True, 3),
                       lambda x, w, b, activation: fused_dense(x, w, b, activation=activation,
                                                               config=BlockConfig(4, 4, 8)))


def test_no_retrace_for_repeated_calls_of_one_shape():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.uniform(-1, 1, (19, 11)), jnp.float32)
    w = jnp.asarray(rng.uniform(-1, 1, (11, 23)), jnp.float32)
    before = fd_module.TRACE_COUNT["forward"]
    for _ in range(3):
        kernels.fused_dense(x, w, activation="sigmoid", backend="pallas").block_until_ready()
    assert fd_module.TRACE_COUNT["forward"] - before == 1
    grad = jax.jit(jax.grad(lambda x: kernels.fused_dense(x, w, activation="sigmoid", backend="pallas").sum()))
    before = fd_module.TRACE_COUNT["forward"]
    for _ in range(3):
        grad(x).block_until_ready()
    assert fd_module.TRACE_COUNT["forward"] - before == 1


def test_registration_and_auto_choice():
    assert "pallas" in kernels.available_backends()
    if not ON_GPU:
        assert dispatch.resolve("auto").name != "pallas"  # interpret mode is for checking, not speed
        assert resolve_lowering() == "interpret"
        assert autotune(64, 64, 64) == blocks.INTERPRET_DEFAULT


def test_missing_lowerings_fail_clearly():
    x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
    with pytest.raises(NotImplementedError, match="no Mosaic GPU lowering"):
        fused_dense(x, w, lowering="mosaic_gpu")
    with pytest.raises(ValueError, match="unknown Pallas lowering"):
        fused_dense(x, w, lowering="cuda")
    if not ON_GPU:
        with pytest.raises(NotImplementedError, match="needs a GPU"):
            fused_dense(x, w, lowering="triton")
    with pytest.raises(ValueError, match="powers of two >= 16"):
        fd_module.fit_config(BlockConfig(block_m=8), 64, 64, 64, "triton")
    with pytest.raises(ValueError, match="K=3 features"):
        kernels.fused_dense(x, jnp.ones((4, 4)), backend="pallas")


def test_gpu_check_script_runs_end_to_end_in_interpret_mode(tmp_path):
    from experiments import gpu_check

    result = gpu_check.main(["--interpret", "--quick", "--workdir", str(tmp_path)])
    assert json.loads((tmp_path / "result.json").read_text()) == result
    assert result["lowering"] == "interpret" and result["targets_met"] is False
    assert result["tests_failed"] == 0 and result["tests_passed"] + result["tests_skipped"] >= 2
    report = (tmp_path / "report.md").read_text()
    assert "dry run" in report and "| quick square: 64 x 64 x 64 | relu |" in report


def test_gpu_without_a_triton_lowering_fails_clearly(monkeypatch):
    """A future JAX without jax.experimental.pallas.triton: an error naming the gap, no fallback."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(fd_module, "_triton_module", lambda: None)
    with pytest.raises(NotImplementedError, match="has no Pallas Triton lowering"):
        resolve_lowering()
