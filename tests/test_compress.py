"""jaxnet.compress: int8 post-training quantisation (issue 22, points 1 and 3).

- ``quantize_weight``: the quantisation properties (hypothesis), zero columns, per-tensor, errors.
- ``quantize`` rules: regex on the module path, first match wins, Qwix rules accepted, typos refused.
- The MLP, CNN and TransformerLM run quantised through their own classes: every quantised dense
  layer's output is within the bound derived from its quantisation steps of the float layer on
  the same input; on digits the trained MLP and CNN keep their accuracy.
- Save/load bit for bit, damaged and mismatched files refused naming the file; bytes before/after.
- Cross-check with Qwix's ``PtqProvider`` on the same trained MLP.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import flax.traverse_util
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxnet import losses
from jaxnet.compress import (QuantRule, apply_quantized, bytes_before_after, load_quantized, quantize,
                             quantize_weight, quantized, save_quantized)
from jaxnet.data.digits import digits_split
from jaxnet.data.images import standardize
from jaxnet.interop import save_safetensors
from jaxnet.models import CNN, MLP
from jaxnet.models.transformer import TransformerConfig, TransformerLM
from jaxnet.nn import FusedDense
from kernels.activations import ACTIVATIONS

EPS32 = float(np.finfo(np.float32).eps)
# XLA computes w / scale (scale broadcast over rows) as w * (1 / scale): two float32 roundings put
# the quotient up to |w / scale| * eps <= 127 eps from the exact one, before round()'s half step.
STEP_SLACK = 127 * EPS32


# --- quantize_weight ----------------------------------------------------------------------------------

@st.composite
def kernels_with_zero_columns(draw):
    k = draw(st.integers(1, 4), label="K")  # few shapes: each new one compiles the ops again
    n = draw(st.integers(1, 3), label="N")
    magnitude = draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e30]), label="magnitude")
    w = draw(hnp.arrays(np.float32, (k, n), elements=st.floats(-1, 1, width=32, allow_subnormal=False)), label="w")
    zero = draw(hnp.arrays(np.bool_, (n,)), label="zero columns")
    return np.where(zero, 0.0, w * np.float32(magnitude)).astype(np.float32)


def assert_rounds_to_nearest(q, w, scale, lo, hi):
    """``q == clip(round(w / scale), lo, hi)`` with the quotient exact (float64); within
    ``STEP_SLACK`` of a half step, either neighbour (the float32 quotient decides)."""
    t = w.astype(np.float64) / scale.astype(np.float64)
    tie = np.abs(np.abs(t - np.floor(t)) - 0.5) <= STEP_SLACK
    np.testing.assert_array_equal(q[~tie], np.clip(np.round(t), lo, hi)[~tie])
    assert np.all((q[tie] == np.clip(np.floor(t), lo, hi)[tie]) | (q[tie] == np.clip(np.ceil(t), lo, hi)[tie]))


def assert_within_half_step(w, w_q, scale):
    """|w - w_q * scale| <= scale / 2 per element (float64: both products are exact there)."""
    err = np.abs(w.astype(np.float64) - w_q.astype(np.float64) * scale.astype(np.float64))
    bound = scale.astype(np.float64) * (0.5 + STEP_SLACK)
    assert np.all(err <= bound), f"max error {np.max(err / bound):.6g} x the bound"


@settings(max_examples=30, deadline=None)
@given(w=kernels_with_zero_columns(), per_tensor=st.booleans())
def test_quantize_weight_is_within_half_a_step_with_int8_in_range(w, per_tensor):
    w_q, scale = quantize_weight(w, per_tensor=per_tensor)
    assert w_q.dtype == jnp.int8 and w_q.shape == w.shape
    assert scale.dtype == jnp.float32 and scale.shape == (w.shape[1],)
    w_q, scale = np.asarray(w_q), np.asarray(scale)
    assert np.abs(w_q.astype(int)).max() <= 127
    assert np.all(np.isfinite(scale)) and np.all(scale > 0)
    assert_within_half_step(w, w_q, scale)
    assert_rounds_to_nearest(w_q, w, scale, -127, 127)
    absmax = np.abs(w).max(axis=None if per_tensor else 0) * np.ones(w.shape[1], np.float32)
    # Columns whose max / 127 is below float32's smallest normal (zeros, ~1e-36) get scale 1.
    live = absmax / np.float32(127) >= np.finfo(np.float32).tiny
    # scale = max|w| / 127 (XLA divides by a constant as a product with its reciprocal: to 1 ulp);
    # the largest weight of each live column maps to +-127.
    np.testing.assert_allclose(scale[live], (absmax.astype(np.float64) / 127)[live], rtol=EPS32)
    if per_tensor:
        assert len(set(scale.tolist())) == 1 or not live.all()
    else:
        np.testing.assert_array_equal(np.abs(w_q.astype(int)).max(axis=0)[live], 127)
    # Those columns: scale 1 (nothing divided by zero), w_q 0.
    np.testing.assert_array_equal(scale[~live], 1.0)
    np.testing.assert_array_equal(w_q[:, ~live], 0)


def test_quantize_weight_symmetric_rounding_and_jit():
    # Scales that are powers of two, so that the ties below are exact: 127 * 2^-7 -> 2^-7, 63.5 -> 0.5.
    w = np.array([[127, -63.5, 0], [-127, 0.25, 0], [0.5, 0, 0], [1.5, 0, 0], [2.5, 0, 0]], np.float32)
    w[:, 0] *= 2.0 ** -7
    w_q, scale = quantize_weight(w)
    np.testing.assert_array_equal(np.asarray(scale), [2.0 ** -7, 0.5, 1.0])
    # Half steps round to even (0.5 -> 0, 1.5 -> 2, 2.5 -> 2); -w gives exactly -w_q (no -128).
    np.testing.assert_array_equal(np.asarray(w_q), [[127, -127, 0], [-127, 0, 0], [0, 0, 0], [2, 0, 0], [2, 0, 0]])
    np.testing.assert_array_equal(np.asarray(quantize_weight(-w)[0]), -np.asarray(w_q))
    jq, js = jax.jit(quantize_weight)(w)
    np.testing.assert_array_equal(jq, w_q)
    np.testing.assert_array_equal(js, scale)
    bq, bs = quantize_weight(jnp.asarray(w, jnp.bfloat16))  # low precision: quantised from its float32 value
    assert bq.dtype == jnp.int8 and bs.dtype == jnp.float32
    pq, ps = quantize_weight(w, per_tensor=True)
    np.testing.assert_array_equal(np.asarray(ps), [0.5] * 3)
    np.testing.assert_array_equal(np.asarray(pq)[:, 0], [2, -2, 0, 0, 0])


def test_quantize_weight_refuses_bad_weights():
    with pytest.raises(TypeError, match="floating-point.*int8"):
        quantize_weight(np.ones((2, 3), np.int8))
    with pytest.raises(ValueError, match=r"\[K, N\].*\(6,\)"):
        quantize_weight(np.ones(6, np.float32))
    with pytest.raises(ValueError, match=r"K, N >= 1.*\(0, 3\)"):
        quantize_weight(np.ones((0, 3), np.float32))
    w = np.ones((4, 5), np.float32)
    w[2, 3] = np.nan
    w[0, 1] = np.inf
    with pytest.raises(ValueError, match=r"NaN/Inf in 2 column\(s\), first \[1, 3\]"):
        quantize_weight(w)


# --- rules --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)  # one init per shape for the whole file (the trees are never mutated)
def mlp_variables(features=(6, 5, 4), k=8):
    model = MLP(features, in_features=k)
    return model, jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, k)))


def test_rules_pick_layers_by_regex_first_match_wins():
    _, variables = mlp_variables()
    rules = [QuantRule(module_path="layers_1", weight_qtype=None),               # keep layers_1 float
             QuantRule(module_path="layers_[12]", weight_qtype="int8"),          # never reached for layers_1
             QuantRule(module_path="layers_.*", weight_qtype=jnp.int8, act_qtype="int8", per_tensor=True)]
    q = quantize(variables, rules)["params"]
    assert set(q["layers_1"]) == {"kernel", "bias"}
    assert q["layers_1"]["kernel"] is variables["params"]["layers_1"]["kernel"]
    assert set(q["layers_2"]) == {"w_q", "scale", "bias"}                        # weight-only, per channel
    assert set(q["layers_0"]) == {"w_q", "scale", "bias", "act_int8"}            # w8a8, one scale
    assert len(set(np.asarray(q["layers_0"]["scale"]).tolist())) == 1
    assert len(set(np.asarray(q["layers_2"]["scale"]).tolist())) > 1
    assert q["layers_2"]["bias"] is variables["params"]["layers_2"]["bias"]
    # Qwix's rule objects are read as they are (same fields, same meaning).
    qwix = pytest.importorskip("qwix", reason="qwix is the optional 'compress' extra")
    qq = quantize(variables, [qwix.QuantizationRule(module_path="layers_2", weight_qtype=jnp.int8)])["params"]
    assert "w_q" in qq["layers_2"] and "kernel" in qq["layers_0"] and "kernel" in qq["layers_1"]
    with pytest.raises(ValueError, match="tile_size"):
        quantize(variables, [qwix.QuantizationRule(weight_qtype=jnp.int8, tile_size=4)])


def test_rules_on_the_transformer_paths_and_bad_rules(transformer):
    variables = transformer[2]
    q = quantize(variables, [QuantRule(module_path="trunk/block0/.*", weight_qtype="int8")])["params"]
    quantized_paths = {"/".join(p[:-1]) for p in flax.traverse_util.flatten_dict(q) if p[-1] == "w_q"}
    assert quantized_paths == {f"trunk/block0/{m}" for m in ("attn/qkv", "attn/proj", "mlp/fc", "mlp/out")}
    assert "embedding" in q["trunk"]["wte"]  # embeddings are not dense layers
    _, mlp = mlp_variables()
    with pytest.raises(ValueError, match=r"'layer_0'\] match no dense layer.*layers_0"):
        quantize(mlp, [QuantRule(module_path="layer_0", weight_qtype="int8")])
    with pytest.raises(ValueError, match="weight_qtype must be 'int8'"):
        quantize(mlp, [QuantRule(weight_qtype="int4")])
    with pytest.raises(ValueError, match="act_qtype needs weight_qtype"):
        quantize(mlp, [QuantRule(act_qtype="int8")])
    with pytest.raises(ValueError, match="not a regex"):
        quantize(mlp, [QuantRule(module_path="layers_(", weight_qtype="int8")])
    with pytest.raises(TypeError, match="Flax variables"):
        quantize(mlp["params"])
    with pytest.raises(TypeError, match="sequence of rules"):
        quantize(mlp, QuantRule(weight_qtype="int8"))


# --- models run quantised -----------------------------------------------------------------------------

def check_dense_layers(model, variables, qvariables, *args):
    """Runs ``qvariables`` through ``model`` (jitted) recording every FusedDense's input and output,
    and holds each quantised layer to the bound of its quantisation steps. Returns how many layers
    ran quantised.

    For ``y = act(x @ W + b)`` run as ``act(x' @ (w_q * s) + b)``, ``|W - w_q * s| <= s / 2`` per
    column and (w8a8) ``|x - x'| <= s_x / 2`` with ``s_x = max|x_row| / 127``, so per output
    ``|z' - z| <= sum_k |x_k| s_n / 2 + s_x / 2 sum_k |w_q s|_kn``, times ``sup |act'|`` (``d1`` of
    the activation table), plus float32 rounding of the K-term sums (``2 K eps`` of their size).
    """
    acts = {}

    def recorder(next_fun, args_, kwargs, context):
        y = next_fun(*args_, **kwargs)
        if isinstance(context.module, FusedDense) and context.method_name == "__call__":
            acts[context.module.scope.path] = context.module.activation
            context.module.sow("intermediates", "xy", (args_[0], y))
        return y

    def run(qvariables, *args):
        # Flax runs the interceptor entered first outermost: the recorder sees the quantised layer.
        with nn.intercept_methods(recorder), quantized():
            return model.apply(qvariables, *args, mutable=["intermediates"])

    _, state = jax.jit(run)(qvariables, *args)
    checked = 0
    for path, ((x, y),) in flax.traverse_util.flatten_dict(state["intermediates"]).items():
        path = path[:-1]
        q, f = qvariables["params"], variables["params"]
        for key in path:
            q, f = q[key], f[key]
        if "w_q" not in q:
            continue
        act = ACTIVATIONS[acts[path]]
        k = x.shape[-1]
        x = np.asarray(x, np.float64).reshape(-1, k)
        y = np.asarray(y, np.float64).reshape(x.shape[0], -1)
        s = np.asarray(q["scale"], np.float64)
        w_hat = np.asarray(q["w_q"], np.float64) * s
        b = np.asarray(f.get("bias", 0.0), np.float64)
        z = x @ np.asarray(f["kernel"], np.float64) + b
        bound = np.abs(x).sum(1, keepdims=True) * s / 2
        if "act_int8" in q:
            bound = bound + np.abs(x).max(1, keepdims=True) / 127 / 2 * np.abs(w_hat).sum(0)
        bound = bound + 2 * k * EPS32 * (np.abs(x) @ np.abs(w_hat) + np.abs(b)) + 1e-6
        np.testing.assert_array_less(np.abs(y - act.np_fn(z)), act.d1 * bound, err_msg="/".join(path))
        checked += 1
    return checked


def train(model, variables, x, y, steps, lr=1e-2):
    """``steps`` full-batch Adam steps on cross-entropy, in one compiled scan."""
    tx = optax.adam(lr)

    def loss(params):
        return losses.cross_entropy(model.apply({**variables, "params": params}, x), y)

    def step(carry, _):
        params, opt = carry
        updates, opt = tx.update(jax.grad(loss)(params), opt, params)
        return (optax.apply_updates(params, updates), opt), None

    @jax.jit
    def fit(params):
        return jax.lax.scan(step, (params, tx.init(params)), None, length=steps)[0][0]

    return {**variables, "params": fit(variables["params"])}


@pytest.fixture(scope="module")
def digits():
    train_set, test_set = digits_split()
    x_train, x_test = standardize(train_set.x, test_set.x)
    return x_train, train_set.y, x_test, test_set.y


@pytest.fixture(scope="module")
def trained_mlp(digits):
    x, y, _, _ = digits
    model = MLP((32, 10), in_features=64)
    x = x.reshape(len(x), -1)
    return model, train(model, model.init(jax.random.key(0), x[:1]), x, y, steps=60)


def accuracy(logits, labels) -> float:
    return float(np.mean(np.argmax(np.asarray(logits), -1) == labels))


def test_trained_mlp_runs_quantised_within_bounds_and_keeps_its_accuracy(trained_mlp, digits):
    model, variables = trained_mlp
    x, y = digits[2].reshape(len(digits[2]), -1), digits[3]
    run = jax.jit(lambda v, x: apply_quantized(model, v, x))
    float_logits = np.asarray(jax.jit(model.apply)(variables, x))
    assert accuracy(float_logits, y) > 0.9
    outputs = []
    for act_qtype in (None, "int8"):
        qvariables = quantize(variables, [QuantRule(weight_qtype="int8", act_qtype=act_qtype)])
        assert check_dense_layers(model, variables, qvariables, x) == 2
        q_logits = np.asarray(run(qvariables, x))
        assert accuracy(q_logits, y) >= accuracy(float_logits, y) - 0.01  # within 1 point (4 of 450 digits)
        assert np.mean(np.argmax(q_logits, -1) == np.argmax(float_logits, -1)) >= 0.99
        outputs.append(q_logits)
    # The int8 paths ran: neither equals the float model, and w8a8 differs from weight-only.
    assert not np.array_equal(outputs[0], float_logits) and not np.array_equal(outputs[0], outputs[1])


def test_cnn_runs_its_dense_head_quantised_and_keeps_convs_and_batch_stats(digits):
    x = digits[2][:32]
    model = CNN(num_classes=10, features=(4,), convs_per_block=1, head=(16,))  # BatchNorm: batch_stats
    variables = jax.jit(model.init)(jax.random.key(0), x)
    qvariables = quantize(variables, [QuantRule(module_path="logits", weight_qtype="int8", act_qtype="int8"),
                                      QuantRule(weight_qtype="int8")])
    assert qvariables["batch_stats"] is variables["batch_stats"]
    assert qvariables["params"]["block0_conv0"] is variables["params"]["block0_conv0"]  # convs stay float
    assert check_dense_layers(model, variables, qvariables, x) == 2  # head_0 and logits


@pytest.fixture(scope="module")
def transformer():
    cfg = TransformerConfig(vocab_size=11, block_size=8, num_layers=2, num_heads=2, embed_dim=16, mlp_ratio=2)
    model = TransformerLM(cfg)
    ids = jax.random.randint(jax.random.key(1), (2, 8), 0, 11)
    return model, ids, jax.jit(model.init)(jax.random.key(0), ids)


def test_transformer_lm_runs_quantised_every_dense_layer(transformer):
    model, ids, variables = transformer
    # Both modes in one model: block0 w8a8, block1 weight-only.
    qvariables = quantize(variables, [QuantRule(module_path="trunk/block0/.*", weight_qtype="int8", act_qtype="int8"),
                                      QuantRule(weight_qtype="int8")])
    assert check_dense_layers(model, variables, qvariables, ids) == 4 * model.config.num_layers
    # An untied head is a flax.linen.Dense, which does not run quantised: refused by name (abstractly:
    # the error comes while tracing).
    untied = TransformerLM(model.config.replace(tie_embeddings=False))
    with pytest.raises(ValueError, match="'head' is a Dense with quantised weights"):
        jax.eval_shape(lambda: apply_quantized(untied, quantize(untied.init(jax.random.key(0), ids)), ids))


@pytest.mark.parametrize("which", ["mlp", "cnn", "lm"])
def test_dense_free_drops_the_products_of_exactly_the_layers_quantize_touches(which, transformer, digits):
    """The compress study's ceiling model: inside ``dense_free`` each FusedDense returns zeros of
    its output's shape, and every other product (attention, the tied output, convolutions) stays."""
    from jaxnet.compress.quantize import quantized_layers
    from jaxnet.studies.compress import dense_free

    if which == "lm":
        model, x, variables = transformer
    else:
        x = digits[2][:8]
        model = MLP((32, 10)) if which == "mlp" else CNN(num_classes=10, features=(4,), convs_per_block=1, head=(16,))
        x = x.reshape(len(x), -1) if which == "mlp" else x
        variables = model.init(jax.random.key(0), x)
    layers = len(quantized_layers(quantize(variables)["params"]))
    seen = []

    def free(v, x):
        def recorder(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            if isinstance(context.module, FusedDense) and context.method_name == "__call__":
                seen.append((args[0], y))
            return y
        # Flax runs the interceptor entered first outermost: the recorder sees dense_free's outputs.
        with nn.intercept_methods(recorder), dense_free():
            return model.apply(v, x)

    def products(fn):
        text = str(jax.make_jaxpr(fn)(variables, x))
        return text.count("dot_general") + text.count("conv_general_dilated")

    assert layers > 0 and products(model.apply) - products(free) == layers
    # Opaque to XLA: each layer's zeros still come out of a conditional in the optimised program.
    assert jax.jit(free).lower(variables, x).compile().as_text().count(" conditional(") == layers
    seen.clear()
    assert free(variables, x).shape == model.apply(variables, x).shape  # eagerly: the layers' values seen
    assert len(seen) == layers
    for xin, y in seen:
        assert y.shape[:-1] == xin.shape[:-1]
        assert not np.any(np.asarray(y))  # zeros, whatever x holds


def test_quantised_trees_need_apply_quantized_and_must_be_well_formed():
    model, variables = mlp_variables()
    x = jnp.ones((2, 8))
    qvariables = quantize(variables)
    with pytest.raises(ValueError, match="layers_0: its params are quantised.*apply_quantized"):
        model.apply(qvariables, x)
    with pytest.raises(ValueError, match="no quantised layer"):
        apply_quantized(model, variables, x)
    bad = {"params": {**qvariables["params"], "layers_1": {**qvariables["params"]["layers_1"],
                                                           "scale": jnp.array([1.0, np.inf, 1, 1, 1])}}}
    with pytest.raises(ValueError, match="'layers_1': scale must be finite"):
        apply_quantized(model, bad, x)
    bad["params"]["layers_1"]["w_q"] = variables["params"]["layers_1"]["kernel"]
    with pytest.raises(TypeError, match="'layers_1': w_q must be int8"):
        apply_quantized(model, bad, x)


# --- files and bytes ----------------------------------------------------------------------------------

def test_save_load_round_trip_is_bit_exact_and_damage_is_refused(tmp_path):
    rules = [QuantRule(module_path="layers_2", weight_qtype="int8", act_qtype="int8"), QuantRule(weight_qtype="int8")]
    model, variables = mlp_variables()
    qvariables = quantize(variables, rules)
    path = tmp_path / "q.safetensors"
    save_quantized(path, qvariables)
    loaded = load_quantized(path, like=qvariables)
    flat_a, flat_b = flax.traverse_util.flatten_dict(qvariables), flax.traverse_util.flatten_dict(loaded)
    assert flat_a.keys() == flat_b.keys()
    for key, a in flat_a.items():
        assert a.dtype == flat_b[key].dtype, key
        np.testing.assert_array_equal(np.asarray(a), np.asarray(flat_b[key]), err_msg=str(key))
    x = jax.random.normal(jax.random.key(1), (2, 8))
    run = jax.jit(lambda v: apply_quantized(model, v, x))
    np.testing.assert_array_equal(run(loaded), run(qvariables))

    # A flipped byte in the data (the header still parses): caught by the saved hashes.
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"damaged\.safetensors: the bytes of 1 array\(s\) differ from their saved"):
        load_quantized(damaged)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"truncated\.safetensors: not a valid safetensors file"):
        load_quantized(truncated)
    plain = tmp_path / "float.safetensors"
    save_safetensors(plain, variables)
    with pytest.raises(ValueError, match=r"float\.safetensors: not a quantised tree written by save_quantized"):
        load_quantized(plain)
    # A file for another model: the names and shapes are checked against `like`, naming the file.
    narrower = {k: v[..., :3] if v.ndim else v for k, v in qvariables["params"]["layers_2"].items()}  # N = 3
    with pytest.raises(ValueError, match=r"q\.safetensors: 3 array\(s\) differ from like: \['params\.layers_2\.bias"):
        load_quantized(path, like={"params": {**qvariables["params"], "layers_2": narrower}})
    shorter = {"params": {k: v for k, v in qvariables["params"].items() if k != "layers_2"}}
    with pytest.raises(ValueError, match=r"q\.safetensors: arrays differ from like: missing \[\], unexpected .*ers_2"):
        load_quantized(path, like=shorter)
    with pytest.raises(FileNotFoundError):
        load_quantized(tmp_path / "absent.safetensors")


