"""``kernels.quantized_dense`` (int8 weights; w8a8) on every CPU backend against
``kernels.reference.quantized_dense``, with tolerances derived from the inputs; the activation
quantisation against its NumPy definition; the quantised layer against the float layer within the
quantisation bound; gradients (and their refusal for w8a8 in x); vmap; bad input.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import kernels
from kernels import quantized as q8
from kernels import reference
from kernels.activations import ACTIVATIONS
from jaxnet.testing import assert_matches_reference, tolerances
from jaxnet.testing.strategies import Call, fused_dense_shapes, make_fused_dense_call
from jaxnet.testing.tolerances import SAFETY, FusedDenseBounds, accumulator, eps, tiny

BACKENDS = ("xla", "numba")
# Few examples per search in the default ("ci") run: every new shape compiles the candidate and
# the reference; the "thorough" profile takes its own count.
EXAMPLES = None if os.environ.get("JAXNET_HYPOTHESIS_PROFILE") == "thorough" else 3
MAX_ELEMENTS = 1 << 12  # x + w_q + y elements per drawn call
MAX_SIZE = 70  # past the kernels' 32- and 64-column tiles, with ragged edges and K % 4 tails


# --- Tolerances -------------------------------------------------------------------------------
# Both sides compute the same quantised function; they differ only in float rounding, bounded as
# in jaxnet.testing.tolerances (Higham 3.1: a sum of n terms in any order is within ~n*eps/2 of
# exact, relative to the sum of the terms' magnitudes M; two such sums within n*eps*M; SAFETY 2):
#
#   weight-only: n = K + 2 terms: the K products, one rounding of w_q * scale (the reference
#     dequantises first; the "xla" and "numba" backends scale the dot after) and the bias add;
#     M = |x| @ |w_q * scale| + |b|, with w_q * scale exact in float64.
#   w8a8: the int32 dot is exact on both sides (the same integers from quantize_rows), so only
#     n = 4 roundings remain: int32 -> float, * scale_x, * scale, + b; M = |acc| scale_x scale + |b|.
#
# eps is the accumulator's (float32 for bfloat16/float16 x); the activation, the final cast to
# x's dtype and the gradients' tolerances are FusedDenseBounds' (forward, grads). The gradient
# in scale, d/ds_j = sum_k grad_w[k, j] w_q[k, j], is grad_w's tolerance pushed through |w_q| plus
# that K-term sum's own rounding (and, per tensor, the N-term sum over channels).
DOT_ROUNDINGS = {None: 2, "int8": 4}  # terms besides the K products (weight-only) / all (w8a8)


def quantize_rows_numpy(x):
    """The w8a8 activation contract in NumPy float32 (round half to even): the independent
    definition ``kernels.quantized.quantize_rows`` is checked against, bit for bit."""
    xa = np.asarray(x, np.float32)
    sx = np.max(np.abs(xa), axis=-1, initial=0).astype(np.float32) * np.float32(1 / q8.QMAX)
    inv = np.float32(1) / np.where(sx > 0, sx, np.float32(1))
    q = np.clip(np.round(xa * inv[..., None]), -q8.QMAX, q8.QMAX).astype(np.int8)
    return q, sx


@dataclasses.dataclass
class QuantizedBounds:
    """Per-call tolerances for ``quantized_dense(x, w_q, scale, b, activation=, act_quant=)``
    (the harness's ``tolerance.from_inputs`` protocol; arguments "arg0".."arg3")."""
    fused: FusedDenseBounds
    w_q: np.ndarray  # (K, N) float64
    scale_shape: tuple

    @classmethod
    def from_inputs(cls, args, kwargs) -> "QuantizedBounds":
        x, w_q, scale, b = args
        dtype = np.dtype(x.dtype)
        acc = accumulator(dtype)
        k, n = w_q.shape
        s64 = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (n,))
        wq64 = np.asarray(w_q, np.float64)
        w64 = wq64 * s64  # exact: 8 + 24 significant bits
        x64 = np.asarray(x, np.float64)
        b64 = None if b is None else np.asarray(b, np.float64)
        bias = 0.0 if b64 is None else b64
        if kwargs["act_quant"] is None:
            z, m = x64 @ w64 + bias, np.abs(x64) @ np.abs(w64) + np.abs(bias)
            n_terms = k + DOT_ROUNDINGS[None]
        else:
            q, sx = quantize_rows_numpy(x)
            dot = q.astype(np.int64) @ w_q.astype(np.int64)  # exact
            scaled = dot * np.asarray(sx, np.float64)[..., None] * s64
            z, m = scaled + bias, np.abs(scaled) + np.abs(bias)
            n_terms = DOT_ROUNDINGS["int8"]
        err_z = np.where(m == 0, 0.0, SAFETY * n_terms * eps(acc) * m + n_terms * tiny(acc))
        fused = FusedDenseBounds(x64, w64, b64, kwargs["activation"], dtype, z, m, err_z, exact=False)
        return cls(fused, wq64, tuple(np.shape(scale)))

    def forward(self, y_ref):
        return self.fused.forward(y_ref)

    def kink_mask(self):
        return self.fused.kink_mask()

    def grads(self, g, grads_ref: dict) -> dict:
        f = self.fused
        base = f.grads(g, {"x": grads_ref["arg0"], "w": np.zeros_like(f.w),
                           **({"b": grads_ref["arg3"]} if "arg3" in grads_ref else {})})
        tols = {"arg0": base["x"]}
        if "arg3" in grads_ref:
            tols["arg3"] = base["b"]
        if "arg2" in grads_ref:
            k, n = f.w.shape
            u, out = eps(accumulator(f.dtype)), np.dtype(grads_ref["arg2"].dtype)
            m = math.prod(f.x.shape[:-1])  # reshape(-1, 0) cannot infer it at K or N = 0
            rows = f.x.reshape(m, k)
            scale_g = tolerances.activation_bounds(f.activation).d1 * np.abs(np.asarray(g, np.float64)).reshape(m, n)
            terms = (np.abs(rows).T @ scale_g) * np.abs(self.w_q)  # (K, N): |x| |g| |w_q| per k
            tol = (base["w"] * np.abs(self.w_q)).sum(0) + SAFETY * (k + 1) * u * terms.sum(0)
            if self.scale_shape != (n,):  # one scale: the N channels summed
                tol = np.reshape(tol.sum() + SAFETY * (n + 1) * u * terms.sum(), self.scale_shape)
            tols["arg2"] = tol + eps(out) * np.abs(np.asarray(grads_ref["arg2"], np.float64)) + tiny(out)
        return tols


