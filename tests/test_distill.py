"""jaxnet.compress.distill: the Hinton loss (its T=1 one-hot limit, its T^2 scaling), the frozen
teacher beside the student in ``fit``, and the distill / compress experiments on tiny settings."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnet import losses
from jaxnet.compress import DistillLoss, WithTeacher, distill_state, student_variables
from jaxnet.models import MLP
from jaxnet.train import fit


def _log_softmax(z):  # float64 reference
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _case(shape, classes, seed):
    rng = np.random.default_rng(seed)
    student = rng.normal(0, 3, (*shape, classes)).astype(np.float32)
    labels = rng.integers(0, classes, shape)
    return student, labels


@pytest.mark.parametrize("shape, classes", [((5,), 3), ((2, 7), 11)])  # digits-like [B, C] and LM-like [B, T, V]
def test_at_temperature_1_a_one_hot_teacher_gives_cross_entropy(shape, classes):
    student, labels = _case(shape, classes, seed=classes)
    # Logits -1e4 away from the label: softmax is exactly one-hot in float32.
    one_hot_teacher = np.where(np.arange(classes) == labels[..., None], 0.0, -1e4).astype(np.float32)
    ce = losses.cross_entropy(student, labels)
    np.testing.assert_allclose(losses.distillation(student, one_hot_teacher, temperature=1.0), ce, rtol=1e-6)
    for alpha in (0.0, 0.3, 1.0):
        got = DistillLoss(temperature=1.0, alpha=alpha)((jnp.asarray(student), jnp.asarray(one_hot_teacher)), labels)
        np.testing.assert_allclose(got, ce, rtol=1e-6)


@pytest.mark.parametrize("temperature, alpha", [(0.5, 0.9), (2.0, 0.5), (4.0, 1.0)])
def test_the_loss_is_the_documented_t_squared_mixture(temperature, alpha):
    student, labels = _case((6,), 5, seed=1)
    teacher = np.random.default_rng(2).normal(0, 3, student.shape).astype(np.float32)
    log_p, log_q = _log_softmax(teacher / temperature), _log_softmax(student / temperature)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)  # (B,)
    ce = -np.take_along_axis(_log_softmax(student), labels[:, None], -1)[:, 0]
    expect = np.mean(alpha * temperature**2 * kl + (1 - alpha) * ce)
    got = DistillLoss(temperature=temperature, alpha=alpha)((jnp.asarray(student), jnp.asarray(teacher)), labels)
    np.testing.assert_allclose(got, expect, rtol=2e-5)
    # Evaluation (the student's logits alone) is the labels' cross-entropy.
    np.testing.assert_allclose(DistillLoss(temperature, alpha)(jnp.asarray(student), labels), np.mean(ce), rtol=2e-5)


@pytest.mark.parametrize("kwargs, message", [({"temperature": 0.0}, "temperature must be > 0"),
                                             ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
                                             ({"temperature": float("nan")}, "temperature must be finite")])
def test_bad_loss_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistillLoss(**kwargs)


def _softmax_rows(rng, shape, causal=False):  # float64 attention-like probabilities [..., S, L]
    z = rng.normal(0, 2, shape)
    if causal:
        z = np.where(np.tril(np.ones(shape[-2:], bool)), z, -np.inf)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_attention_transfer_is_the_heads_mean_kl_per_query():
    rng = np.random.default_rng(3)
    t, s = _softmax_rows(rng, (2, 4, 6, 6), causal=True), _softmax_rows(rng, (2, 4, 6, 6), causal=True)
    with np.errstate(divide="ignore", invalid="ignore"):  # 0 * log 0 above the diagonal: 0
        kl = np.nansum(t * (np.log(t) - np.log(s)), axis=-1)  # (B, H, S)
    got = losses.attention_transfer(s.astype(np.float32), t.astype(np.float32), reduction="none")
    assert got.shape == (2, 6)  # one example per query
    np.testing.assert_allclose(got, kl.mean(1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(losses.attention_transfer(s, t), kl.mean(), rtol=1e-4)
    assert float(losses.attention_transfer(t, t)) == pytest.approx(0.0, abs=1e-6)
    # A key the teacher weighs where the student's softmax underflowed to 0: large, finite.
    s0 = s.copy()
    s0[..., 1, 0], s0[..., 1, 1] = 0.0, 1.0
    assert np.isfinite(float(losses.attention_transfer(s0.astype(np.float32), t.astype(np.float32))))
    with pytest.raises(ValueError, match="same shape"):
        losses.attention_transfer(s[:, :2], t)


def test_the_attention_term_adds_the_layers_mean_and_needs_the_maps():
    student, labels = _case((2, 6), 5, seed=4)
    teacher = np.random.default_rng(5).normal(0, 3, student.shape).astype(np.float32)
    rng = np.random.default_rng(6)
    s_maps, t_maps = (_softmax_rows(rng, (3, 2, 4, 6, 6), causal=True).astype(np.float32) for _ in range(2))
    plain = DistillLoss(2.0, 0.7)((jnp.asarray(student), jnp.asarray(teacher)), labels)
    got = DistillLoss(2.0, 0.7, attention_weight=0.5)(tuple(map(jnp.asarray, (student, teacher, s_maps, t_maps))),
                                                      labels)
    layers = np.mean([losses.attention_transfer(s, t) for s, t in zip(s_maps, t_maps)])
    np.testing.assert_allclose(got, plain + 0.5 * layers, rtol=1e-5)
    with pytest.raises(ValueError, match="WithTeacher\\(attention=True\\)"):
        DistillLoss(2.0, 0.7, attention_weight=0.5)((jnp.asarray(student), jnp.asarray(teacher)), labels)
    with pytest.raises(ValueError, match="attention_weight must be finite and >= 0"):
        DistillLoss(attention_weight=-1.0)


def _two_transformers():
    """A 2-layer teacher 16 wide and a student 8 wide, ids ``x [3, 8]``, next tokens ``y``, the teacher's variables."""
    from jaxnet.models.transformer import TransformerConfig, TransformerLM

    cfg = TransformerConfig(vocab_size=11, block_size=8, num_layers=2, num_heads=2, dropout_rate=0.0)
    teacher, student = TransformerLM(cfg.replace(embed_dim=16)), TransformerLM(cfg.replace(embed_dim=8))
    x = np.random.default_rng(0).integers(0, 11, (3, 8)).astype(np.int32)
    y = np.roll(x, -1, axis=1)
    teacher_vars = jax.jit(teacher.init)(jax.random.key(1), x)
    return cfg, teacher, student, x, y, teacher_vars


