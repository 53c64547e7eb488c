"""TransformerLM and TransformerClassifier: causality, the key-value cache, initial loss, dropout,
overfitting a tiny corpus, the classifier's padding, and the experiments end to end (tiny)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from jaxnet import losses, optim
from jaxnet.models import TransformerClassifier, TransformerConfig, TransformerLM
from jaxnet.models.transformer import Dropout, count_params, generate, init_cache, rotary, rotary_tables, softmax
from jaxnet.train import TrainState
from jaxnet.train.stream import evaluate_stream, fit_stream

TINY = TransformerConfig(vocab_size=11, block_size=16, num_layers=2, num_heads=2, embed_dim=16, dropout_rate=0.0)


def _init(model, t=8, seed=0):
    ids = jnp.zeros((2, t), jnp.int32)
    return jax.jit(model.init)(jax.random.key(seed), ids)["params"]


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_changing_a_future_token_never_changes_an_earlier_output(positions):
    model = TransformerLM(TINY.replace(positions=positions))
    params = _init(model)
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
    ids = jax.random.randint(jax.random.key(1), (3, 16), 0, 11)
    base = np.asarray(apply(params, ids))
    for t in (0, 5, 15):
        changed = ids.at[:, t].set((ids[:, t] + 1) % 11)
        out = np.asarray(apply(params, changed))
        np.testing.assert_array_equal(out[:, :t], base[:, :t])  # bit-identical before t
        assert not np.allclose(out[:, t], base[:, t])  # and t itself does see its token


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_cached_decoding_equals_full_recomputation(positions):
    model = TransformerLM(TINY.replace(positions=positions))
    params = _init(model)
    prompt = jax.random.randint(jax.random.key(2), (2, 4), 0, 11)
    out = np.asarray(generate(model, params, prompt, jax.random.key(0), max_new_tokens=10, greedy=True))
    # Greedy by recomputing the whole prefix at every step, no cache. One compiled shape: the
    # sequence is padded to block_size, which (causal) cannot change the positions before it.
    full = jax.jit(lambda x: model.apply({"params": params}, x))
    seq = np.zeros((2, 16), np.int32)
    seq[:, :4] = prompt
    for t in range(4, 14):
        seq[:, t] = np.asarray(full(jnp.asarray(seq)))[:, t - 1].argmax(-1)
    np.testing.assert_array_equal(out, seq[:, :14])
    # The cache path's logits match the full forward's, prefill and one-token steps alike.
    ids = jnp.asarray(seq)
    decode = jax.jit(lambda x, c, o: model.apply({"params": params}, x, c, o, method=TransformerLM.decode))
    cache = init_cache(model.config, 2, 14)
    pre, cache = decode(ids[:, :9], cache, 0)
    step, _ = decode(ids[:, 9:10], cache, 9)
    ref = full(ids)
    np.testing.assert_allclose(pre, ref[:, :9], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(step[:, 0], ref[:, 9], rtol=1e-5, atol=1e-5)


# float32's unit roundoff: one correctly rounded operation is off by at most U relative.
U = 2.0**-24


def _rotary_float64(x, positions, base):
    """The rotation in float64 NumPy: the reference for both of rotary's paths."""
    x = np.asarray(x, np.float64)
    d = x.shape[-1]
    angles = np.asarray(positions, np.float64)[:, None] * base ** (-np.arange(d // 2) * 2.0 / d)
    cos, sin = np.cos(angles)[None, :, None, :], np.sin(angles)[None, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1), np.abs(x1) + np.abs(x2)


def test_rotary_tables_are_the_float64_angles_rounded_once():
    cos, sin = rotary_tables(128, 48, 10_000.0)
    assert cos.shape == sin.shape == (128, 24) and cos.dtype == np.float32 and not cos.flags.writeable
    angles = np.arange(128.0)[:, None] * 10_000.0 ** (-np.arange(24) * 2.0 / 48)
    # Rounding a float64 value to float32 moves it by at most U of its magnitude.
    np.testing.assert_allclose(cos, np.cos(angles), rtol=U, atol=0)
    np.testing.assert_allclose(sin, np.sin(angles), rtol=U, atol=0)
    assert rotary_tables(128, 48, 10_000.0)[0] is cos  # cached: built once per shape


@pytest.mark.parametrize("t,d", [(16, 8), (128, 48), (300, 64)])
def test_rotary_matches_float64_on_both_paths(t, d):
    x = jax.random.normal(jax.random.key(t), (2, t, 3, d), jnp.float32)
    offset = 5
    want, size = _rotary_float64(x, offset + np.arange(t), 10_000.0)
    # NumPy positions (training windows, prefill): tables rounded once (<= U each), then x1*cos,
    # x2*sin and their difference, each rounded once: |error| <= 4U (|x1| + |x2|) per element.
    host = np.asarray(rotary(x, offset + np.arange(t), 10_000.0), np.float64)
    assert np.all(np.abs(host - want) <= 4 * U * np.concatenate([size, size], -1))
    # Traced positions without a table length (the former formulation, kept for that case):
    # the angle is computed in float32 as pos * base**(-2i/D). The exponent's rounding is
    # amplified by ln(base) in the power, the power itself and the product add a few U, so the
    # angle's relative error is at most (2 ln(base) + 4) U, an absolute error of that times the
    # largest angle (the largest position); the rotation then adds the 4U above.
    traced = np.asarray(jax.jit(lambda x, p: rotary(x, p, 10_000.0))(x, offset + jnp.arange(t)), np.float64)
    angle_err = (2 * math.log(10_000.0) + 4) * U * (offset + t - 1)
    assert np.all(np.abs(traced - want) <= (angle_err + 4 * U) * np.concatenate([size, size], -1))
    # A rotation keeps each vector's length.
    np.testing.assert_allclose(np.linalg.norm(host, axis=-1), np.linalg.norm(np.asarray(x), axis=-1), rtol=1e-5)


def test_sampling_respects_top_k_and_limits():
    model = TransformerLM(TINY)
    params = _init(model)
    prompt = jnp.zeros((3, 2), jnp.int32)
    greedy = generate(model, params, prompt, jax.random.key(0), max_new_tokens=6, greedy=True)
    top1 = generate(model, params, prompt, jax.random.key(5), max_new_tokens=6, top_k=1, temperature=2.0)
    np.testing.assert_array_equal(greedy, top1)  # top-1 sampling is greedy
    assert top1.shape == (3, 8) and top1.dtype == jnp.int32
    # Rotary positions extend past block_size; a learned table does not (refused before tracing).
    learned = TransformerLM(TINY.replace(positions="learned"))
    with pytest.raises(ValueError, match="block_size"):
        generate(learned, params, prompt, jax.random.key(0), max_new_tokens=15)


def test_untrained_loss_is_log_vocab_and_param_count_matches():
    cfg = TINY.replace(vocab_size=97)
    ids = jax.random.randint(jax.random.key(3), (8, 16), 0, 97)
    for scale, low, high in ((0.0, -1e-5, 1e-5), (1.0, 0.0, 1.0)):
        model = TransformerLM(cfg.replace(final_norm_scale_init=scale))
        params = _init(model)
        assert sum(x.size for x in jax.tree.leaves(params)) == count_params(model.config)
        logits = jax.jit(model.apply)({"params": params}, ids)
        assert logits.shape == (8, 16, 97) and logits.dtype == jnp.float32
        loss = float(losses.cross_entropy(logits[:, :-1], ids[:, 1:]))
        # Zero final scale: logits exactly 0, loss exactly log V. Default: unit-variance logits,
        # loss ≈ log V + 1/2 (E[logsumexp] of V iid N(0, 1) logits).
        assert low <= loss - math.log(97) <= high, (scale, loss)


@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (4, 17), (1, 128)])
def test_softmax_values_are_jax_nn_softmax_and_its_gradient_the_float64_one(shape):
    """Same forward ops as jax.nn.softmax (bit-identical values, causal mask's finfo.min included); the
    custom derivative y * (dx - sum(y * dx)) against float64 autodiff: float32 error of a few ulps of
    the sum's terms, so 1e-6 relative to the largest gradient entry."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32) * 4
    x[..., -1] = np.finfo(np.float32).min  # a masked score, as the causal mask writes them
    g = rng.normal(size=shape).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(softmax(jnp.asarray(x))), np.asarray(jax.nn.softmax(jnp.asarray(x))))
    grad = np.asarray(jax.vjp(softmax, jnp.asarray(x))[1](jnp.asarray(g))[0])
    y = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    y /= y.sum(-1, keepdims=True)
    exact = y * (g - (y * g).sum(-1, keepdims=True))
    np.testing.assert_allclose(grad, exact, rtol=0, atol=1e-6 * np.abs(exact).max())


def test_dropout_is_keyed_unbiased_and_off_in_eval():
    drop = Dropout(0.25)
    x = jnp.ones((256, 256))
    run = jax.jit(lambda k: drop.apply({}, x, deterministic=False, rngs={"dropout": k}))
    a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert abs(float(a.mean()) - 1.0) < 0.01  # inverted dropout keeps the expectation
    assert abs(float((a == 0).mean()) - 0.25) < 0.01
    np.testing.assert_array_equal(drop.apply({}, x, deterministic=True), x)
    model = TransformerLM(TINY.replace(dropout_rate=0.3))
    params = _init(model)
    ids = jnp.ones((2, 8), jnp.int32)
    train = jax.jit(lambda k: model.apply({"params": params}, ids, train=True, rngs={"dropout": k}))
    assert not np.allclose(train(jax.random.key(0)), train(jax.random.key(1)))


def test_dropout_hashes_its_mask_once_for_the_forward_and_backward_passes():
    """XLA copies an elementwise producer into every consumer, so a mask computed elementwise from the
    hash is hashed again in the backward pass's fusion (2 here before the packed byte); the packed
    byte is a reduction, written once."""
    import re

    drop = Dropout(0.15)

    def loss(x, w, v, key):
        y = x + drop.apply({}, x @ w, deterministic=False, rngs={"dropout": key})
        return jnp.sum(jnp.tanh(y @ v))

    x, w = jnp.ones((64, 32)), jnp.ones((32, 32))
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, w, w, jax.random.key(0)).compile().as_text()
    bodies = re.findall(r"^%\S+ \((.*?)^}", text, re.M | re.S)
    hashing = [b for b in bodies if b.count(" xor(") >= 10]  # threefry: 20 rounds of add, rotate, xor
    assert len(hashing) == 1, f"the mask is hashed in {len(hashing)} computations"


def test_config_checks():
    with pytest.raises(ValueError, match="divisible"):
        TransformerConfig(embed_dim=10, num_heads=3)
    with pytest.raises(ValueError, match="positions"):
        TransformerConfig(positions="sinusoidal")
    with pytest.raises(ValueError, match="dropout"):
        TransformerConfig(dropout_rate=1.0)
    with pytest.raises(TypeError, match="attention_dropout_rate must be a number"):
        TransformerConfig(attention_dropout_rate="0.1")
    model = TransformerLM(TINY)
    with pytest.raises(ValueError, match="block_size"):
        model.init(jax.random.key(0), jnp.zeros((1, 17), jnp.int32))


def test_a_tiny_model_overfits_a_tiny_corpus():
    corpus = np.tile(np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 3, 5, 7], np.int32), 20)  # period 13
    model = TransformerLM(TINY.replace(num_layers=1))
    tx = optim.make_optimizer(optim.OptimizerConfig(name="adamw", learning_rate=1e-2))
    state = TrainState.create(model=model, tx=tx, sample_x=jnp.zeros((1, 16), jnp.int32), seed=0)
    assert evaluate_stream(state, corpus, block_size=16) > 2.0  # about log(11) untrained
    run = fit_stream(state, corpus, steps=150, batch_size=16, block_size=16, log_every=50, progress=False)
    # Once a window has seen the period, the sequence is deterministic: the loss goes to ~0.
    nll = evaluate_stream(run.state, corpus, block_size=16, stride=4)
    assert nll < 0.1, nll
    assert run.tokens == 150 * 16 * 16


def test_fit_stream_returns_the_final_evaluation_per_token():
    """The per-token scores of the held-out tokens by the final state come back (studies read them
    instead of scoring the text again); their mean is the last record's val_loss."""
    from jaxnet.train.stream import token_log_probs

    tokens = np.tile(np.arange(1, 11, dtype=np.int32), 12)
    model = TransformerLM(TINY.replace(num_layers=1))
    state = TrainState.create(model=model, tx=optim.make_optimizer(optim.OptimizerConfig()),
                              sample_x=jnp.zeros((1, 16), jnp.int32), seed=0)
    run = fit_stream(state, tokens, steps=3, batch_size=2, block_size=16, log_every=3, eval_every=100,
                     val_tokens=tokens[:50], eval_stride=8, progress=False)
    want = token_log_probs(run.state, tokens[:50], block_size=16, stride=8)
    np.testing.assert_array_equal(run.val_log_probs, want)
    assert run.history[-1]["val_loss"] == -want.mean()
    assert fit_stream(run.state, tokens, steps=3, batch_size=2, block_size=16, log_every=3,
                      progress=False).val_log_probs is None  # nothing evaluated