# --- Calls ------------------------------------------------------------------------------------

def quantize_columns(w, per_tensor=False):
    """Symmetric per-column int8 quantisation of a float ``[K, N]`` w in NumPy: ``(w_q, scale
    [N])``, or with ``per_tensor`` one scale ``[1]``; ``|w - w_q * scale| <= scale / 2``; an
    all-zero column (or tensor) gets scale 1."""
    w = np.asarray(w, np.float64)
    amax = np.max(np.abs(w), axis=None if per_tensor else 0, initial=0.0, keepdims=per_tensor)
    scale = np.where(amax > 0, amax / q8.QMAX, 1.0).astype(np.float32).reshape(-1)
    w_q = np.clip(np.round(w / scale.astype(np.float64)), -q8.QMAX, q8.QMAX).astype(np.int8)
    return w_q, scale


SCALE_KINDS = ("channel", "tensor", "scalar")  # scale [N], [1], []


def make_quantized_call(batch=(), k=1, n=1, *, dtype="float32", act_quant=None, activation="relu", bias=True,
                        scale_kind="channel", weights="quantized", values="normal", seed=0) -> Call:
    """One ``quantized_dense`` call, built deterministically: x and b as ``make_fused_dense_call``
    draws them (its value kinds), w_q and scale either quantised from its float w ("quantized") or
    any int8 values, -128 included, with log-uniform scales ("raw")."""
    x, w, b = make_fused_dense_call(batch, k, n, dtype=dtype, activation=activation, bias=bias, values=values,
                                    seed=seed).args
    if weights == "raw":
        rng = np.random.default_rng(seed + 1)
        w_q = rng.integers(-128, 128, (k, n)).astype(np.int8)
        scale = (10.0 ** rng.uniform(-4, 0, n if scale_kind == "channel" else 1)).astype(np.float32)
    else:
        w_q, scale = quantize_columns(w, per_tensor=scale_kind != "channel")
    scale = scale[0] if scale_kind == "scalar" else scale  # [N], [1] or []
    spec = (f"make_quantized_call(batch={tuple(batch)}, k={k}, n={n}, dtype={dtype!r}, act_quant={act_quant!r}, "
            f"activation={activation!r}, bias={bias}, scale_kind={scale_kind!r}, weights={weights!r}, "
            f"values={values!r}, seed={seed})")
    return Call((x, w_q, np.asarray(scale, np.float32), b), {"activation": activation, "act_quant": act_quant}, spec)


@st.composite
def quantized_calls(draw, act_quant=(None, "int8"), dtypes=("float32", "bfloat16", "float16")):
    """Calls of ``quantized_dense`` in the modes ``act_quant`` (one, or a tuple to draw from)."""
    batch, k, n = draw(fused_dense_shapes(max_elements=MAX_ELEMENTS, max_size=MAX_SIZE), label="shapes")
    modes = act_quant if isinstance(act_quant, tuple) else (act_quant,)
    return make_quantized_call(
        batch, k, n, act_quant=draw(st.sampled_from(modes), label="act_quant"),
        dtype=draw(st.sampled_from(dtypes), label="dtype"),
        activation=draw(st.sampled_from(tuple(ACTIVATIONS)), label="activation"),
        bias=draw(st.sampled_from((True, True, False)), label="bias"),
        scale_kind=draw(st.sampled_from(SCALE_KINDS), label="scale"),
        weights=draw(st.sampled_from(("quantized", "raw")), label="weights"),
        values=draw(st.sampled_from(("normal", "wide", "large", "zeros", "near_kink")), label="values"),
        seed=draw(st.integers(0, 2**16 - 1), label="seed"))


def _backend(name):
    return functools.partial(kernels.quantized_dense, backend=name)


# --- The property searches --------------------------------------------------------------------

def test_numba_weight_only_matches_the_reference():
    """Values (eager, jit, vmap over every argument) and the gradients in x, scale and b."""
    assert_matches_reference(_backend("numba"), reference.quantized_dense, args=quantized_calls(None),
                             tolerance=QuantizedBounds, max_examples=EXAMPLES)


def test_numba_w8a8_matches_the_reference():
    """Values (eager, jit, vmap); no gradients: w8a8 refuses them in x (tested below)."""
    assert_matches_reference(_backend("numba"), reference.quantized_dense, args=quantized_calls("int8"),
                             tolerance=QuantizedBounds, max_examples=EXAMPLES, check_grads=False)


def test_xla_matches_the_reference():
    """Both modes drawn, values (eager, jit, vmap); the xla gradients: see below."""
    assert_matches_reference(_backend("xla"), reference.quantized_dense, args=quantized_calls(),
                             tolerance=QuantizedBounds, max_examples=EXAMPLES, check_grads=False)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act_quant", (None, "int8"))