def test_with_teacher_hands_the_loss_both_models_attention_maps_and_value_relations():
    from jaxnet import explain
    from jaxnet.studies.distill import LMConfig

    cfg, teacher, student, x, y, teacher_vars = _two_transformers()
    model = WithTeacher(student, teacher, attention=True)
    state = distill_state(model, teacher_vars, tx=optax.sgd(0.1), sample_x=x[:1], seed=0)
    # The params are the student's own tree, as without attention.
    assert jax.tree.structure(state.params) == jax.tree.structure(student.init(jax.random.key(0), x)["params"])
    rngs = {"dropout": jax.random.key(2)}
    (s, t, s_maps, t_maps), _ = model.apply(state.variables, x, train=True, rngs=rngs, mutable=["teacher"])
    # Two layers' attention, then their value relations (softmax over every position, not causal).
    assert s.shape == t.shape == (3, 8, 11) and s_maps.shape == t_maps.shape == (4, 3, 2, 8, 8)
    np.testing.assert_allclose(jnp.sum(s_maps, -1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(jnp.triu(t_maps[:2], 1), 0.0)
    upper = np.triu_indices(8, 1)
    assert float(t_maps[2:][..., upper[0], upper[1]].min()) > 0
    np.testing.assert_allclose(t_maps[:2], explain.attention_weights(teacher, teacher_vars, x), rtol=1e-6)
    # The value relations are computed only when asked for: not for the attention maps alone.
    _, sown = teacher.apply(teacher_vars, x, mutable=["intermediates"])
    assert explain.attention.VALUE_RELATION not in jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(sown)[0])
    # The student's logits are its training-mode forward on the shared params (no dropout here:
    # the wrapper draws the student's dropout keys from its own "dropout" stream).
    ref_logits = student.apply(student_variables(state), x, train=True, rngs=rngs)
    np.testing.assert_allclose(s, ref_logits, rtol=1e-5, atol=1e-6)
    # The attention term alone trains the student's params (not the teacher's).
    only_maps = DistillLoss(1.0, alpha=1.0, attention_weight=1.0)

    def attention_only(params):
        variables = {**state.variables, "params": params}
        pred, _ = model.apply(variables, x, train=True, rngs=rngs, mutable=["teacher"])
        return only_maps(pred, y) - DistillLoss(1.0, alpha=1.0)(pred[:2], y)

    grads = jax.grad(attention_only)(state.params)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    assert jax.tree.structure(grads) == jax.tree.structure(state.params)
    # Evaluation: the student's logits alone.
    np.testing.assert_allclose(model.apply(state.variables, x), student.apply(student_variables(state), x),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="layer by layer and head by head"):
        LMConfig(student=LMConfig().student.replace(num_heads=2))


def test_hidden_state_transfer_is_the_relative_squared_distance_per_position():
    rng = np.random.default_rng(8)
    s, t = rng.normal(0, 2, (2, 5, 6)), rng.normal(0, 2, (2, 5, 6))
    ref = np.sum((s - t) ** 2, -1) / np.sum(t ** 2, -1)  # (B, T): one example per position
    got = losses.hidden_state_transfer(s.astype(np.float32), t.astype(np.float32), reduction="none")
    assert got.shape == (2, 5)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    np.testing.assert_allclose(losses.hidden_state_transfer(s, t), ref.mean(), rtol=1e-5)
    assert float(losses.hidden_state_transfer(t, t)) == 0.0
    np.testing.assert_allclose(losses.hidden_state_transfer(np.zeros_like(t), t, reduction="none"), 1.0, rtol=1e-6)
    # Scale-free: both states scaled alike, the same loss.
    np.testing.assert_allclose(losses.hidden_state_transfer(1e3 * s, 1e3 * t), ref.mean(), rtol=1e-5)
    # The teacher is a fixed target; at a teacher row of zeros the plain squared distance.
    g_s, g_t = jax.grad(lambda a, b: losses.hidden_state_transfer(a, b), argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t))
    assert float(jnp.abs(g_s).max()) > 0 and float(jnp.abs(g_t).max()) == 0.0
    t0 = t.copy()
    t0[0, 0] = 0.0
    got0 = losses.hidden_state_transfer(s.astype(np.float32), t0.astype(np.float32), reduction="none")
    np.testing.assert_allclose(got0[0, 0], np.sum(s[0, 0] ** 2), rtol=1e-5)
    np.testing.assert_allclose(got0[1:], ref[1:], rtol=1e-5)
    assert np.all(np.isfinite(jax.grad(lambda a: losses.hidden_state_transfer(a, t0))(s)))
    with pytest.raises(ValueError, match="same shape"):
        losses.hidden_state_transfer(s[..., :3], t)


