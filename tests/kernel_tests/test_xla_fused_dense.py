"""The "xla" backend (``kernels.xla``, the default of ``FusedDense`` and every model): bf16/f16
operands, f32 accumulation, forward and backward (and f32 operands, which take its custom VJP for
its layout); other dtypes fall back to the reference; and a bf16 TransformerLM against the same
model in float32.

Tolerances (one table, derived, not fitted). The inputs are bf16 (or f16) values and the float64
reference multiplies *those same values*, so the inputs' own rounding cancels out; what remains:
  - ``acc``: every dot product is a float32 sum of exact products (8 + 8 significant bits fit in
    f32's 24), within ``gamma_K ~= K u32`` of exact relative to ``sum |a||b|`` (Higham §3.1),
    u32 = 2**-24, times SAFETY = 2 (the bound is worst-case; constants);
  - ``store``: the result is rounded once to the input dtype, ``u |y|`` with u = 2**-8 (bf16) or
    2**-11 (f16), the unit roundoff;
  - backward only: the f32 cotangent ``dz`` is rounded once to the input dtype before the two
    dots, ``u |dz|``, which reaches each gradient through its matmul by absolute values
    (``u |dz| @ |w|.T`` for x, ``|x|.T @ u |dz|`` for w; the bias gradient sums dz in f32 before
    any rounding, so only ``acc`` and ``store``).
So e.g. ``tol_grad_x = (u + SAFETY (N+1) u32) (|dz| @ |w|.T) + u |grad_x|``.
float32 inputs (the f32 dense layer takes the same custom VJP, for its layout): the products
are no longer exact, but ``gamma_K`` already counts a rounding per product (Higham's bound is for
the whole dot product), and with u = u32 the cotangent "rounding" and the store are loose terms.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnet import losses
from jaxnet.models import TransformerConfig, TransformerLM
from jaxnet.nn import FusedDense
import kernels
from kernels import activations, reference, xla
from kernels.reference import fused_dense_numpy

SAFETY = 2.0
U32 = 2.0**-24
UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-24}  # half the machine epsilon


def _case(dtype, shape_x, n, seed):
    kx, kw, kb, kg = jax.random.split(jax.random.key(seed), 4)
    k = shape_x[-1]
    x = jax.random.normal(kx, shape_x).astype(dtype)
    w = (jax.random.normal(kw, (k, n)) / np.sqrt(k)).astype(dtype)
    b = (0.1 * jax.random.normal(kb, (n,))).astype(dtype)
    g = jax.random.normal(kg, (*shape_x[:-1], n)).astype(jnp.float32)
    return x, w, b, g


def _vjp(f, x, w, b, sweep):
    """``(y, vjp)`` of ``f`` at ``(x, w, b)``: called directly (``sweep`` None), or as model 1 of a
    sweep of three (``jax.vmap`` inside ``kernels.models_batched(3)``, as ``fit_many`` runs it; the
    other models' weights are scaled copies) with x shared by the models or one per model."""
    if sweep is None:
        return jax.vjp(f, x, w, b)
    shared = sweep == "shared x"
    ws, bs = jnp.stack([w / 2, w, 2 * w]), jnp.stack([b, b, -b])
    xs = x if shared else jnp.stack([-x, x, 2 * x])
    with kernels.models_batched(3):  # the backward's layout is chosen when vjp transposes, so both
        ys, vjps = jax.vjp(jax.vmap(f, in_axes=(None if shared else 0, 0, 0)), xs, ws, bs)

    def vjp(g):  # model 1's cotangent alone: the other models' gradients are zero
        with kernels.models_batched(3):
            gx, gw, gb = vjps(jnp.zeros((3, *g.shape), g.dtype).at[1].set(g))
        return gx if shared else gx[1], gw[1], gb[1]

    return ys[1], vjp


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("act", ["identity", "relu", "gelu_tanh"])
@pytest.mark.parametrize("shape_x,n,sweep", [((64, 96), 48, None), ((2, 33, 130), 70, None),
                                             ((64, 96), 48, "shared x"), ((33, 130), 5, "own x")])
def test_dense_value_and_gradients_match_float64(dtype, act, shape_x, n, sweep):
    """Also in a sweep, where the weight gradient is laid out for the batch of models."""
    x, w, b, g = _case(dtype, shape_x, n, seed=len(shape_x) * 7 + n)
    u = UNIT_ROUNDOFF[dtype]
    f = jax.jit(lambda x, w, b: xla.fused_dense(x, w, b, activation=act))
    y, vjp = _vjp(f, x, w, b, sweep)
    gx, gw, gb = vjp(g.astype(y.dtype))
    assert y.dtype == gx.dtype == gw.dtype == gb.dtype == jnp.dtype(dtype)

    x64, w64, b64 = (np.asarray(a, np.float64) for a in (x, w, b))
    g64 = np.asarray(g.astype(dtype), np.float64)  # the cotangent as the kernel receives it
    k = x64.shape[-1]
    z = x64 @ w64 + b64
    m = np.abs(x64) @ np.abs(w64) + np.abs(b64)
    y_ref = fused_dense_numpy(x64, w64, b64, activation=act)
    # Forward: f32 accumulation moved through act (|act'| <= 1.13), act evaluated in f32 (a few
    # ulps of f32 of |z| + |y|), one rounding to the input dtype.
    tol_y = 1.13 * SAFETY * (k + 1) * U32 * m + 8 * U32 * (np.abs(z) + np.abs(y_ref)) + u * np.abs(y_ref) + 1e-30
    err = np.abs(np.asarray(y, np.float64) - y_ref)
    assert np.all(err <= tol_y), f"forward: worst err/tol {np.max(err / tol_y):.3g}"

    # Gradients. relu's derivative is ambiguous where f32 rounding may flip the sign of z.
    dz = g64 * activations.get(act).np_grad(z)
    if act == "relu":
        dz = np.where(np.abs(z) <= 4 * SAFETY * (k + 1) * U32 * m, 0.0, dz)
        _, vjp = _vjp(f, x, w, b, sweep)
        keep = jnp.asarray(np.abs(z) > 4 * SAFETY * (k + 1) * U32 * m)
        gx, gw, gb = vjp(jnp.where(keep, g.astype(dtype), 0).astype(dtype))
    dz_err = np.abs(dz) * (8 * U32 * 1.13 + 2 * 0.81 * SAFETY * (k + 1) * U32 * m)  # act' in f32, z's error
    rows = int(np.prod(shape_x[:-1]))
    x2, dz2, e2 = x64.reshape(rows, k), dz.reshape(rows, n), dz_err.reshape(rows, n)
    gx_ref, gw_ref, gb_ref = (dz @ w64.T), x2.T @ dz2, dz2.sum(0)
    tol_gx = (u + SAFETY * (n + 1) * U32) * (np.abs(dz) @ np.abs(w64).T) + dz_err @ np.abs(w64).T
    tol_gw = (u + SAFETY * (rows + 1) * U32) * (np.abs(x2).T @ np.abs(dz2)) + np.abs(x2).T @ e2
    # Low precision: the bias gradient sums the cotangent rounded once to the dtype, as the dots take it.
    rounded = u if dtype in ("bfloat16", "float16") else 0.0
    tol_gb = (rounded + SAFETY * (rows + 1) * U32) * np.abs(dz2).sum(0) + e2.sum(0)
    for name, got, ref, tol in (("x", gx, gx_ref, tol_gx), ("w", gw, gw_ref, tol_gw), ("b", gb, gb_ref, tol_gb)):
        tol = tol + u * np.abs(ref) + 1e-30
        err = np.abs(np.asarray(got, np.float64) - ref)
        assert np.all(err <= tol), f"grad_{name}: worst err/tol {np.max(err / tol):.3g}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_sweep_lays_out_the_float32_weight_gradient_for_its_models(dtype):
    """Inside ``models_batched`` the float32 backward takes its dots in another order (what the
    value test above checks, in a sweep); bfloat16 keeps its order."""
    x, w, b, g = _case(dtype, (16, 8), 4, seed=0)
    ws, bs, gs = jnp.stack([w, w]), jnp.stack([b, b]), jnp.stack([g, g]).astype(dtype)
    f = jax.vmap(lambda w, b: xla.fused_dense(x, w, b, activation="identity"))
    program = lambda: jax.jit(lambda w, b, g: jax.vjp(f, w, b)[1](g)).lower(ws, bs, gs).as_text()  # noqa: E731
    with kernels.models_batched(2):
        in_sweep = program()
    assert (in_sweep != program()) == (dtype == "float32")


@pytest.mark.parametrize("spec,sa,sb", [
    ("bshd,bthd->bhst", (2, 8, 3, 16), (2, 8, 3, 16)),  # attention scores
    ("bhst,bthd->bshd", (2, 3, 8, 8), (2, 8, 3, 16)),  # probabilities x values
    ("btc,vc->btv", (2, 8, 16), (11, 16)),  # tied output head
])
def test_einsum_gradients_match_float64(spec, sa, sb):
    ka, kb, kg = jax.random.split(jax.random.key(3), 3)
    a = jax.random.normal(ka, sa).astype(jnp.bfloat16)
    b = jax.random.normal(kb, sb).astype(jnp.bfloat16)
    out, vjp = jax.vjp(jax.jit(lambda a, b: xla.einsum(spec, a, b)), a, b)
    assert out.dtype == jnp.float32
    g = jax.random.normal(kg, out.shape).astype(jnp.bfloat16).astype(jnp.float32)  # exact in bf16
    ga, gb = vjp(g)
    a64, b64, g64 = (np.asarray(t, np.float64) for t in (a, b, g))
    ins, o = spec.split("->")
    s_a, s_b = ins.split(",")
    u = UNIT_ROUNDOFF["bfloat16"]
    # Same table as above; here g is exact in bf16, so only accumulation and one store remain.
    length = max(np.prod(sa), np.prod(sb))  # >= any contraction length
    for got, ref, mag in (
        (out, np.einsum(spec, a64, b64), np.einsum(spec, abs(a64), abs(b64))),
        (ga, np.einsum(f"{o},{s_b}->{s_a}", g64, b64), np.einsum(f"{o},{s_b}->{s_a}", abs(g64), abs(b64))),
        (gb, np.einsum(f"{o},{s_a}->{s_b}", g64, a64), np.einsum(f"{o},{s_a}->{s_b}", abs(g64), abs(a64))),
    ):
        store = 0.0 if got.dtype == jnp.float32 else u
        tol = SAFETY * length * U32 * mag + store * np.abs(ref) + 1e-30
        assert np.all(np.abs(np.asarray(got, np.float64) - ref) <= tol)


def test_backward_dots_run_in_bfloat16():
    """The point of the custom VJP: no f32 x bf16 dot is left in the gradient of a bf16 dense layer."""
    x = jnp.ones((8, 16), jnp.bfloat16)
    layer = FusedDense(4, activation="gelu_tanh")
    params = layer.init(jax.random.key(0), x)["params"]
    loss = lambda x, p: layer.apply({"params": p}, x).astype(jnp.float32).sum()
    import re
    # The program as lowered (the backward dots sit inside kernels.autodiff.linear_map's transpose).
    text = jax.jit(jax.grad(loss, (0, 1))).lower(x, params).as_text()
    dots = re.findall(r"stablehlo\.dot_general[^\n]*: \((tensor<[^>]*>), (tensor<[^>]*>)\)", text)
    assert len(dots) >= 3  # the forward's and the two gradient dots
    assert all("bf16" in a and "bf16" in b for a, b in dots), dots


def _compiled_dot_operand_dtypes(fn, *args) -> list[tuple[str, ...]]:
    """The operand dtypes of every dot in the optimized HLO of ``jit(fn)`` (fusions included)."""
    import re

    text = jax.jit(fn).lower(*args).compile().as_text()
    dtype_of = {}
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[", line)
        if m:
            dtype_of[m.group(1)] = m.group(2)
    dots = []
    for line in text.splitlines():
        m = re.search(r" dot\(([^)]*)\)", line)
        if m:
            dots.append(tuple(dtype_of[name.strip().lstrip("%")] for name in m.group(1).split(",")))
    return dots


@pytest.mark.parametrize("spec,sa,sb", [
    ("mk,kn->mn", (256, 64), (64, 96)),  # dense layer: its weight gradient is x.T @ dz
    ("bshd,bthd->bhst", (4, 32, 2, 16), (4, 32, 2, 16)),
    ("bhst,bthd->bshd", (4, 2, 32, 32), (4, 32, 2, 16)),
    ("btc,vc->btv", (4, 32, 16), (11, 16)),
])
def test_compiled_gradient_dots_take_bfloat16_operands(spec, sa, sb):
    """After XLA's own rewrites, not just in the jaxpr: a transpose next to a dot can be folded
    into its dimension numbers, and a dot with an operand that is not row-major is then upcast
    to f32 on the CPU (it ran the LM's weight gradients at f32 speed). CPU only: a GPU compiles
    dots to library calls."""
    with jax.default_device(jax.devices("cpu")[0]):
        a = jnp.ones(sa, jnp.bfloat16)
        b = jnp.ones(sb, jnp.bfloat16)
        loss = lambda a, b: (xla.einsum(spec, a, b) ** 2).sum()
        dots = _compiled_dot_operand_dtypes(jax.grad(loss, (0, 1)), a, b)
    assert len(dots) >= 3, dots
    assert all(d == ("bf16", "bf16") for d in dots), dots


@pytest.mark.parametrize("k,n", [(48, 8), (8, 48)])
def test_the_weight_gradient_transposes_the_smaller_operand(k, n):
    """x.T @ dz [K, N] copies x [M, K] transposed when K < N, dz [M, N] (and the small result)
    when K > N; its dots still take bf16 operands. CPU only, as above."""
    m = 64
    with jax.default_device(jax.devices("cpu")[0]):
        x, w = jnp.ones((m, k), jnp.bfloat16), jnp.ones((k, n), jnp.bfloat16)
        loss = lambda w, x: (xla.fused_dense(x, w, activation="identity").astype(jnp.float32) ** 2).sum()
        text = jax.jit(jax.grad(loss)).lower(w, x).compile().as_text()
        dots = _compiled_dot_operand_dtypes(jax.grad(loss), w, x)
    x_t, dz_t = f"bf16[{k},{m}]", f"bf16[{n},{m}]"
    assert (dz_t in text, x_t in text) == ((True, False) if k > n else (False, True)), text
    assert dots and all(d == ("bf16", "bf16") for d in dots), dots


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("act", activations.NAMES)
def test_the_backward_keeps_only_the_pre_activation(act, dtype):
    """What reverse mode keeps between the passes: x, w and (but for the identity) the float32
    pre-activation z [M, N], from which the backward computes act'(z) by the table's closed form.
    Autodiff of gelu_tanh's formula kept seven [M, N] intermediates, each written out by the
    forward pass (docs/benchmarks.md, "The activation's derivative from z")."""
    m, k, n = 8, 4, 6
    x, w, b = jnp.ones((m, k), dtype), jnp.ones((k, n), dtype), jnp.ones((n,), dtype)
    _, vjp = jax.vjp(lambda x, w, b: xla.fused_dense(x, w, b, activation=act), x, w, b)
    kept = sorted((leaf.shape, str(leaf.dtype)) for leaf in jax.tree_util.tree_leaves(vjp) if hasattr(leaf, "shape"))
    want = [((k, n), dtype), ((m, k), dtype)] + ([] if act == "identity" else [((m, n), "float32")])
    assert kept == sorted(want), kept


def test_other_dtypes_run_the_reference_exactly():
    """Mixed-dtype calls (and float64) take no custom VJP: values and gradients are the reference's."""
    x = jax.random.normal(jax.random.key(0), (5, 7), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (7, 3), jnp.bfloat16)
    assert not xla.takes_custom_vjp(x, w) and xla.takes_custom_vjp(x, w.astype(jnp.float32))
    got, want = (jax.value_and_grad(lambda x, w, fn=fn: fn(x, w, activation="gelu").sum(), (0, 1))(x, w)
                 for fn in (xla.fused_dense, reference.fused_dense))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), got, want))