@pytest.mark.parametrize("n,stride", [(40, 4), (37, 16), (16, 3), (2, 1)])
def test_token_log_probs_score_each_target_once_in_order_with_its_context(n, stride):
    """Entry j is the model's log-probability of ``tokens[j + 1]`` after a context of at least
    ``block_size - stride`` tokens ending at ``tokens[j]`` (or every token before it, near the
    start). Checked against the model run on a window starting at each position: a causal model's
    prediction at a position depends on nothing after it, so that window's position j - start is
    the prediction from context ``tokens[start:j + 1]``."""
    from jaxnet.train.stream import token_log_probs

    block = 16
    model = TransformerLM(TINY.replace(num_layers=1, block_size=block))
    state = TrainState.create(model=model, tx=optim.make_optimizer(optim.OptimizerConfig()),
                              sample_x=jnp.zeros((1, block), jnp.int32), seed=3)
    tokens = np.random.default_rng(n).integers(0, TINY.vocab_size, n).astype(np.int32)
    got = token_log_probs(state, tokens, block_size=block, stride=stride, batch_size=2)
    assert got.shape == (n - 1,) and got.dtype == np.float64
    padded = np.concatenate([tokens, np.zeros(block, np.int32)])
    windows = np.stack([padded[s:s + block] for s in range(n)])  # (n, block): one starting at each token
    log_p = np.asarray(jax.nn.log_softmax(model.apply({"params": state.params}, jnp.asarray(windows), train=False)))
    for j in range(n - 1):
        starts = [s for s in range(max(0, j + 1 - block), j + 1) if j - s >= block - stride or s == 0]
        want = [log_p[s, j - s, tokens[j + 1]] for s in starts]
        assert np.isclose(want, got[j], rtol=2e-5, atol=2e-6).any(), (j, got[j], want)
    assert evaluate_stream(state, tokens, block_size=16, stride=stride, batch_size=2) == pytest.approx(-got.mean())