def test_the_hidden_term_adds_the_layers_mean_and_needs_the_states():
    student, labels = _case((2, 6), 5, seed=9)
    teacher = np.random.default_rng(10).normal(0, 3, student.shape).astype(np.float32)
    rng = np.random.default_rng(11)
    s_maps, t_maps = (_softmax_rows(rng, (4, 2, 2, 6, 6), causal=True).astype(np.float32) for _ in range(2))
    s_states, t_states = (rng.normal(0, 1, (2, 2, 6, 8)).astype(np.float32) for _ in range(2))
    plain = DistillLoss(2.0, 0.7)((jnp.asarray(student), jnp.asarray(teacher)), labels)
    layers = np.mean([losses.hidden_state_transfer(s, t) for s, t in zip(s_states, t_states)])
    got = DistillLoss(2.0, 0.7, hidden_weight=0.3)(
        tuple(map(jnp.asarray, (student, teacher, s_states, t_states))), labels)
    np.testing.assert_allclose(got, plain + 0.3 * layers, rtol=1e-5)
    maps = np.mean([losses.attention_transfer(s, t) for s, t in zip(s_maps, t_maps)])
    both = DistillLoss(2.0, 0.7, attention_weight=0.5, hidden_weight=0.3)(
        tuple(map(jnp.asarray, (student, teacher, s_maps, t_maps, s_states, t_states))), labels)
    np.testing.assert_allclose(both, plain + 0.5 * maps + 0.3 * layers, rtol=1e-5)
    missing = r"student_states, teacher_states\): WithTeacher\(attention=True, hidden=True\)"
    with pytest.raises(ValueError, match=missing):
        DistillLoss(2.0, 0.7, attention_weight=0.5, hidden_weight=0.3)(
            tuple(map(jnp.asarray, (student, teacher, s_maps, t_maps))), labels)
    with pytest.raises(ValueError, match="hidden_weight must be finite and >= 0"):
        DistillLoss(hidden_weight=-0.5)