def test_the_xla_backend_is_what_fused_dense_layers_run():
    """``kernels.fused_dense(backend="xla")`` and ``FusedDense`` run this module's custom rules."""
    x = jnp.ones((4, 3), jnp.bfloat16)
    w = jnp.ones((3, 2), jnp.bfloat16)
    jaxpr = str(jax.make_jaxpr(lambda x, w: kernels.fused_dense(x, w, activation="relu", backend="xla"))(x, w))
    assert "name=_einsum_lp" in jaxpr
    layer = FusedDense(2, activation="relu")
    params = layer.init(jax.random.key(0), x)
    assert "name=_einsum_lp" in str(jax.make_jaxpr(layer.apply)(params, x))


def test_float32_inputs_take_the_plain_einsum():
    a = jnp.ones((3, 4))
    assert jax.make_jaxpr(lambda a: xla.einsum("ij,kj->ik", a, a))(a).eqns[0].primitive.name == "dot_general"
    with pytest.raises(ValueError, match="unsupported spec"):
        xla.einsum("ij,jk->i", a.astype(jnp.bfloat16), a.T.astype(jnp.bfloat16))


def test_bfloat16_lm_loss_and_gradients_follow_float32():
    """A bf16 TransformerLM (activations, dense layers, attention matmuls and the head in bf16;
    parameters, LayerNorm, softmax and loss in f32) on the float32 model's parameters.

    Each bf16 rounding is a relative error <= 2**-8 ~ 0.4%; a 2-layer model rounds a value some 10
    times between embedding and loss (block input, qkv, q/k/v after rotary, probabilities, attention
    output, proj, MLP hidden, MLP output, head input), so independent errors reach ~sqrt(10) x 0.4%
    ~ 1.2% of a typical value: the loss within 2% (relative), the gradient within 5% in norm
    (the backward rounds as many times again) and aligned with the f32 gradient (cosine > 0.99).
    """
    cfg = TransformerConfig(vocab_size=17, block_size=32, num_layers=2, num_heads=2, embed_dim=32, dropout_rate=0.0)
    ids = jax.random.randint(jax.random.key(0), (4, 32), 0, 17)
    params = TransformerLM(cfg).init(jax.random.key(1), ids)["params"]
    # A few "trained" directions so the loss is not log V by symmetry.
    params = jax.tree.map(lambda p, k: p + 0.05 * jax.random.normal(k, p.shape),
                          params, jax.tree.unflatten(jax.tree.structure(params),
                                                     list(jax.random.split(jax.random.key(2), len(jax.tree.leaves(params))))))

    def loss(params, dtype):
        logits = TransformerLM(cfg.replace(dtype=dtype)).apply({"params": params}, ids[:, :-1])
        assert logits.dtype == jnp.float32
        return losses.cross_entropy(logits, ids[:, 1:])

    l32, g32 = jax.jit(jax.value_and_grad(lambda p: loss(p, jnp.float32)))(params)
    l16, g16 = jax.jit(jax.value_and_grad(lambda p: loss(p, jnp.bfloat16)))(params)
    assert all(t.dtype == jnp.float32 for t in jax.tree.leaves(g16))  # parameters and grads stay f32
    assert abs(float(l16) - float(l32)) <= 0.02 * abs(float(l32))
    v32 = np.concatenate([np.ravel(t) for t in jax.tree.leaves(g32)]).astype(np.float64)
    v16 = np.concatenate([np.ravel(t) for t in jax.tree.leaves(g16)]).astype(np.float64)
    assert np.linalg.norm(v16 - v32) <= 0.05 * np.linalg.norm(v32)
    assert v16 @ v32 / (np.linalg.norm(v16) * np.linalg.norm(v32)) > 0.99


@pytest.mark.parametrize("x_shape", [(0,), (3, 0), (0, 0)])
def test_empty_contraction_and_rows_give_the_references_values_and_grads(x_shape):
    """K = 0 (z is the bias) and M = 0: reshape(-1, K) cannot infer M there (ZeroDivisionError)."""
    x = jnp.zeros(x_shape, jnp.float32)
    w = jnp.zeros((x_shape[-1], 2), jnp.float32)
    b = jnp.asarray([0.5, -1.0], jnp.float32)

    def loss(fn):
        return lambda x, w, b: jnp.sum(fn(x, w, b, activation="gelu") ** 2)

    got = jax.jit(jax.value_and_grad(loss(kernels.xla.fused_dense), argnums=(0, 1, 2)))(x, w, b)
    want = jax.value_and_grad(loss(kernels.reference.fused_dense), argnums=(0, 1, 2))(x, w, b)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-6, atol=1e-7)
    _, dx, dw, db = kernels.reference.fused_dense_vjp_numpy(x, w, b, np.ones(x_shape[:-1] + (2,)), activation="gelu")
    assert dx.shape == x_shape and dw.shape == w.shape