def test_sweep(backend, act_quant):
    """The searches above, longer (the "ci" profile's 20 examples, or "thorough"'s)."""
    assert_matches_reference(_backend(backend), reference.quantized_dense, args=quantized_calls(act_quant),
                             tolerance=QuantizedBounds, check_grads=act_quant is None)


def _half_away_from_zero(x, w_q, scale, b=None, *, activation="relu", act_quant=None):
    """w8a8 with x rounded half away from zero (0.5 -> 1, -2.5 -> -3): one step off at ties."""
    xs = x.astype(jnp.float32)
    sx = jnp.max(jnp.abs(xs), axis=-1, initial=0) / 127
    t = xs / jnp.where(sx > 0, sx, 1)[..., None]
    q = jnp.clip(jnp.sign(t) * jnp.floor(jnp.abs(t) + 0.5), -127, 127).astype(jnp.int8)
    dot = jax.lax.dot_general(q, w_q, (((q.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    z = dot * sx[..., None] * jnp.broadcast_to(scale.reshape(-1), w_q.shape[1:]) + (0 if b is None else b)
    return ACTIVATIONS[activation].fn(z).astype(x.dtype)


def _bfloat16_scale(x, w_q, scale, b=None, **kwargs):
    """Weight-only with the scales rounded to bfloat16 (a relative error up to 2**-9)."""
    return reference.quantized_dense(x, w_q, scale.astype(jnp.bfloat16).astype(jnp.float32), b, **kwargs)


def test_the_tolerances_reject_a_wrong_kernel():
    """The derived bounds see one quantisation step at a tie and scales rounded to bfloat16."""
    ties = st.just(Call((np.array([[127.0, 0.5, 1.5, -2.5]], np.float32), np.eye(4, dtype=np.int8),
                         np.ones((4,), np.float32), None), {"activation": "identity", "act_quant": "int8"}))
    once = dict(tolerance=QuantizedBounds, check_grads=False, check_vmap=False, check_jit=False, shrink=0)
    with pytest.raises(AssertionError, match="check: forward"):
        assert_matches_reference(_half_away_from_zero, reference.quantized_dense, args=ties, max_examples=1, **once)
    with pytest.raises(AssertionError, match="check: forward"):
        assert_matches_reference(_bfloat16_scale, reference.quantized_dense, args=quantized_calls(None, ("float32",)),
                                 max_examples=3, **once)


# --- The activation quantisation ------------------------------------------------------------

def test_quantize_rows_is_its_definition():
    """Round half to even (0.5 -> 0, 1.5 -> 2, -2.5 -> -2), the row's largest |x| -> +-127,
    |x - q scale_x| <= scale_x / 2, all-zero rows -> q = 0 and scale_x = 0; equal to the NumPy
    definition element for element, on random rows of every dtype."""
    q, sx = q8.quantize_rows(jnp.array([[127.0, 0.5, 1.5, -2.5, -127.0], [0.0, 0.0, -0.0, 0.0, 0.0]]))
    assert q.dtype == jnp.int8 and sx.dtype == jnp.float32
    np.testing.assert_array_equal(q, [[127, 0, 2, -2, -127], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(sx, [1.0, 0.0])
    rng = np.random.default_rng(0)
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        x = (rng.standard_normal((300, 37)) * 10.0 ** rng.uniform(-3, 3, (300, 1))).astype(dtype)
        q, sx = jax.jit(q8.quantize_rows)(x)
        q_np, sx_np = quantize_rows_numpy(np.asarray(x, np.float32))
        np.testing.assert_array_equal(q, q_np)
        np.testing.assert_array_equal(sx, sx_np)
        x64, sx64 = np.asarray(x, np.float64), np.asarray(sx, np.float64)[:, None]
        # Half a step, give or take the two roundings in scale_x (2**-23 relative) times |q| <= 127.
        assert np.all(np.abs(x64 - np.asarray(q, np.float64) * sx64) <= sx64 / 2 * (1 + 2.0**-14))
        assert np.all(np.abs(np.asarray(q)).max(axis=1) == 127)


@pytest.mark.parametrize("rows, k", [(1, 5), (3, 132), (64, 132), (130, 37), (256, 600)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_in_a_row_makes_that_rows_scale_and_outputs_nan(rows, k, backend):
    """One NaN element, or a whole row of them, reaches scale_x and every output of its row, and
    no other row; at every shape (XLA's CPU max reduction drops NaN from the rows of some shapes,
    [64, 132] among them with jax 0.10, which would quantise the NaN to 0 and answer finite values)."""
    rng = np.random.default_rng(rows + k)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[0, k // 2] = np.nan
    if rows > 2:
        x[2] = np.nan
    bad = np.isnan(x).any(axis=1)
    for fn in (q8.quantize_rows, jax.jit(q8.quantize_rows)):
        q, sx = fn(jnp.asarray(x))
        np.testing.assert_array_equal(np.isnan(np.asarray(sx)), bad)
    w_q = rng.integers(-127, 128, (k, 33)).astype(np.int8)
    y = np.asarray(kernels.quantized_dense(jnp.asarray(x), jnp.asarray(w_q), jnp.full((33,), 0.01), jnp.zeros(33),
                                           activation="relu", act_quant="int8", backend=backend))
    np.testing.assert_array_equal(np.isnan(y), np.broadcast_to(bad[:, None], y.shape))


def _w8a8_rows(rows, k, kind, seed):
    """``[rows, k]`` float32 rows of one kind: normal, ties (the largest |x| 127, so scale_x = 1 and
    halves round to even), tiny (subnormal), edge (max |x| about 127 times the smallest normal
    float32, where scale_x = max |x| / 127 leaves the normal range: the kernel quantises rows of
    a normal scale without its NaN and clamp guards), huge (near float32's top), all zero,
    infinite (every other row holds an inf or -inf: its scale is inf, its q all 0, its outputs
    NaN), or mixed."""
    rng = np.random.default_rng(seed)
    if kind == "ties":
        x = rng.integers(-254, 255, (rows, k)) / 2.0
        x[:, 0] = 127.0
    elif kind == "tiny":
        x = rng.standard_normal((rows, k)) * 1e-41
    elif kind == "edge":
        tiny = float(np.finfo(np.float32).tiny)
        x = rng.uniform(-1, 1, (rows, k)) * 127 * tiny * 2.0 ** rng.uniform(-2, 2, (rows, 1))
    elif kind == "huge":
        x = rng.standard_normal((rows, k)) * 1e37
    elif kind == "zeros":
        x = np.zeros((rows, k))
    elif kind == "inf":
        x = rng.standard_normal((rows, k))
        x[::2, rng.integers(0, k)] = rng.choice((np.inf, -np.inf))
    else:
        x = rng.standard_normal((rows, k)) * 10.0 ** rng.uniform(-3, 3, (rows, 1))
        if kind == "mixed":
            x[::3] = 0.0
            x[1::3, : k // 2] = 1e-41
    return x.astype(np.float32)


@given(rows=st.integers(1, 150), k=st.integers(1, 70), n=st.integers(1, 70),
       kind=st.sampled_from(("normal", "ties", "tiny", "edge", "huge", "zeros", "inf", "mixed")),
       relu=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**16 - 1))
@settings(max_examples=25 if EXAMPLES else 300, deadline=None)  # cheap: small shapes, no reference run
@example(rows=126, k=51, n=51, kind="edge", relu=False, bias=False, seed=1757)  # an output below the normal range
def test_numba_w8a8_quantises_x_bit_for_bit_as_the_definition(rows, k, n, kind, relu, bias, seed):
    """The numba w8a8 kernel quantises x's rows itself (in blocks of rows, on vectors of 16 and a
    scalar tail): its outputs equal, bit for bit, the epilogue ``float32(q @ w_q) * scale_x *
    scale + b`` (then relu) computed in NumPy on the integers of ``quantize_rows`` (every
    backend's definition; equal to ``quantize_rows_numpy`` but for subnormal x, which XLA's CPU
    flushes to zero, as the kernel, running inside XLA's call, does too; so the epilogue's
    subnormal results are flushed as well); over rows across the 64-row blocks, K across the
    16-wide vectors and the K % 4 tail, N across the 32-column tiles, ties, subnormals, huge values
    (outputs that overflow to inf), infinite values and zero rows."""
    _assert_w8a8_bit_for_bit(rows, k, n, kind, relu, bias, seed)


def _flushed(a: np.ndarray) -> np.ndarray:
    """``a`` with its subnormal elements set to zero of their sign: what an operation whose result
    is subnormal gives on XLA's CPU threads (flush-to-zero), where the kernels run."""
    return np.where(np.abs(a) < tiny(a.dtype), np.copysign(np.zeros_like(a), a), a)


def _assert_w8a8_bit_for_bit(rows, k, n, kind, relu, bias, seed):
    """The numba w8a8 kernel's outputs equal NumPy's epilogue on ``quantize_rows``' integers."""
    rng = np.random.default_rng(seed + 1)
    x = _w8a8_rows(rows, k, kind, seed)
    w_q = rng.integers(-128, 128, (k, n)).astype(np.int8)
    scale = rng.uniform(0.5, 2.0, n).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    got = kernels.quantized_dense(jnp.asarray(x), jnp.asarray(w_q), jnp.asarray(scale), None if b is None else
                                  jnp.asarray(b), activation="relu" if relu else "identity", act_quant="int8",
                                  backend="numba")
    q, sx = (np.asarray(a) for a in jax.jit(q8.quantize_rows)(jnp.asarray(x)))
    acc = q.astype(np.int64) @ w_q.astype(np.int64)  # exact; |acc| <= 260 * 127 * 128 fits int32
    with np.errstate(over="ignore", invalid="ignore"):  # "huge": inf, and inf - inf with a bias
        want = _flushed(_flushed(acc.astype(np.float32) * sx[:, None]) * scale[None, :])
        if b is not None:
            want = _flushed(want + b)
    if relu:
        want = np.maximum(want, np.float32(0))
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("k", (64, 256, 260, 66))
@pytest.mark.parametrize("rows", (21, 70))
def test_numba_w8a8_one_pass_and_several_passes_over_k_agree_bit_for_bit(rows, k):
    """Both forms of the w8a8 tile give the definition's bits: K a multiple of 4 up to ``4 *
    KC_QUADS`` (64, 256: one pass, the sums stored to y from registers) and beyond it or with a
    K % 4 tail (260, 66: passes accumulating in memory), on w_q in place (21 rows) and packed
    (70), over whole and partial column tiles."""
    from kernels.numba_cpu import _quantized

    assert 256 == 4 * _quantized.KC_QUADS and 21 < _quantized.PACK_MIN_ROWS <= 70
    for n, relu, bias in ((80, True, True), (10, False, False)):
        _assert_w8a8_bit_for_bit(rows, k, n, "normal", relu, bias, seed=k + n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_w8a8_accumulates_exactly_in_int32(backend):
    """127 * 127 * K overflows int8 and int16 (and w_q = -128 the unsigned trick of the numba
    kernel): the result is the exact integer dot times the scales, to float32 rounding."""
    k, n = 67, 37  # K % 4 = 3 and N % 32 = 5: every tail of the numba kernel
    x = np.full((3, k), 2.0, np.float32)
    x[1] = -2.0
    x[2, ::2] = -2.0
    w_q = np.full((k, n), 127, np.int8)
    w_q[:, 1::3] = -128
    scale = np.full((n,), 0.25, np.float32)
    y = kernels.quantized_dense(jnp.asarray(x), jnp.asarray(w_q), jnp.asarray(scale), activation="identity",
                                act_quant="int8", backend=backend)
    exact = (np.sign(x) * 127).astype(np.int64) @ w_q.astype(np.int64) * (2.0 / 127) * 0.25  # scale_x = 2/127
    np.testing.assert_allclose(np.asarray(y, np.float64), exact, rtol=4 * 2.0**-23, atol=0)


@pytest.mark.parametrize("act_quant", (None, "int8"))
def test_numba_shares_a_big_call_with_xlas_threads(act_quant):
    """A call that shares its blocks (the attribute ``share``, forced on whatever this machine's
    threshold) with several blocks (2 x 2), ragged edges (N % 64, K % 4), rows left over from
    the 4- and 8-row tiles and three passes over K (w8a8's ``KC_QUADS``): split between the
    caller and XLA's intra-op threads, it still matches the reference within the derived bounds."""
    from kernels.numba_cpu import _quantized, backend

    for activation in ("relu", "silu"):
        call = make_quantized_call((130,), 601, 300, act_quant=act_quant, activation=activation, seed=3)
        assert 300 > _quantized.BLOCK_COLS and 601 // 4 > 2 * _quantized.KC_QUADS
        with backend.use_blocking(backend.blocking().replace(parallel_min_macs=1)):
            assert backend.int8_share_attribute(130, 601, 300) == 1
            got = jax.jit(functools.partial(_backend("numba"), **call.kwargs))(*call.args)
        want = reference.quantized_dense(*call.args, **call.kwargs)
        tol = QuantizedBounds.from_inputs(call.args, call.kwargs).forward(np.asarray(want))
        assert np.all(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)) <= tol)


@pytest.mark.parametrize("tuned, macs, want", [
    (1 << 20, 655_360, 1),  # a tuned threshold above the model's: the int8 calls share from the model's
    (1 << 24, 655_360, 1),  # "won only at the largest size timed" (a slow spell's answer): the same
    (1 << 18, 300_000, 1), (1 << 18, 200_000, 0),  # a tuned threshold below the model's is kept
    (1 << 25, 20_000_000, 0),  # "won at no size timed": the machine's answer, kept
])
def test_int8_calls_share_from_the_model_threshold_unless_sharing_never_won(monkeypatch, tuned, macs, want):
    """The int8 kernels' ``share`` attribute: from ``min(tuned, the model's)`` multiply-adds, the
    model's here being 2^19 (a 2-core machine), but with the tuned threshold as it is when the
    tuner found sharing winning at no size it timed (above ``THRESHOLD_MAX_MACS``); the float32
    kernels keep the tuned one. The attribute reaches the lowered call."""
    from kernels.machine import describe
    from kernels.numba_cpu import backend, blocking, tune

    assert math.prod(tune.THRESHOLD_SHAPES[-1]) == blocking.THRESHOLD_MAX_MACS == 1 << 24
    monkeypatch.setattr(backend, "_derived_threshold", lambda: 1 << 19)
    tuned_blocking = blocking.derive(describe()).replace(parallel_min_macs=tuned)
    monkeypatch.setattr(backend, "blocking", lambda dtype="float32": tuned_blocking)
    m, k, n = macs // 2560 or 1, 256, 10  # 655,360 = 256 x 256 x 10
    macs = m * k * n
    assert backend.int8_share_attribute(m, k, n) == want
    assert backend.share_attribute(m, k, n) == (1 if macs >= tuned else 0)
    lowered = jax.jit(lambda x, q, s: kernels.quantized_dense(x, q, s, activation="relu", act_quant="int8",
                                                              backend="numba")).lower(
        jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.int8), jnp.ones((n,), jnp.float32)).as_text()
    assert f"share = {want} : i64" in lowered
    with backend.use_blocking(tuned_blocking.replace(parallel_min_macs=1 << 62)):  # forced: as it is
        assert backend.int8_share_attribute(m, k, n) == 0


@pytest.mark.parametrize("share", (0, 1))
@pytest.mark.parametrize("act_quant", (None, "int8"))
@pytest.mark.parametrize("rows", (21, 70))
def test_numba_vector_stores_and_packed_weights(rows, act_quant, share):
    """Rows in tiles of 4 (weight-only) or 8 (w8a8: 8 + 8 + 4 + 1, or 8 x 8 + 4 + 1 + 1 with w_q
    packed: ``PACK_MIN_ROWS``), K % 4 = 0, whole column tiles (64 or 32 wide: the vectorised
    epilogue) beside a partial one stored under a lane mask (N = 70, 100, 90, 84, 48: w8a8's of 6,
    4, 26, 20 and 16 columns, one vector wide up to 16; weight-only's of 1, 3, 2, 2 and 3
    vectors, in row tiles of 8 when 1 or 2), with and without a bias, relu and identity, a row of
    NaN (kept by relu, as ``jnp.maximum`` keeps it), on the caller alone and shared with XLA's
    threads (which then read the packed copy)."""
    from kernels.numba_cpu import _quantized, backend

    assert 21 < _quantized.PACK_MIN_ROWS <= 70 and 21 > _quantized.Q_MR > _quantized.WO_MR
    assert 128 % _quantized.WO_NR == 128 % _quantized.Q_NR == 0
    for n, bias, activation in ((128, True, "relu"), (128, False, "identity"), (70, True, "identity"),
                                (70, False, "relu"), (100, True, "relu"), (90, False, "identity"),
                                (84, True, "identity"), (48, False, "relu")):
        call = make_quantized_call((rows,), 132, n, act_quant=act_quant, activation=activation, bias=bias, seed=n)
        x = np.array(call.args[0])
        x[5] = np.nan
        args = (jnp.asarray(x), *call.args[1:])
        with backend.use_blocking(backend.blocking().replace(parallel_min_macs=1 if share else 2**62)):
            assert backend.int8_share_attribute(rows, 132, n) == share
            got = np.asarray(jax.jit(functools.partial(_backend("numba"), **call.kwargs))(*args), np.float64)
        want = np.asarray(reference.quantized_dense(*args, **call.kwargs), np.float64)
        assert np.array_equal(np.isnan(got), np.isnan(want)) and np.isnan(got[5]).all()
        ok = ~np.isnan(want)
        tol = QuantizedBounds.from_inputs(call.args, call.kwargs).forward(np.asarray(want))
        assert np.all(np.abs(got - want)[ok] <= np.broadcast_to(tol, want.shape)[ok]), (n, bias, activation)


# --- Against the float layer ------------------------------------------------------------------

@pytest.mark.parametrize("act_quant", (None, "int8"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_approximates_the_float_layer_within_the_quantisation_bound(backend, act_quant):
    """With ``w = w_q * s + e_w``, ``|e_w| <= s / 2`` (and for w8a8 ``x = q * s_x + e_x``,
    ``|e_x| <= s_x / 2`` per row), ``x @ w - (q s_x) @ (w_q s) = x @ e_w + e_x @ w - e_x @ e_w``, so
    per output ``|z_q - z| <= |x| @ (s/2) + s_x/2 * sum_k (|w| + s/2)`` (the e_x terms: w8a8 only),
    through the activation's Lipschitz constant, plus float32 rounding of both layers."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 70)).astype(np.float32)
    w = (rng.standard_normal((70, 45)) / np.sqrt(70)).astype(np.float32)
    b = rng.standard_normal(45).astype(np.float32)
    w_q, s = quantize_columns(w)
    for activation in ("identity", "gelu", "tanh"):
        y = kernels.quantized_dense(jnp.asarray(x), jnp.asarray(w_q), jnp.asarray(s), jnp.asarray(b),
                                    activation=activation, act_quant=act_quant, backend=backend)
        y_float = reference.fused_dense_numpy(x, w, b, activation=activation)
        half = s.astype(np.float64) / 2
        bound = np.abs(x) @ np.broadcast_to(half, w.shape)
        if act_quant == "int8":
            sx = np.abs(x).max(axis=1, keepdims=True) / 127
            bound = bound + sx / 2 * (np.abs(w).sum(0) + w.shape[0] * half)
        rounding = 4 * 72 * 2.0**-23 * (np.abs(x) @ np.abs(w) + np.abs(b))
        bound = ACTIVATIONS[activation].d1 * (bound + rounding)
        err = np.abs(np.asarray(y, np.float64) - y_float)
        assert np.all(err <= bound), (activation, float((err / bound).max()))
        assert err.max() > 0.05 * bound.max()  # the bound is not vacuous: the error reaches near it


# --- Gradients, vmap, dispatch ----------------------------------------------------------------

def _small(seed=2, m=3, k=9, n=5):
    call = make_quantized_call((m,), k, n, seed=seed)
    return [jnp.asarray(a) for a in call.args]


@pytest.mark.parametrize("backend", BACKENDS)
def test_w8a8_refuses_gradients_in_x_but_gives_them_in_scale_and_b(backend):
    x, w_q, s, b = _small()
    f = functools.partial(kernels.quantized_dense, activation="gelu", act_quant="int8", backend=backend)
    with pytest.raises(TypeError, match="not differentiable in x"):
        jax.grad(lambda x: f(x, w_q, s, b).sum())(x)
    got = jax.jit(jax.grad(lambda s, b: f(x, w_q, s, b).sum(), argnums=(0, 1)))(s, b)
    want = jax.grad(lambda s, b: reference.quantized_dense(x, w_q, s, b, activation="gelu", act_quant="int8").sum(),
                    argnums=(0, 1))(s, b)
    for g_got, g_want in zip(got, want):
        np.testing.assert_allclose(g_got, g_want, rtol=1e-5, atol=1e-6)


def test_xla_weight_only_gradients_match_the_reference():
    """Gradients in x, scale (per channel and per tensor) and b, within the derived bounds."""
    for scale_kind in ("channel", "tensor"):
        call = make_quantized_call((4, 3), 37, 70, dtype="float32", activation="gelu", scale_kind=scale_kind, seed=4)
        x, w_q, s, b = (jnp.asarray(a) for a in call.args)
        g = np.random.default_rng(0).standard_normal((4, 3, 70)).astype(np.float32)

        def grads(f):
            y, pull = jax.vjp(lambda x, s, b: f(x, w_q, s, b, activation="gelu"), x, s, b)
            return dict(zip(("arg0", "arg2", "arg3"), (np.asarray(t) for t in pull(jnp.asarray(g)))))
        got, want = grads(jax.jit(_backend("xla"), static_argnames="activation")), grads(reference.quantized_dense)
        tols = QuantizedBounds.from_inputs(call.args, {"activation": "gelu", "act_quant": None}).grads(g, want)
        for name in want:
            assert np.all(np.abs(got[name].astype(np.float64) - want[name]) <= tols[name]), (scale_kind, name)


def test_numba_folds_a_batch_of_x_into_one_call():
    """vmap over x alone (and vmap of vmap) runs one FFI call on the stacked rows, and gives
    what the calls one by one give."""
    x, w_q, s, b = _small(m=4)
    for act_quant in (None, "int8"):
        f = functools.partial(kernels.quantized_dense, w_q=w_q, scale=s, b=b, act_quant=act_quant, backend="numba")
        xs = jnp.stack([x, -x, 2 * x]).reshape(3, 2, 2, x.shape[-1])
        nested = jax.jit(jax.vmap(jax.vmap(f)))
        want = np.stack([np.stack([np.asarray(f(xs[i, j])) for j in range(2)]) for i in range(3)])
        np.testing.assert_array_equal(nested(xs), want)
        hlo = nested.lower(xs).as_text()
        assert hlo.count("stablehlo.custom_call") == 1 and "while" not in hlo


def test_per_tensor_scale_is_the_per_channel_scale_repeated():
    x, w_q, s, b = _small()
    for backend in BACKENDS:
        for act_quant in (None, "int8"):
            f = functools.partial(kernels.quantized_dense, x, w_q, b=b, act_quant=act_quant, backend=backend)
            want = f(jnp.full(w_q.shape[1], s[0]))
            np.testing.assert_array_equal(f(s[:1]), want)
            np.testing.assert_array_equal(f(s[0]), want)


def test_auto_runs_the_backend_measured_fastest_per_mode_and_shape(monkeypatch, tmp_path):
    """"auto" takes per mode and shape the backend kernels.autotune measured fastest here (entries
    of their own, beside fused_dense's); forged entries show that each mode reads its own; the
    result is the chosen backend's; with JAXNET_AUTO=rank it is "xla" without measuring."""
    from kernels import autotune, machine

    monkeypatch.setenv(machine.TUNING_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(autotune.POLICY_ENV, raising=False)
    autotune.forget()
    x, w_q, s, b = _small(m=40, k=24, n=12)
    names = ["xla", "numba"]
    choice = {mode: q8.resolve("auto", mode, 40, 24, 12, x.dtype, "relu") for mode in q8.ACT_QUANT}
    for mode in q8.ACT_QUANT:
        entry = autotune.entry(40, 24, 12, x.dtype, "relu", names, q8.TIMED_OPS[mode])
        assert choice[mode] == entry["fwd"] in names and set(entry["us"]) == set(names)
        assert all(entry["us"][name]["fwd"] > 0 for name in names)  # both really timed
        np.testing.assert_array_equal(kernels.quantized_dense(x, w_q, s, b, act_quant=mode, backend="auto"),
                                      kernels.quantized_dense(x, w_q, s, b, act_quant=mode, backend=choice[mode]))
    keys = {autotune.bucket(40, 24, 12, x.dtype, "relu", q8.TIMED_OPS[mode]) for mode in q8.ACT_QUANT}
    assert len(keys | {autotune.bucket(40, 24, 12, x.dtype, "relu")}) == 3  # one entry per op
    # Each mode follows its own entry: forge them with opposite answers.
    table = autotune._tables[str(machine.tuning_dir())]
    for mode, forced in ((None, "numba"), ("int8", "xla")):
        key = autotune.bucket(40, 24, 12, x.dtype, "relu", q8.TIMED_OPS[mode])
        table[key] = {**table[key], "fwd": forced}
        assert q8.resolve("auto", mode, 33, 24, 12, x.dtype, "relu") == forced  # 33 rows: same bucket as 40
    monkeypatch.setenv(autotune.POLICY_ENV, "rank")
    assert {q8.resolve("auto", mode, 40, 24, 12, x.dtype, "relu") for mode in q8.ACT_QUANT} == {"xla"}
    autotune.forget()


@pytest.mark.parametrize("shape", ((0, 5, 3), (2, 0, 3), (2, 5, 0), (1, 1, 1)))
def test_numba_takes_empty_and_unit_shapes(shape):
    m, k, n = shape
    x, w_q, s, b = jnp.ones((m, k)), jnp.ones((k, n), jnp.int8), jnp.ones(n), jnp.full(n, 0.5)
    for act_quant in (None, "int8"):
        got = kernels.quantized_dense(x, w_q, s, b, act_quant=act_quant, backend="numba")
        np.testing.assert_array_equal(got, reference.quantized_dense(x, w_q, s, b, act_quant=act_quant))


# --- Bad input --------------------------------------------------------------------------------

BAD = {
    "float w_q": (dict(w_q=np.ones((9, 5), np.float32)), TypeError, "w_q must be int8 .*float32\\[9, 5\\]"),
    "uint8 w_q": (dict(w_q=np.ones((9, 5), np.uint8)), TypeError, "w_q must be int8 .*uint8"),
    "scale of N - 1": (dict(scale=np.ones(4, np.float32)), ValueError, "scale must be \\[N\\]=\\[5\\].*\\[4\\]"),
    "int scale": (dict(scale=np.ones(5, np.int32)), TypeError, "scale has dtype int32"),
    "NaN scale": (dict(scale=np.array([1, 1, np.nan, 1, 1], np.float32)), ValueError, "scale holds NaN/Inf .*\\[2\\]"),
    "unknown act_quant": (dict(act_quant="int4"), ValueError, "act_quant must be None or 'int8', got 'int4'"),
    "long act_quant": (dict(act_quant="x" * 500), ValueError, "got 'x{79}$"),
    "K mismatch": (dict(x=np.ones((3, 8), np.float32)), ValueError, "x has K=8 .*w_q has K=9"),
    "b of N + 1": (dict(b=np.ones(6, np.float32)), ValueError, "b must be \\[N\\]=\\[5\\]"),
    "int x": (dict(x=np.ones((3, 9), np.int8)), TypeError, "x has dtype int8"),
    "scalar x": (dict(x=np.float32(1)), ValueError, "x must be \\[..., K\\]"),
    "unknown activation": (dict(activation="swish"), ValueError, "unknown activation 'swish'"),
    "unknown backend": (dict(backend="cuda"), ValueError, "unknown backend 'cuda'"),
}


@pytest.mark.parametrize("fn", ("xla", "numba", "reference"))
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_naming_the_argument(fn, case):
    if fn == "reference" and case == "unknown backend":
        pytest.skip("the reference takes backend='reference' only (its own test below)")
    x, w_q, s, b = _small()
    kwargs = dict(x=x, w_q=w_q, scale=s, b=b, activation="relu", act_quant=None)
    change, error, match = BAD[case]
    kwargs.update({k: (jnp.asarray(v) if isinstance(v, np.ndarray | np.generic) else v) for k, v in change.items()})
    call = reference.quantized_dense if fn == "reference" else functools.partial(kernels.quantized_dense, backend=fn)
    with pytest.raises(error, match=match):
        call(**kwargs)


RAW_CALLS = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from kernels.numba_cpu import quantized as nq

    out = jax.ShapeDtypeStruct((3, 2), jnp.float32)
    ok = dict(act=np.int64(1), share=np.int64(0))
    x, w_q, s, b = jnp.ones((3, 4)), jnp.ones((4, 2), jnp.int8), jnp.ones(2), jnp.ones(2)
    for kind in ("weight_only", "w8a8"):
        call = lambda *a, out=out, **k: jax.ffi.ffi_call(nq._target(kind), out)(*a, **{**ok, **k})
        cases = {
            "good": lambda: call(x, w_q, s, b),
            "K mismatch": lambda: call(jnp.ones((3, 5)), w_q, s, b),
            "int8 x": lambda: call(jnp.ones((3, 4), jnp.int8), w_q, s, b),
            "float w_q": lambda: call(x, jnp.ones((4, 2)), s, b),
            "scale of N + 1": lambda: call(x, w_q, jnp.ones(3), b),
            "b of N + 1": lambda: call(x, w_q, s, jnp.ones(3)),
            "y of M + 1": lambda: call(x, w_q, s, b, out=jax.ShapeDtypeStruct((4, 2), jnp.float32)),
            "arity": lambda: call(x, w_q),
            "act": lambda: call(x, w_q, s, b, act=np.int64(99)),
            "share": lambda: call(x, w_q, s, b, share=np.int64(7)),
        }
        for name, case in cases.items():
            try:
                y = jax.block_until_ready(case())
            except Exception as e:
                print("ERROR", kind, name, "|", str(e).splitlines()[0][:160])
            else:
                print("VALUE", kind, name, "|", np.asarray(y).tolist())
    print("DONE")
""")


def test_the_raw_handlers_refuse_malformed_calls_in_a_subprocess():
    """Each handler called straight through the FFI, past ``quantized_dense``'s checks: a well-formed
    call answers, every malformed one (operand shapes or dtypes, arity, attributes) is an XLA error
    naming what the handlers take, never a crash (a fresh process: a crash fails the test only)."""
    proc = subprocess.run([sys.executable, "-c", RAW_CALLS], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"subprocess died ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    lines = proc.stdout.splitlines()
    assert lines[-1] == "DONE", proc.stdout
    for kind in ("weight_only", "w8a8"):
        assert f"VALUE {kind} good | [[5.0, 5.0], [5.0, 5.0], [5.0, 5.0]]" in lines, proc.stdout
        errors = {ln.split(" | ")[0].split(" ", 2)[2]: ln.split(" | ")[1] for ln in lines
                  if ln.startswith(f"ERROR {kind} ")}
        operands = ("K mismatch", "int8 x", "float w_q", "scale of N + 1", "b of N + 1", "y of M + 1")
        assert set(errors) == {*operands, "arity", "act", "share"}, proc.stdout
        for name in operands:
            assert "take x f32 [M, K], w_q s8 [K, N], scale f32 [N], b f32 [N]" in errors[name], (kind, name)
        assert "wrong number of operands" in errors["arity"]
        assert "attribute 'act'" in errors["act"] and "attribute 'share'" in errors["share"]
        assert all("numba quantized_dense: " in e for e in errors.values()), errors  # the kernel named, no other


# w_q's last byte the last readable one: the page after it is made unreadable, so a byte read
# past the end kills the process.
GUARDED_TAIL = textwrap.dedent("""
    import ctypes, mmap
    import numpy as np
    from kernels.numba_cpu._quantized import _padded_columns

    page = mmap.PAGESIZE
    buf = mmap.mmap(-1, 2 * page)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert libc.mprotect(base + page, page, 0) == 0, ctypes.get_errno()  # PROT_NONE
    memory = np.frombuffer(buf, np.int8, count=page)
    rng = np.random.default_rng(0)
    for k, n, j0, width in ((7, 10, 0, 32), (5, 40, 32, 32), (3, 100, 64, 64), (1, 1, 0, 32), (9, 63, 0, 64)):
        wq = memory[page - k * n:].reshape(k, n)
        wq[:] = rng.integers(-128, 128, (k, n))
        want = np.zeros((k, width), np.int8)
        want[:, :n - j0] = wq[:, j0:]
        assert np.array_equal(_padded_columns(wq, j0, width).reshape(k, width), want), (k, n, j0, width)
    print("DONE")
""")


def test_the_partial_tiles_copy_reads_nothing_past_w_q():
    """``_padded_columns`` (the last, partial column tile's copy) loads each row under a mask: on
    a w_q that ends where an unreadable page begins it returns the columns zero-padded, and reads
    no byte past the end (a fresh process: such a read kills it)."""
    proc = subprocess.run([sys.executable, "-c", GUARDED_TAIL], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"subprocess died ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert proc.stdout.splitlines()[-1] == "DONE", proc.stdout

def test_the_reference_is_not_a_backend():
    x, w_q, s, b = _small()
    with pytest.raises(ValueError, match="is the reference, not a backend"):
        reference.quantized_dense(x, w_q, s, b, backend="xla")