def test_with_teacher_hands_the_loss_each_blocks_output_the_students_projected():
    from jaxnet.compress import HIDDEN_PROJECTION
    from jaxnet.models.transformer import TransformerLM
    from jaxnet.studies.distill import LMConfig

    cfg, teacher, student, x, y, teacher_vars = _two_transformers()
    model = WithTeacher(student, teacher, hidden=True)
    state = distill_state(model, teacher_vars, tx=optax.sgd(0.1), sample_x=x[:1], seed=0)
    # The params: the student's own tree plus the projection [L, C_s, C_t], which student_variables drops.
    assert state.params[HIDDEN_PROJECTION].shape == (2, 8, 16)
    own = student_variables(state)
    assert jax.tree.structure(own["params"]) == jax.tree.structure(student.init(jax.random.key(0), x)["params"])
    (s, t, s_states, t_states), _ = model.apply(state.variables, x, train=True, mutable=["teacher"])
    assert s.shape == t.shape == (3, 8, 11) and s_states.shape == t_states.shape == (2, 3, 8, 16)

    # Teacher state l is block l's output: the first l + 1 blocks, then the final norm and the tied
    # readout, give the logits of the model cut after block l.
    def readout(model_cfg, params, h):
        mean, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
        ln = params["trunk"]["ln_f"]
        z = (h - mean) / np.sqrt(var + 1e-6) * ln["scale"] + ln["bias"]
        return z @ params["trunk"]["wte"]["embedding"].T / np.sqrt(model_cfg.embed_dim)

    tp = teacher_vars["params"]
    for layer in range(2):
        cut = TransformerLM(teacher.config.replace(num_layers=layer + 1))
        cut_params = {"trunk": {k: v for k, v in tp["trunk"].items() if k != "block1" or layer == 1}}
        np.testing.assert_allclose(readout(teacher.config, tp, np.asarray(t_states[layer], np.float64)),
                                   cut.apply({"params": cut_params}, x), rtol=2e-4, atol=2e-4)
    # The student's: its own block outputs through the learned projection.
    from jaxnet.explain.attention import output_and_attention

    _, _, raw = output_and_attention(student, own, x, hidden_states=True, train=True)
    np.testing.assert_allclose(s_states, jnp.einsum("lbtc,lcd->lbtd", raw, state.params[HIDDEN_PROJECTION]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(readout(student.config, own["params"], np.asarray(raw[-1], np.float64)), s,
                               rtol=2e-4, atol=2e-4)

    # The hidden term alone trains the projection and the student's own params.
    def hidden_only(params):
        pred, _ = model.apply({**state.variables, "params": params}, x, train=True, mutable=["teacher"])
        return DistillLoss(1.0, alpha=0.0, hidden_weight=1.0)(pred, y) - losses.cross_entropy(pred[0], y)

    grads = jax.grad(hidden_only)(state.params)
    assert float(jnp.abs(grads[HIDDEN_PROJECTION]).max()) > 0
    assert float(jnp.abs(grads["trunk"]["block0"]["mlp"]["fc"]["kernel"]).max()) > 0
    # Evaluation: the student alone, on its own variables.
    np.testing.assert_allclose(model.apply(state.variables, x), student.apply(own, x), rtol=1e-6)
    with pytest.raises(ValueError, match="layer by layer"):
        WithTeacher(TransformerLM(cfg.replace(num_layers=1, embed_dim=8)), teacher, hidden=True).init(
            jax.random.key(0), x)
    with pytest.raises(ValueError, match="must be a jaxnet transformer"):
        WithTeacher(MLP((4, 3)), MLP((8, 3)), hidden=True).init(jax.random.key(0), np.ones((2, 5), np.float32))
    with pytest.raises(ValueError, match="lm.hidden_weight must be >= 0"):
        LMConfig(hidden_weight=-1.0)
    with pytest.raises(ValueError, match="lm.hidden_weight > 0 compares the blocks' outputs"):
        LMConfig(attention_weight=0.0, student=LMConfig().student.replace(num_layers=1))


def _pair(x):
    teacher, student = MLP((16, 3)), MLP((4, 3))
    teacher_vars = jax.jit(teacher.init)(jax.random.key(7), x)  # one compilation, not one per op
    return WithTeacher(student, teacher), student, teacher_vars


def test_the_teacher_is_frozen_and_the_student_trains():
    x = np.random.default_rng(0).normal(size=(32, 5)).astype(np.float32)
    y = np.arange(32) % 3
    model, student, teacher_vars = _pair(x)
    state = distill_state(model, teacher_vars, tx=optax.adam(1e-2), sample_x=x[:1], seed=0)
    # The params are the student's own tree: the teacher is not among what the optimiser updates.
    assert jax.tree.structure(state.params) == jax.tree.structure(student.init(jax.random.key(0), x)["params"])

    # No gradient reaches the teacher's variables, even when asked for directly.
    def loss_of(teacher_vars):
        variables = {**state.variables, "teacher": {"variables": teacher_vars}}
        pred, _ = model.apply(variables, x, train=True, mutable=["teacher"])
        return DistillLoss(2.0, 0.5)(pred, y)

    grads = jax.jit(jax.grad(loss_of))(teacher_vars)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))

    before = jax.tree.map(np.array, (state.params, teacher_vars))
    out = fit(state, (x, y), loss_fn=DistillLoss(2.0, 0.5), target_kind="labels", epochs=2, batch_size=None,
              progress=False)
    after_teacher = out.state.model_state["teacher"]["variables"]
    jax.tree.map(np.testing.assert_array_equal, after_teacher, before[1])
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(out.state.params), jax.tree.leaves(before[0])))
    # The caller's teacher arrays survive fit's donation, and the trained student runs on its own.
    jax.tree.map(np.testing.assert_array_equal, teacher_vars, before[1])
    logits = student.apply(student_variables(out.state), x)
    np.testing.assert_array_equal(logits, out.state.model.apply(out.state.variables, x))


def test_training_mode_hands_the_loss_both_logits_and_evaluation_the_student_alone():
    x = np.ones((2, 5), np.float32)
    model, student, teacher_vars = _pair(x)
    state = distill_state(model, teacher_vars, tx=optax.sgd(0.1), sample_x=x[:1])
    (s, t), _ = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["teacher"]))(state.variables)
    np.testing.assert_allclose(t, jax.jit(model.teacher.apply)(teacher_vars, x), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(model.apply)(state.variables, x), s, rtol=1e-6)