def _scheduled_state() -> TrainState:
    """A 1-layer LM whose optimiser ends in a ``clock_schedule`` (warm-up 2, cosine to 0.1)."""
    import optax

    from jaxnet.train.stream import clock_schedule

    model = TransformerLM(TINY.replace(num_layers=1))
    tx = optax.chain(optim.make_optimizer(optim.OptimizerConfig(name="adamw", learning_rate=1e-2)),
                     clock_schedule(warmup_steps=2, final_fraction=0.1))
    return TrainState.create(model=model, tx=tx, sample_x=jnp.zeros((1, 16), jnp.int32), seed=0)


def test_fit_stream_with_a_time_budget_decays_the_rate_with_time_used():
    import math
    import time

    from jaxnet.train.stream import clock_factor

    seen, clock = [], []
    tokens = np.arange(200) % 11
    state = _scheduled_state()

    def before_step(s, fraction):
        seen.append(fraction)
        clock.append(time.perf_counter())
        return s

    budget = 2.0
    run = fit_stream(state, tokens, steps=10**6, batch_size=4, block_size=16, log_every=1000,
                     budget_s=budget, before_step=before_step, progress=False)
    assert run.stopped_by_time and 0 < int(run.state.step) < 10**6
    assert seen == sorted(seen) and seen[0] < 1e-3 and seen[-1] <= 1.0
    # The first step (with its compilation) is not timed; from the second on, the fraction is the
    # time used: it follows the wall clock, however long any one step takes on a loaded machine.
    elapsed = (np.array(clock[1:]) - clock[1]) / budget
    assert seen[1] < 0.01 and np.max(np.abs(np.array(seen[1:]) - seen[1] - elapsed)) < 0.02
    # It stopped because the budget was used up (not before), and the last update used the rate
    # for the last fraction: cosine to final_fraction (0.1).
    assert run.train_s >= budget
    clock_state = run.state.opt_state[-1]
    assert int(clock_state.count) == int(run.state.step) and float(clock_state.fraction) == pytest.approx(seen[-1])
    factor = float(clock_factor(clock_state.count - 1, clock_state.fraction, 2, 0.1))
    assert factor == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * seen[-1])), rel=1e-6)


