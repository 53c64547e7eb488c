"""The interpolated Kneser–Ney baseline: proper distributions, the unigram case by hand, more
order helps on structured text, and its limits; interpolating it with another model."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxnet.baselines.ngram import KneserNey, bits_per_token, interpolate


@pytest.mark.parametrize("order", [1, 2, 4])
def test_every_context_gets_a_distribution_that_sums_to_one(order):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 6, 400)
    lm = KneserNey.fit(ids, order=order, vocab_size=7)  # token 6 is never seen: still p > 0
    for ctx in ([], [1], [2, 3, 4], [6, 6, 6]):  # seen, unseen and empty contexts
        p = np.exp([lm.log_probs([w], context=np.array(ctx, np.int64))[0] for w in range(7)])
        assert np.all(p > 0)
        assert abs(p.sum() - 1.0) < 1e-9


def test_order_one_is_a_discounted_unigram_by_hand():
    ids = np.array([0, 0, 0, 1])
    lm = KneserNey.fit(ids, order=1, vocab_size=3)
    d = lm.tables[0].discount  # n1 = 1 (token 1), n2 = 0: D = n1 / (n1 + 2 n2) = 1
    assert d == 1.0
    # p(w) = (max(c(w) - D, 0) + D * N1+(•) * 1/V) / c(•), N1+(•) = 2 seen types, c(•) = 4.
    expect = [(3 - d + d * 2 / 3) / 4, (1 - d + d * 2 / 3) / 4, (d * 2 / 3) / 4]
    np.testing.assert_allclose(np.exp(lm.log_probs([0, 1, 2])), expect, rtol=1e-12)


def test_higher_orders_win_on_repetitive_text_and_context_carries_over():
    text = np.tile(np.arange(8), 50)
    held_out = np.tile(np.arange(8), 5)
    bits = [bits_per_token(KneserNey.fit(text, order=k, vocab_size=8), held_out, context=text) for k in (1, 2, 3)]
    assert bits[0] > 2.9 and bits[1] < 0.05 and bits[2] < 0.05  # uniform unigram: 3 bits
    lm = KneserNey.fit(text, order=3, vocab_size=8)
    # With the training tail as context, even the first held-out token is predicted well.
    assert lm.log_probs(held_out[:1], context=text)[0] > lm.log_probs(held_out[:1])[0]


def test_refuses_keys_that_overflow_and_bad_ids():
    with pytest.raises(ValueError, match="int64"):
        KneserNey.fit(np.zeros(10, np.int64), order=10, vocab_size=105)
    with pytest.raises(ValueError, match="ids must be"):
        KneserNey.fit(np.array([0, 5]), order=2, vocab_size=5)
    with pytest.raises(ValueError, match="order"):
        KneserNey.fit(np.array([0, 1]), order=0, vocab_size=5)
    assert math.isfinite(KneserNey.fit(np.array([0, 1, 2]), order=3, vocab_size=3).cross_entropy([2, 1]))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.0, 1.0), st.integers(2, 12))
def test_interpolating_two_models_gives_a_distribution_between_them(seed, weight, vocab):
    """Full distributions over a vocabulary, mixed entry by entry: the mixture sums to 1, weight 0
    and 1 give each model back, and every entry lies between the two models' (it is their convex
    combination, computed in logs)."""
    rng = np.random.default_rng(seed)
    log_p, log_q = (np.log(rng.dirichlet(np.ones(vocab))) for _ in range(2))
    mixed = interpolate(log_p, log_q, weight)
    assert math.isclose(np.exp(mixed).sum(), 1.0, rel_tol=1e-12)
    np.testing.assert_allclose(np.exp(mixed), (1 - weight) * np.exp(log_p) + weight * np.exp(log_q), rtol=1e-12)
    np.testing.assert_array_equal(interpolate(log_p, log_q, 0.0), log_p)
    np.testing.assert_array_equal(interpolate(log_p, log_q, 1.0), log_q)
    assert np.all(mixed >= np.minimum(log_p, log_q) - 1e-12) and np.all(mixed <= np.maximum(log_p, log_q) + 1e-12)


def test_interpolate_names_bad_input():
    with pytest.raises(ValueError, match="weight must be in \\[0, 1\\], got 1.5"):
        interpolate(np.zeros(3), np.zeros(3), 1.5)
    with pytest.raises(ValueError, match="different tokens: shapes \\(3,\\) and \\(4,\\)"):
        interpolate(np.zeros(3), np.zeros(4), 0.5)