def test_digits_tuning_run_scores_held_out_training_digits_and_bad_fractions_are_refused(monkeypatch):
    from jaxnet.data import digits
    from jaxnet.studies.distill import DigitsConfig, digits_data

    with pytest.raises(ValueError, match="tune_fraction must be in"):
        DigitsConfig(tune_fraction=1.0)
    with pytest.raises(ValueError, match="tune_fraction must be in"):
        DigitsConfig(tune_fraction=-0.1)
    train, _ = digits.digits_split()

    class Unread:  # the test digits: a tuning run must not touch them
        def __getattr__(self, name):
            raise AssertionError(f"a tuning run read the test digits' {name!r}")

    monkeypatch.setattr(digits, "digits_split", lambda: (train, Unread()))
    fit_on, scored = digits_data(DigitsConfig(tune_fraction=0.2))  # what run_digits trains on and scores
    assert len(scored.y) == math.ceil(0.2 * len(train.y)) and len(fit_on.y) + len(scored.y) == len(train.y)
    rows = {row.tobytes() for row in train.x}
    assert all(row.tobytes() in rows for row in scored.x)  # training digits, every one
    assert set(np.unique(scored.y)) == set(np.unique(train.y))  # stratified: every class held out
    assert isinstance(digits_data(DigitsConfig())[1], Unread)  # the default scores the test digits


def test_lm_tuning_run_scores_the_end_of_the_training_text_and_never_reads_the_held_out(monkeypatch):
    import dataclasses

    from jaxnet.data import text
    from jaxnet.studies.distill import LMConfig, lm_corpus

    with pytest.raises(ValueError, match="lm.tune_fraction must be in"):
        LMConfig(tune_fraction=1.0)

    class Unread:  # the held-out text: a tuning run must not touch it
        def __getattr__(self, name):
            raise AssertionError(f"a tuning run read the held-out text's {name!r}")

    real = text.pydoc_corpus(0.1)
    monkeypatch.setattr(text, "pydoc_corpus", lambda f: dataclasses.replace(real, val=Unread()))
    tuning = lm_corpus(LMConfig(tune_fraction=0.1))  # what run_lm trains on and scores
    cut = len(real.train) - round(0.1 * len(real.train))
    np.testing.assert_array_equal(tuning.train, real.train[:cut])
    np.testing.assert_array_equal(tuning.val, real.train[cut:])
    assert tuning.test is None and "tuning split" in tuning.name
    assert isinstance(lm_corpus(LMConfig()).val, Unread)  # the default scores the held-out text


def test_teacher_variables_of_another_model_are_refused_naming_the_array():
    x = np.ones((2, 5), np.float32)
    model, _, teacher_vars = _pair(x)
    wrong = jax.jit(MLP((8, 3)).init)(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"teacher_variables\['params'\]\['layers_0'\]\['bias'\] is float32\[8\]; "
                                         r"MLP has float32\[16\]"):
        distill_state(model, wrong, tx=optax.sgd(0.1), sample_x=x[:1])
    with pytest.raises(ValueError, match="1 arrays for its 4, first differing"):
        distill_state(model, {"params": {"layers_0": {"bias": teacher_vars["params"]["layers_0"]["bias"]}}},
                      tx=optax.sgd(0.1), sample_x=x[:1])
    with pytest.raises(TypeError, match="model must be a WithTeacher"):
        distill_state(MLP((3,)), teacher_vars, tx=optax.sgd(0.1), sample_x=x[:1])


def test_an_ensemble_teaches_its_members_mean_logits():
    from jaxnet.compress import Ensemble, ensemble_variables
    from jaxnet.models import CNN
    from jaxnet.studies.distill import DigitsConfig

    x = np.random.default_rng(0).normal(size=(6, 8, 8, 1)).astype(np.float32)
    member = CNN(num_classes=3, features=(2,), head=(4,), dropout_rate=0.5)  # BatchNorm and dropout: train matters
    members = [jax.jit(member.init)(jax.random.key(seed), x) for seed in range(3)]
    own = [np.asarray(jax.jit(member.apply)(v, x), np.float64) for v in members]
    assert min(np.abs(own[0] - o).max() for o in own[1:]) > 1e-3  # the members differ
    ensemble, variables = Ensemble(tuple(member.clone() for _ in members)), ensemble_variables(members)
    assert sorted(variables) == ["batch_stats", "params"] and sorted(variables["params"]) == [
        "members_0", "members_1", "members_2"]
    np.testing.assert_allclose(jax.jit(ensemble.apply)(variables, x), np.mean(own, 0), rtol=1e-6, atol=1e-6)

    # As a teacher: WithTeacher hands the loss the ensemble's mean logits, in evaluation mode.
    model = WithTeacher(CNN(num_classes=3, features=(), head=(5,)), ensemble)
    state = distill_state(model, variables, tx=optax.sgd(0.1), sample_x=x[:1])
    (_, t), _ = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["teacher"]))(state.variables)
    np.testing.assert_allclose(t, np.mean(own, 0), rtol=1e-6, atol=1e-6)

    with pytest.raises(ValueError, match="no members' variables"):
        ensemble_variables([])
    with pytest.raises(ValueError, match=r"member 1 has collections \['params'\], "
                                         r"member 0 \['batch_stats', 'params'\]"):
        ensemble_variables([members[0], {"params": members[1]["params"]}])
    with pytest.raises(ValueError, match="at least one model"):
        Ensemble(()).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="appears more than once"):  # else all would run on members_0
        Ensemble((member,) * 2).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="logits must have one shape"):
        Ensemble((CNN(num_classes=3, features=()), CNN(num_classes=4, features=()))).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="digits.teachers must be >= 1, got 0"):
        DigitsConfig(teachers=0)
    with pytest.raises(TypeError, match="digits.teachers must be an integer, got 1.5"):
        DigitsConfig(teachers=1.5)