def test_fit_stream_times_every_step_but_the_compiling_first():
    # log_every=1: the first record is the compiling step alone, whose throughput is still a
    # number (metrics.jsonl stays valid JSON); the training time counts the later steps only.
    import math

    run = fit_stream(_scheduled_state(), np.arange(200) % 11, steps=3, batch_size=4, block_size=16,
                     log_every=1, progress=False)
    assert [r["step"] for r in run.history] == [1, 2, 3]
    assert all(math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0 for r in run.history)
    assert 0 < run.train_s < run.wall_s


def test_fit_stream_schedule_ends_at_the_step_cap_when_it_comes_before_the_time_budget():
    """With a budget and a step count, the fraction handed to before_step is the larger of the
    two parts used: a run that reaches its steps long before its time still ends its cosine."""
    state = _scheduled_state()
    seen = []

    def before_step(s, fraction):
        seen.append(fraction)
        return s

    run = fit_stream(state, np.arange(200) % 11, steps=5, batch_size=4, block_size=16, log_every=2,
                     budget_s=10**6, before_step=before_step, progress=False)
    assert int(run.state.step) == 5 and not run.stopped_by_time
    np.testing.assert_allclose(seen, [0.0, 0.2, 0.4, 0.6, 0.8], atol=1e-6)


def test_classifier_pools_non_padding_tokens_and_ignores_trailing_padding():
    cfg = TINY.replace(vocab_size=12)
    params = _init(TransformerClassifier(cfg, num_classes=3, pad_id=0))  # pooling has no parameters
    for pooling in ("mean", "last"):
        model = TransformerClassifier(cfg, num_classes=3, pad_id=0, pooling=pooling)
        apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
        short = jnp.array([[5, 6, 7, 0, 0, 0]])
        longer = jnp.array([[5, 6, 7, 0, 0, 0, 0, 0, 0, 0]])
        out = apply(params, short)
        assert out.shape == (1, 3)
        np.testing.assert_allclose(out, apply(params, longer), rtol=1e-5, atol=1e-6)
        assert not np.allclose(out, apply(params, jnp.array([[5, 6, 8, 0, 0, 0]])))