def test_bytes_before_after_shrink_dense_weights_four_times():
    _, variables = mlp_variables(features=(64, 32), k=128)
    before, after = bytes_before_after(variables, quantize(variables))
    dense = [(128, 64), (64, 32)]
    assert before == sum(4 * k * n + 4 * n for k, n in dense)
    # int8 kernel (1 byte / weight) + float32 scale and bias per output: ~4x on the weights.
    assert after == sum(k * n + 8 * n for k, n in dense)
    assert before / after > 3.7  # (4K + 4) / (K + 8) per column: 3.8 at K = 128, -> 4 as K grows
    w8a8 = quantize(variables, [QuantRule(weight_qtype="int8", act_qtype="int8")])
    assert bytes_before_after(variables, w8a8)[1] == after + 2  # one bool marker per layer


# --- Qwix ---------------------------------------------------------------------------------------------

# Qwix 0.1.8 reads flax.nnx.VariableState, which Flax 0.12 keeps only as a deprecated alias.
@pytest.mark.filterwarnings("ignore:'VariableState' was removed:DeprecationWarning")
def test_qwix_ptq_weights_match_jaxnet_up_to_its_documented_scale_convention(trained_mlp, digits):
    """Qwix's symmetric int8 maps a column's max |w| to 127.5 (so that the 127 bucket is a whole
    step wide: +max rounds to 128 and saturates to 127, -max gives -128); jaxnet maps it to 127
    (range [-127, 127], every weight within half a step). Both round half to even and give an
    all-zero column scale 1. docs/compression.md, "Against Qwix"."""
    qwix = pytest.importorskip("qwix", reason="qwix is the optional 'compress' extra")
    model, variables = trained_mlp
    params = jax.tree.map(jnp.asarray, variables["params"])
    params["layers_0"]["kernel"] = params["layers_0"]["kernel"].at[:, 5].set(0.0)  # an all-zero column

    class PlainMLP(nn.Module):  # the same network on flax.linen.Dense, the layers Qwix intercepts
        @nn.compact
        def __call__(self, x):
            return nn.Dense(10, name="layers_1")(nn.relu(nn.Dense(32, name="layers_0")(x)))

    x = digits[2].reshape(len(digits[2]), -1)
    ptq = qwix.quantize_model(PlainMLP(), qwix.PtqProvider([qwix.QuantizationRule(weight_qtype=jnp.int8)]))
    abstract = jax.eval_shape(ptq.init, jax.random.key(0), x)
    qwix_params = qwix.quantize_params(params, abstract["params"])
    ours = quantize({"params": params}, [qwix.QuantizationRule(weight_qtype=jnp.int8)])["params"]
    for layer in ("layers_0", "layers_1"):
        w = np.asarray(params[layer]["kernel"])
        theirs = qwix_params[layer]["kernel"].array
        s_qwix, q_qwix = np.asarray(theirs.scale)[0], np.asarray(theirs.qvalue)  # scale [1, N] -> [N]
        s_ours, q_ours = np.asarray(ours[layer]["scale"]), np.asarray(ours[layer]["w_q"])
        live = np.abs(w).max(0) > 0
        # The scales differ by exactly the convention: both are max|w| over the bound (to 1 ulp).
        np.testing.assert_allclose(s_qwix[live] * 127.5, s_ours[live] * 127, rtol=2 * EPS32)
        np.testing.assert_array_equal(s_qwix[~live], 1.0)
        np.testing.assert_array_equal(s_ours[~live], 1.0)
        # The int8 values: w / scale rounded to the nearest integer, each saturated to its own range
        # (Qwix's -max lands on -127.5, a tie that the float32 quotient breaks to -128 or -127).
        assert_rounds_to_nearest(q_qwix, w, s_qwix, -128, 127)
        assert_rounds_to_nearest(q_ours, w, s_ours, -127, 127)
        assert q_qwix.min() == -128 and q_ours.min() == -127
        assert_within_half_step(w, q_ours, s_ours)
        assert not np.array_equal(q_qwix, q_ours)  # the conventions do differ on a trained layer
    # Both quantised models agree with each other on the digits within their weight steps' effect.
    ref = np.asarray(PlainMLP().apply({"params": params}, x))
    theirs_out = np.asarray(jax.jit(ptq.apply)({"params": qwix_params}, x))
    ours_out = np.asarray(jax.jit(lambda v, x: apply_quantized(model, v, x))({"params": ours}, x))
    assert np.mean(np.argmax(theirs_out, -1) == np.argmax(ours_out, -1)) >= 0.98
    assert np.abs(theirs_out - ref).max() < 0.05 * np.abs(ref).max()
    assert np.abs(ours_out - ref).max() < 0.05 * np.abs(ref).max()
