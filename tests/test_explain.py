"""jaxnet.explain: the attribution methods against closed forms, completeness of integrated
gradients on trained digits models, occlusion's Captum semantics, attention maps and rollout of
the TransformerLM, PAIR's saliency package on the same model, figures, and bad input."""
import functools
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxnet import explain, losses
from jaxnet.explain.occlusion import occlusion_masks
from jaxnet.explain.targets import score_fn
from jaxnet.models import CNN, MLP, TransformerConfig, TransformerLM

W = jnp.asarray([[1.0, -2.0], [0.5, 3.0], [0.0, 1.0], [-1.5, 0.25]])  # (4, 2): a linear 2-class model
B0 = jnp.asarray([0.3, -0.7])


def linear(x):  # [B, 4] -> [B, 2]
    return x @ W + B0


def _x(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


# --- gradients --------------------------------------------------------------------------------------

def test_saliency_of_a_linear_model_is_its_weights_jitted_and_vmapped():
    x = _x((3, 4))
    np.testing.assert_array_equal(explain.saliency(linear, x, target=1), np.broadcast_to(W[:, 1], (3, 4)))
    jitted = jax.jit(lambda a, t: explain.saliency(linear, a, target=t))(x, jnp.asarray([0, 1, 0]))
    np.testing.assert_array_equal(jitted, W.T[jnp.asarray([0, 1, 0])])  # one target per example
    # vmap over an extra leading axis: each slice is its own batch.
    stacked = jax.vmap(lambda a: explain.saliency(linear, a, target=0))(jnp.stack([x, 2 * x]))
    np.testing.assert_array_equal(stacked, np.broadcast_to(W[:, 0], (2, 3, 4)))


def test_input_x_gradient_of_a_linear_model_sums_to_f_x_minus_f_0():
    x = _x((5, 4), seed=1)
    f = score_fn(linear, 1)
    attr = explain.input_x_gradient(linear, x, target=1)
    np.testing.assert_allclose(attr.sum(axis=1), f(x) - f(jnp.zeros_like(x)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(attr, x * W[:, 1], rtol=1e-7)


def test_smoothgrad_is_deterministic_per_key_and_follows_the_noise_conventions():
    f = lambda a: jnp.sum(jnp.tanh(a) ** 2, axis=1)  # noqa: E731
    x = _x((2, 4), seed=2) * jnp.asarray([[1.0], [3.0]])  # two examples with different ranges
    key = jax.random.key(3)
    relative = jax.jit(lambda a, k: explain.smoothgrad(f, a, k, samples=4))
    a = relative(x, key)
    np.testing.assert_array_equal(a, relative(x, key))
    assert not np.allclose(a, relative(x, jax.random.key(4)))
    eps = jax.random.normal(key, (4,) + x.shape)  # the documented draws
    grads = jax.jit(jax.vmap(lambda z: explain.saliency(f, z)))
    sigma = 0.15 * (x.max(axis=1) - x.min(axis=1))[:, None]  # relative: 15% of each example's range
    np.testing.assert_allclose(a, grads(x + sigma * eps).mean(0), rtol=1e-5)
    absolute = jax.jit(lambda a, k: explain.smoothgrad(f, a, k, samples=4, noise_level=0.5, noise_kind="absolute",
                                                       squared=True))(x, key)
    np.testing.assert_allclose(absolute, (grads(x + 0.5 * eps) ** 2).mean(0), rtol=1e-5)


# --- integrated gradients ---------------------------------------------------------------------------

# Degree up to which each rule integrates alpha**k over [0, 1] exactly, at n points.
EXACT_DEGREE = {"gausslegendre": lambda n: 2 * n - 1, "riemann_left": lambda n: 0, "riemann_right": lambda n: 0,
                "riemann_middle": lambda n: 1, "riemann_trapezoid": lambda n: 1, "pair": lambda n: 1}


@pytest.mark.parametrize("method", explain.METHODS)
def test_each_rule_integrates_polynomials_up_to_its_degree_and_not_beyond(method):
    n = 4
    alphas, weights = explain.path_rule(method, n)
    assert alphas.shape == weights.shape == (n,) and np.all((alphas >= 0) & (alphas <= 1))
    degree = EXACT_DEGREE[method](n)
    for k in range(degree + 1):
        assert abs(weights @ alphas**k - 1 / (k + 1)) < 1e-12, (method, k)
    assert abs(weights @ alphas ** (degree + 1) - 1 / (degree + 2)) > 1e-6  # the next degree is not exact


@functools.cache
def _cubic_delta(steps):
    """Jitted: (attributions, delta) of a random cubic score of x: [2, 5] against a baseline."""
    def run(w, v, x, baseline):
        f = lambda a: ((a @ w) ** 3 + (a @ w)) @ v  # noqa: E731
        return explain.integrated_gradients(f, x, baseline, steps=steps, return_delta=True)
    return jax.jit(run)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_integrated_gradients_are_complete_for_cubic_scores(seed):
    """For a cubic score the path integrand is quadratic in alpha: Gauss-Legendre with >= 2 points
    integrates it exactly, so the delta is float32 rounding of the attributions' sum."""
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    w, v = jax.random.normal(k1, (5, 3)), jax.random.normal(k2, (3,))
    x, baseline = jax.random.normal(k3, (2, 5)), jax.random.normal(k4, (5,))
    attr, delta = _cubic_delta(2)(w, v, x, baseline)
    np.testing.assert_allclose(delta, 0.0, atol=1e-5 * (1 + float(jnp.abs(attr).sum())))
    # One Gauss-Legendre point (exact to degree 1) is not enough: the check can fail.
    _, rough = _cubic_delta(1)(w, v, x, baseline)
    assert np.abs(rough).max() > 1e-3 * (1 + float(jnp.abs(attr).sum()))


def test_riemann_rules_match_their_closed_form_on_a_quadratic():
    """f = sum(x**2), zero baseline: attr_i = 2 x_i**2 * sum_k w_k alpha_k, which is (n-1)/(2n) for
    the left sum, (n+1)/(2n) for the right one and 1/2 for the others."""
    x, n = _x((2, 3), seed=5), 8
    f = lambda a: jnp.sum(a**2, axis=1)  # noqa: E731
    for method, mean_alpha in [("riemann_left", (n - 1) / (2 * n)), ("riemann_right", (n + 1) / (2 * n)),
                               ("riemann_middle", 0.5), ("riemann_trapezoid", 0.5), ("pair", 0.5)]:
        attr = explain.integrated_gradients(f, x, steps=n, method=method)
        np.testing.assert_allclose(attr, 2 * x**2 * mean_alpha, rtol=1e-5, err_msg=method)


def _train(model, x, y, steps):
    """Full-batch Adam in one compiled scan: the trained parameters."""
    params = jax.jit(model.init)(jax.random.key(0), x[:1])
    tx = optax.adam(1e-2)

    @jax.jit
    def run(params):
        def step(carry, _):
            p, s = carry
            g = jax.grad(lambda q: losses.cross_entropy(model.apply(q, x), y))(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None
        return jax.lax.scan(step, (params, tx.init(params)), None, length=steps)[0][0]

    return run(params)


@pytest.fixture(scope="module")
def digits():
    from jaxnet.data.digits import digits_split

    return digits_split()  # (train, test): 1,347 / 450 images [n, 8, 8, 1] in [0, 1]


@pytest.fixture(scope="module")
def digits_mlp(digits):
    """The digits MLP (jaxnet.models.MLP, 32 hidden units), trained; its logits as a function of images."""
    train, test = digits
    model = MLP((32, 10), init_scheme="lecun")
    params = _train(model, jnp.asarray(train.x.reshape(len(train.x), -1)), jnp.asarray(train.y), 150)
    f = jax.jit(lambda a: model.apply(params, a.reshape(len(a), -1)))  # images [B, 8, 8, 1] -> [B, 10]
    return f, jnp.asarray(test.x[:150]), jnp.asarray(test.y[:150])


def _relative_delta(f, x, y, steps):
    _, delta = jax.jit(lambda a, t: explain.integrated_gradients(f, a, target=t, steps=steps, return_delta=True))(x, y)
    scores = score_fn(f, y)
    return np.abs(np.asarray(delta)), np.abs(np.asarray(scores(x) - scores(jnp.zeros_like(x))))


def test_ig_delta_is_within_1pct_for_99pct_of_digits_at_50_steps_on_a_trained_mlp_and_shrinks_with_steps(digits_mlp):
    f, x, y = digits_mlp
    assert np.mean(np.argmax(f(x), -1) == np.asarray(y)) > 0.9  # trained
    means = {}
    for steps in (10, 50, 200):
        delta, gap = _relative_delta(f, x, y, steps)
        means[steps] = delta.mean()
        if steps == 50:
            rel = delta / gap
            # A ReLU net's path gradient is piecewise constant: no rule is exact, a few inputs lag.
            assert np.quantile(rel, 0.99) <= 0.01 and np.median(rel) <= 0.002, (np.quantile(rel, 0.99), rel.max())
    assert means[10] > 2 * means[50] > 4 * means[200], means  # the delta shrinks with the step count


def test_integrated_gradients_are_complete_at_50_steps_on_a_small_trained_cnn(digits):
    """A small CNN without normalisation (docs/explain.md: with BatchNorm more digits lag at 50 steps)."""
    train, test = digits
    model = CNN(num_classes=10, features=(4,), convs_per_block=1, head=(16,), norm="none")
    params = _train(model, jnp.asarray(train.x[:400]), jnp.asarray(train.y[:400]), 80)
    f = jax.jit(lambda a: model.apply(params, a))
    x, y = jnp.asarray(test.x[:64]), jnp.asarray(test.y[:64])
    assert np.mean(np.argmax(f(x), -1) == np.asarray(y)) > 0.8  # trained
    delta, gap = _relative_delta(f, x, y, 50)
    rel = delta / gap
    assert np.median(rel) <= 0.002 and np.mean(rel <= 0.01) >= 0.95, np.sort(rel)[-5:]


# --- occlusion --------------------------------------------------------------------------------------

def test_occlusion_gives_exactly_zero_to_inputs_the_model_ignores(digits_mlp):
    f, x, y = digits_mlp
    keep = jnp.zeros((8, 8, 1)).at[:, 4:].set(1.0)  # the model reads the right half only
    g = lambda a: f(a * keep)  # noqa: E731
    attr = np.asarray(explain.occlusion(g, x[:4], (2, 2, 1), strides=2, target=y[:4]))
    assert np.all(attr[:, :, :4] == 0.0)
    assert np.count_nonzero(attr[:, :, 4:]) > attr[:, :, 4:].size // 2


def test_occlusion_averages_the_drop_over_the_windows_covering_a_feature():
    w = jnp.asarray([1.0, 2.0, 4.0, 8.0, 16.0])
    f = lambda a: a @ w  # noqa: E731
    x = jnp.ones((1, 5))
    # Window 2, stride 1: windows [0,1], [1,2], [2,3], [3,4] with drops 3, 6, 12, 24.
    np.testing.assert_allclose(explain.occlusion(f, x, 2)[0], [3, 4.5, 9, 18, 24])
    # Window 2, stride 2: starts 0, 2, 4 (ceil(3/2) + 1 windows), the last cut off at the edge;
    # occluded features become the baseline 0.25, so each drop is 0.75 of the above.
    np.testing.assert_allclose(explain.occlusion(f, x, 2, strides=2, baseline=0.25)[0],
                               0.75 * np.asarray([3, 3, 12, 12, 16]))
    assert occlusion_masks((5,), 2, 2).shape == (3, 5)


# --- attention --------------------------------------------------------------------------------------

def test_attention_weights_are_each_blocks_softmax_per_head_in_block_order():
    cfg = TransformerConfig(vocab_size=11, block_size=8, num_layers=2, num_heads=2, embed_dim=8,
                            dropout_rate=0.0, positions="learned")
    model = TransformerLM(cfg)
    ids = jax.random.randint(jax.random.key(0), (2, 6), 0, 11)
    variables = jax.jit(model.init)(jax.random.key(1), ids)
    assert set(variables) == {"params"}  # init keeps no attention maps
    params = variables["params"]
    maps = jax.jit(lambda p: explain.attention_weights(model, {"params": p}, ids))
    weights = np.asarray(maps(params))
    assert weights.shape == (2, 2, 2, 6, 6)  # (L, B, H, T, T)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(weights, k=1) == 0.0)  # causal
    p = params["trunk"]

    @jax.jit
    def by_hand(p):  # layer 0's probabilities from block0's parameters
        h = p["wte"]["embedding"][ids] + p["wpe"]["embedding"][:6]
        h = nn.LayerNorm().apply({"params": p["block0"]["ln1"]}, h)
        qkv = (h @ p["block0"]["attn"]["qkv"]["kernel"] + p["block0"]["attn"]["qkv"]["bias"]).reshape(2, 6, 3, 2, 4)
        scores = jnp.einsum("bshd,bthd->bhst", qkv[:, :, 0], qkv[:, :, 1]) / 2.0  # / sqrt(head width 4)
        return jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((6, 6), bool)), scores, -jnp.inf), axis=-1)

    np.testing.assert_allclose(weights[0], by_hand(p), rtol=1e-5, atol=1e-6)
    # Layer 1 is block1's: with its queries zeroed its maps turn uniform over the past, layer 0's stay.
    qkv1 = params["trunk"]["block1"]["attn"]["qkv"]
    zeroed = {**params, "trunk": {**p, "block1": {**p["block1"], "attn": {**p["block1"]["attn"], "qkv": {
        "kernel": qkv1["kernel"].at[:, :8].set(0), "bias": qkv1["bias"].at[:8].set(0)}}}}}
    uniform = np.asarray(maps(zeroed))
    np.testing.assert_allclose(uniform[1], np.broadcast_to(np.tril(np.ones((6, 6))) / np.arange(1, 7)[:, None],
                                                           (2, 2, 6, 6)), rtol=1e-6)
    np.testing.assert_array_equal(uniform[0], weights[0])


def test_rollout_averages_heads_adds_the_residual_and_multiplies_layers():
    t = 4
    eye = np.eye(t)
    # One layer of identity attention: the rollout is the identity.
    np.testing.assert_allclose(explain.rollout(np.broadcast_to(eye, (1, 1, 3, t, t))), eye[None], atol=1e-7)
    rng = np.random.default_rng(0)
    a = rng.random((2, 1, 2, t, t)) * np.tril(np.ones((t, t)))
    a /= a.sum(-1, keepdims=True)  # (L=2, B=1, H=2, T, T), causal rows summing to 1
    layer = (a.mean(axis=2) + eye) / 2  # (L, B, T, T)
    out = np.asarray(explain.rollout(a))
    np.testing.assert_allclose(out[0], layer[1, 0] @ layer[0, 0], rtol=1e-6)  # the later layer on the left
    np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(explain.rollout(a[:1])[0], layer[0, 0], rtol=1e-6)


# --- PAIR's saliency package on the same model -----------------------------------------------------

# float32 throughout: the same gradients, summed in another order (PAIR accumulates in NumPy).
PAIR_RTOL, PAIR_ATOL = 1e-5, 1e-6


@pytest.fixture
def pair_model(digits_mlp):
    saliency = pytest.importorskip("saliency.core", reason="PAIR's saliency package is the optional 'explain' extra")
    f, x, y = digits_mlp
    grads = jax.jit(lambda a, t: explain.saliency(f, a, target=t))

    def call_model(batch, call_model_args=None, expected_keys=None):
        t = call_model_args["target"]
        batch = jnp.asarray(batch, jnp.float32)
        out = {}
        if saliency.INPUT_OUTPUT_GRADIENTS in expected_keys:
            out[saliency.INPUT_OUTPUT_GRADIENTS] = np.asarray(grads(batch, t))
        if saliency.OUTPUT_LAYER_VALUES in expected_keys:
            out[saliency.OUTPUT_LAYER_VALUES] = np.asarray(f(batch)[:, t])
        return out

    return saliency, call_model, f, np.asarray(x[:3]), np.asarray(y[:3])


def test_pair_gradient_and_integrated_gradients_match(pair_model):
    saliency, call_model, f, x, y = pair_model
    baseline = np.full_like(x[0], 0.1)
    ig = jax.jit(lambda a, t: explain.integrated_gradients(f, a, baseline, steps=20, method="pair", target=t))
    for i in range(len(x)):
        args = {"target": int(y[i])}
        pair_grad = saliency.GradientSaliency().GetMask(x[i], call_model, args)
        np.testing.assert_allclose(explain.saliency(f, x[i:i + 1], target=y[i])[0], pair_grad,
                                   rtol=PAIR_RTOL, atol=PAIR_ATOL)
        pair_ig = saliency.IntegratedGradients().GetMask(x[i], call_model, args, x_baseline=baseline, x_steps=20,
                                                         batch_size=20)
        np.testing.assert_allclose(ig(x[i:i + 1], y[i])[0], pair_ig, rtol=PAIR_RTOL, atol=PAIR_ATOL)


def test_pair_smoothgrad_matches_with_the_same_noise_draws(pair_model, monkeypatch):
    saliency, call_model, f, x, y = pair_model
    key, samples = jax.random.key(7), 6
    for squared in (True, False):
        ours = explain.smoothgrad(f, x[:1], key, target=y[0], samples=samples, squared=squared)[0]
        eps = iter(np.asarray(jax.random.normal(key, (samples,) + x[:1].shape))[:, 0])
        # PAIR draws np.random.normal(0, stdev, shape) per sample: hand it our standard draws, so
        # equal results also mean equal sigma (PAIR's stdev_spread * (max - min)).
        monkeypatch.setattr(np.random, "normal", lambda loc, scale, size: loc + scale * next(eps))
        pair = saliency.GradientSaliency().GetSmoothedMask(x[0], call_model, {"target": int(y[0])},
                                                           stdev_spread=0.15, nsamples=samples, magnitude=squared)
        np.testing.assert_allclose(ours, pair, rtol=PAIR_RTOL, atol=PAIR_ATOL)


def test_pair_occlusion_is_ours_summed_instead_of_averaged(pair_model):
    saliency, call_model, f, x, y = pair_model
    pair = saliency.Occlusion().GetMask(x[0], call_model, {"target": int(y[0])}, size=3, value=0)
    ours = explain.occlusion(f, x[:1], (3, 3, 1), target=y[0])[0]
    covered = occlusion_masks(x.shape[1:], (3, 3, 1)).sum(0)
    # Each drop is a difference of two logits evaluated in different programs (one image for
    # PAIR, all windows at once here): a few float32 roundings of the logit, per covering window.
    atol = 8 * np.finfo(np.float32).eps * float(np.abs(f(x[:1])).max()) * covered.max()
    np.testing.assert_allclose(ours * covered, pair, rtol=PAIR_RTOL, atol=atol)


# --- figures ----------------------------------------------------------------------------------------

def test_the_figures_are_valid_pngs(tmp_path):
    pytest.importorskip("matplotlib", reason="figures need the optional 'plots' extra")
    import matplotlib.image

    from jaxnet.explain import figures

    x = np.random.default_rng(0).random((2, 8, 8, 1)).astype(np.float32)
    grid = figures.attribution_grid(x, {"a": x - 0.5, "b": -x}, tmp_path / "grid.png", labels=["0", "1"])
    maps = figures.attention_maps(np.full((2, 2, 3, 3), 1 / 3), ["a", "b", "\n"], tmp_path / "att.png",
                                          rollout=np.eye(3))
    for path in (grid, maps):
        data = pathlib.Path(path).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
        assert matplotlib.image.imread(path).shape[0] > 100


# --- bad input --------------------------------------------------------------------------------------

IG, SG, KEY = explain.integrated_gradients, explain.smoothgrad, jax.random.key(0)


@pytest.mark.parametrize("call, error, message", [
    pytest.param(lambda x: IG(linear, x, jnp.zeros((3,)), target=0), ValueError,
                 r"baseline: shape \(3,\) does not match x \(2, 4\)", id="baseline-shape"),
    pytest.param(lambda x: IG(linear, x, steps=0, target=0), ValueError, "steps must be >= 1, got 0", id="steps-0"),
    pytest.param(lambda x: IG(linear, x, steps=-3, target=0), ValueError, "steps must be >= 1", id="steps-negative"),
    pytest.param(lambda x: IG(linear, x, steps=2.5, target=0), TypeError, "steps must be an integer",
                 id="steps-float"),
    pytest.param(lambda x: IG(linear, x, steps=1, method="riemann_trapezoid", target=0), ValueError,
                 "steps must be >= 2 for riemann_trapezoid", id="trapezoid-1-step"),
    pytest.param(lambda x: IG(linear, x, method="simpson", target=0), ValueError, "method must be one of",
                 id="unknown-method"),
    pytest.param(lambda x: SG(linear, x, KEY, target=0, noise_kind="gaussian"), ValueError,
                 r"noise_kind must be one of \['relative', 'absolute'\], got 'gaussian'", id="unknown-noise-kind"),
    pytest.param(lambda x: SG(linear, x, 0, target=0), TypeError, "key: expected a JAX PRNG key", id="key-not-a-key"),
    pytest.param(lambda x: SG(linear, x, KEY, target=0, samples=0), ValueError, "samples must be >= 1",
                 id="samples-0"),
    pytest.param(lambda x: explain.saliency(linear, x), ValueError,
                 r"f must return one score per example, shape \(2,\), got \(2, 2\); .* pass target=",
                 id="f-output-without-target"),
    pytest.param(lambda x: explain.saliency(linear, x, target=2), ValueError,
                 r"target: \[2\] out of range for 2 outputs", id="target-out-of-range"),
    pytest.param(lambda x: explain.saliency(linear, x, target=jnp.asarray([0, 1, 0])), ValueError,
                 "target: 3 indices for a batch of 2", id="target-length"),
    pytest.param(lambda x: explain.saliency(linear, x.astype(jnp.int32), target=0), TypeError,
                 "x: expected a floating-point array", id="integer-x"),
    pytest.param(lambda x: explain.occlusion(linear, x, 5, target=0), ValueError,
                 r"window \(5,\) is larger than the features", id="window-too-large"),
    pytest.param(lambda x: explain.occlusion(linear, x, 2, strides=3, target=0), ValueError,
                 r"strides \(3,\) exceed window", id="stride-past-window"),
    pytest.param(lambda x: explain.occlusion(linear, x, (1, 1), target=0), ValueError, "window: expected 1 sizes",
                 id="window-rank"),
    pytest.param(lambda x: explain.rollout(jnp.ones((2, 3, 3))), ValueError,
                 r"expected \[L, B, H, T, T\] attention maps", id="rollout-shape"),
])
def test_bad_input_gets_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call(_x((2, 4)))


def test_attention_weights_of_a_model_without_attention_is_refused():
    model = MLP((3,))
    variables = model.init(jax.random.key(0), jnp.ones((1, 2)))
    with pytest.raises(ValueError, match="MLP sowed no 'attention_weights'"):
        explain.attention_weights(model, variables, jnp.ones((1, 2)))


@pytest.mark.slow  # about a minute: trains three small models and explains them
def test_the_explain_experiment_writes_its_figures_and_completeness(tmp_path, capsys):
    import json

    from experiments import explain as experiment

    argv = ["--workdir", str(tmp_path), "--epochs", "1", "--lm-steps", "3", "--ig-steps", "50", "10",
            "--smoothgrad-samples", "2", "--checkpoint-every", "0"]
    result = experiment.main(argv)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["experiment"] == "explain"
    for name in ("mlp", "cnn"):
        stats = result[name]["ig_completeness"]
        assert set(stats) == {"50", "10"} and stats["50"]["mean_abs_delta"] < stats["10"]["mean_abs_delta"]
    for path in (result["mlp"]["attributions_png"], result["cnn"]["attributions_png"], result["lm"]["attention_png"]):
        assert pathlib.Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["lm"]["rollout_rows_sum_to_1"]