def test_the_teachers_logits_computed_once_train_the_student_that_withteacher_trains():
    from jaxnet.compress import Ensemble, WithTeacherLogits, ensemble_variables, teacher_logits, with_logits
    from jaxnet.models import CNN
    from jaxnet.train import TrainState

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 8, 8, 1)).astype(np.float32), rng.integers(0, 3, 50)
    member = CNN(num_classes=3, features=(2,), head=(4,), dropout_rate=0.5)  # BatchNorm and dropout: train matters
    members = [jax.jit(member.init)(jax.random.key(seed), x[:2]) for seed in range(2)]
    teacher, variables = Ensemble(tuple(member.clone() for _ in members)), ensemble_variables(members)
    logits = teacher_logits(teacher, variables, x, batch_size=16)  # 50 = 3 x 16 + 2: the last batch padded
    np.testing.assert_allclose(logits, jax.jit(teacher.apply)(variables, x), rtol=1e-6, atol=1e-6)
    packed = with_logits(x, logits)
    assert packed.shape == (50, 64 + 3) and packed.dtype == np.float32

    student = CNN(num_classes=3, features=(), head=(5,), dropout_rate=0.3)
    live = distill_state(WithTeacher(student, teacher), variables, tx=optax.adam(1e-2), sample_x=x[:1], seed=3)
    model = WithTeacherLogits(student, x.shape[1:])
    stored = TrainState.create(model=model, tx=optax.adam(1e-2), sample_x=packed[:1], seed=3)
    jax.tree.map(np.testing.assert_array_equal, stored.variables, student_variables(live))  # the same student
    s, t = jax.jit(lambda v, xp: model.apply(v, xp, train=True, rngs={"dropout": jax.random.key(1)}))(
        stored.variables, packed)
    np.testing.assert_array_equal(t, logits)
    assert s.shape == (50, 3)

    # The same updates: the two runs differ only in the teacher logits' rounding (its forward
    # compiled into each step, or alone: a few float32 ulps), which moves each update about as much.
    options = dict(loss_fn=DistillLoss(2.0, 0.7), target_kind="labels", epochs=3, batch_size=16, progress=False)
    initial = jax.tree.map(np.array, stored.params)  # fit donates the state's arrays
    a = fit(live, (x, y), **options)
    b = fit(stored, (packed, y), **options)
    assert sorted(b.state.variables) == ["params"]  # nothing of the teacher in the state
    moved = max(float(np.abs(np.asarray(u) - v).max())
                for u, v in zip(jax.tree.leaves(b.state.params), jax.tree.leaves(initial)))
    assert moved > 1e-2  # the student trained
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6),
                 student_variables(b.state), student_variables(a.state))
    # Evaluation reads the student alone, on the stored inputs as on the images.
    np.testing.assert_array_equal(jax.jit(model.apply)(b.state.variables, packed),
                                  jax.jit(student.apply)(student_variables(b.state), x))