@pytest.mark.skipif("numba" not in kernels.available_backends(), reason="numba backend not available")
def test_the_mlp_blocks_run_on_another_kernel_backend():
    model = TransformerLM(TINY)
    params = _init(model)
    ids = jax.random.randint(jax.random.key(4), (2, 8), 0, 11)
    ref = jax.jit(model.apply)({"params": params}, ids)
    out = jax.jit(TransformerLM(TINY.replace(backend="numba")).apply)({"params": params}, ids)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_remat_recomputes_blocks_and_changes_nothing_else():
    """remat=True wraps each block in jax.checkpoint (the backward recomputes it): the loss is the
    same and the gradients agree to float32 rounding of the recomputed activations."""
    import jax.numpy as jnp

    from jaxnet import losses
    from jaxnet.models import TransformerConfig, TransformerLM

    cfg = TransformerConfig(vocab_size=16, block_size=4, num_layers=1, num_heads=2, embed_dim=8)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 16, (2, 5)), jnp.int32)
    out = {}
    for remat in (False, True):
        model = TransformerLM(cfg.replace(remat=remat))
        params = model.init(jax.random.key(0), ids[:, :-1])["params"]

        def loss(p):
            logits = model.apply({"params": p}, ids[:, :-1], train=True, rngs={"dropout": jax.random.key(1)})
            return losses.cross_entropy(logits, ids[:, 1:])

        out[remat] = jax.jit(jax.value_and_grad(loss))(params)
        assert ("remat" in str(jax.make_jaxpr(jax.grad(loss))(params))) == remat  # the checkpoint primitive
    assert float(out[True][0]) == float(out[False][0])
    for a, b in zip(jax.tree.leaves(out[False][1]), jax.tree.leaves(out[True][1])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