def test_stored_teacher_logits_refuse_what_does_not_fit():
    from jaxnet.compress import WithTeacherLogits, teacher_logits, with_logits
    from jaxnet.models import CNN, TransformerLM
    from jaxnet.models.transformer import TransformerConfig

    x = np.zeros((4, 2, 3, 1), np.float32)
    model = WithTeacherLogits(CNN(num_classes=3, features=(), head=(5,)), (2, 3, 1))
    with pytest.raises(ValueError, match=r"input must be \[B, 6 \+ C\].*got \(4, 6\)"):
        model.init(jax.random.key(0), x.reshape(4, 6))
    with pytest.raises(ValueError, match=r"input_shape\[1\] of \(2, -3, 1\) must be >= 1, got -3"):
        WithTeacherLogits(model.student, (2, -3, 1)).init(jax.random.key(0), x.reshape(4, 6))
    variables = model.init(jax.random.key(0), with_logits(x, np.zeros((4, 3), np.float32)))
    with pytest.raises(ValueError, match=r"stored teacher logits \(4, 4\) and the student's logits \(4, 3\)"):
        model.apply(variables, with_logits(x, np.zeros((4, 4), np.float32)), train=True)
    with pytest.raises(ValueError, match="same number of examples"):
        with_logits(x, np.zeros((5, 3), np.float32))
    with pytest.raises(ValueError, match=r"logits must be \[n, C\], got shape \(4,\)"):
        with_logits(x, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="with_logits: logits"):
        with_logits(x, np.full((4, 3), np.nan, np.float32))
    with pytest.raises(TypeError, match="with_logits: x"):
        with_logits(x.astype(np.int32), np.zeros((4, 3), np.float32))
    teacher = CNN(num_classes=3, features=(), head=(5,))
    tv = teacher.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        teacher_logits(teacher, tv, x, batch_size=0)
    with pytest.raises(ValueError, match=r"x must be \[n, ...\] with n >= 1"):
        teacher_logits(teacher, tv, x[:0])
    lm = TransformerLM(TransformerConfig(vocab_size=7, block_size=4, num_layers=1, embed_dim=8, num_heads=2))
    ids = np.zeros((2, 4), np.int32)
    with pytest.raises(ValueError, match=r"must return logits \[B, C\], got shape \(2, 4, 7\) for a batch of 2"):
        teacher_logits(lm, lm.init(jax.random.key(0), ids), ids)


def test_the_digits_study_distils_from_an_ensemble_of_teachers(tmp_path, monkeypatch):
    from jaxnet.models import CNN
    from jaxnet.studies.distill import DigitsConfig, gap_closed, run_digits

    monkeypatch.setenv("JAXNET_CACHE_DIR", "off")
    config = DigitsConfig(teacher_features=(2,), teacher_head=(4,), teacher_epochs=1, teachers=2, student_hidden=(4,),
                          student_epochs=1, transfer_shift=0, seeds=1, tune_fraction=0.2)
    d = run_digits(config, tmp_path, checkpoint_every=0)
    assert len(d["teacher_member_accuracies"]) == 2 and {"teacher/member0", "teacher/member1"} <= set(d["weights"])
    member = CNN(num_classes=10, features=(2,), head=(4,))
    shapes = jax.eval_shape(member.init, jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))["params"]
    assert d["teacher_params"] == 2 * sum(math.prod(a.shape) for a in jax.tree.leaves(shapes))  # the ensemble's
    assert d["gap_closed_nll"] == gap_closed(-d["scratch_nll"], -d["distilled_nll"], -d["teacher_nll"])


def test_gap_closed_and_the_transfer_views():
    from jaxnet.studies.distill import gap_closed, shifted_views

    assert gap_closed(0.96, 0.975, 0.99) == pytest.approx(0.5)
    assert gap_closed(-2.6, -2.2, -1.8) == pytest.approx(0.5)  # bits per character, negated
    assert gap_closed(0.99, 0.99, 0.95) is None  # a teacher worse than scratch: no gap to close
    x = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 1)
    views = shifted_views(x, 1)
    assert views.shape == (18, 3, 3, 1)
    np.testing.assert_array_equal(views[8:10], x)  # view 4 of 9: unshifted
    np.testing.assert_array_equal(views[0, 1:, 1:], x[0, :-1, :-1])  # down-right by one
    np.testing.assert_array_equal(views[0, 0], x.min())  # vacated pixels: the background


def test_compress_study_measures_every_mode_on_a_tiny_mlp():
    from jaxnet.compress import quantize
    from jaxnet.studies.compress import Config, dense_bytes, dequantized, measure, summary, table_markdown

    x = np.random.default_rng(0).normal(size=(16, 64)).astype(np.float32)
    model = MLP((32, 10))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    q = quantize(variables)
    np.testing.assert_allclose(dequantized(q)["params"]["layers_0"]["kernel"],
                               q["params"]["layers_0"]["w_q"] * q["params"]["layers_0"]["scale"])
    assert dense_bytes(variables["params"]) == 4 * (64 * 32 + 32 + 32 * 10 + 10)
    assert dense_bytes(q["params"]) == 64 * 32 + 8 * 32 + 32 * 10 + 8 * 10
    labels = np.asarray(model.apply(variables, x)).argmax(-1)

    def agreement(apply, tree):
        return float(np.mean(np.asarray(apply(tree, x)).argmax(-1) == labels))

    config = Config(repeats=1, warmup=1, min_sample_s=0.0, backend="xla", batches=(16,))
    measured = measure(model, variables, agreement, {16: x}, config)  # one shape: one compilation per mode
    assert measured["modes"]["float32"]["quality"] == 1.0 and measured["modes"]["int8"]["quality"] > 0.8
    assert measured["dense_bytes_ratio"] == pytest.approx(dense_bytes(variables["params"]) / dense_bytes(q["params"]))
    row = summary({"mlp": measured})["mlp"]
    assert row["dense_bytes_met"] is False  # 3.6x: at K = 64 and 32 the scales and biases weigh
    assert set(measured["modes"]["w8a8"]["latency_s"]) == {16} and measured["dequant_latency_s"] > 0
    free = measured["dense_free_latency_s"][16]  # the ceilings: the float model with its dense layers free
    assert measured["ceiling_vs_float32"][16] == pytest.approx(measured["modes"]["float32"]["latency_s"][16] / free)
    assert measured["ceiling_vs_dequant_batch1"] == pytest.approx(measured["dequant_latency_s"] / free)
    assert row["speed_target_reachable"] == (measured["ceiling_vs_float32"][16] >= 3.0)
    assert row["int8_vs_dequant_reachable"] == (measured["ceiling_vs_dequant_batch1"] >= 1.5)
    assert "dense layers free (ceiling)" in table_markdown({"mlp": measured}, config)


@pytest.mark.slow  # ~1-2 min on 2 busy cores: both experiments end to end, every model trained briefly
def test_distill_and_compress_experiments_end_to_end(tmp_path, monkeypatch):
    from experiments import compress, distill

    monkeypatch.setenv("JAXNET_CACHE_DIR", "off")
    tiny_lm = ["--lm.num-layers", "1", "--lm.embed-dim", "16", "--lm.num-heads", "2", "--lm.block-size", "16"]
    result = compress.main(["--digits-epochs", "1", "--lm-steps", "3", "--lm-eval-stride", "16", "--repeats", "1",
                            "--warmup", "1", "--batches", "1", "8", "--checkpoint-every", "0",
                            "--workdir", str(tmp_path / "c"), *tiny_lm])
    assert set(result) >= {"mlp", "cnn", "lm"} and (tmp_path / "c" / "table.md").exists()
    assert json.loads((tmp_path / "c" / "table.json").read_text())["lm"]["modes"]["w8a8"]["quality"] > 0
    result = distill.main(["--digits.teacher-features", "4", "--digits.teacher-head", "8", "--digits.teacher-epochs",
                           "1", "--digits.student-epochs", "1", "--digits.seeds", "1", "--digits.teachers", "2",
                           "--lm.teacher.num-layers", "1",
                           "--lm.student.num-layers", "1", "--lm.teacher.embed-dim", "16", "--lm.student.embed-dim",
                           "8", "--lm.teacher.block-size", "16", "--lm.student.block-size", "16",
                           "--lm.teacher-steps", "3", "--lm.student-steps", "2", "--lm.eval-stride", "16",
                           "--checkpoint-every", "0", "--workdir", str(tmp_path / "d")])
    assert set(result["gap_closed_target_met"]) == {"digits", "lm"}
    assert result["lm"]["distilled_bits_per_char"] > 0 and 0 <= result["digits"]["distilled_accuracy"] <= 1
    from jaxnet.studies.distill import gap_closed

    d = result["digits"]  # the gap in test cross-entropy too, against the scratch student of lower loss
    assert len(d["teacher_member_accuracies"]) == 2 and {"teacher/member0", "teacher/member1"} <= set(d["weights"])
    assert min(d[k] for k in ("teacher_nll", "scratch_nll", "scratch_plain_nll", "distilled_nll")) > 0
    want = gap_closed(-min(d["scratch_nll"], d["scratch_plain_nll"]), -d["distilled_nll"], -d["teacher_nll"])
    assert d["gap_closed_nll"] == want
    assert json.loads((tmp_path / "d" / "result.json").read_text())["digits"] == result["digits"]


@pytest.mark.parametrize("name, target, argv", [
    ("distill", "jaxnet.train.fit", ["--tasks", "digits"]),
    ("compress", "jaxnet.train.stream.fit_stream", ["--models", "lm", "--lm.embed-dim", "16"]),
])
def test_the_run_flags_reach_every_training_loop(name, target, argv, monkeypatch, tmp_path):
    import importlib

    seen = {}

    class Reached(Exception):
        pass

    def stop(*args, **kwargs):
        seen.update(kwargs)
        raise Reached

    monkeypatch.setattr(target, stop)
    monkeypatch.setenv("JAXNET_CACHE_DIR", "off")
    with pytest.raises(Reached):
        importlib.import_module(f"experiments.{name}").main(
            argv + ["--tensorboard", "--profile-steps", "1", "3", "--checkpoint-every", "7", "--resume",
                    "--mesh", "data=2,model=2", "--strategy", "fsdp+tp", "--workdir", str(tmp_path)])
    assert seen["tensorboard"] is True and seen["profile_steps"] == (1, 3)
    assert seen["checkpoint_every"] == 7 and seen["resume"] is True and seen["config"] is not None
    assert str(seen["workdir"]).startswith(str(tmp_path))
    assert str(seen["checkpoint_dir"]).startswith(str(seen["workdir"]))
    assert dict(seen["mesh"].shape) == {"data": 2, "model": 2} and seen["strategy"] == "fsdp+tp"
