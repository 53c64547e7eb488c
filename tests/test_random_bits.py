"""``jaxnet.random_bits.threefry_bits`` draws ``jax.random.bits``'s uint32 bits exactly (typed and raw keys,
any shape, under jit and vmap), hands keys it does not hash to ``jax.random.bits``, and keeps the
transformer's dropout masks what they were with ``jax.random.bits``."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxnet.models.transformer import Dropout
from jaxnet.random_bits import threefry_bits

shapes = st.lists(st.integers(0, 13), min_size=0, max_size=3).map(tuple)
seeds = st.integers(0, 2**32 - 1)


@given(seed=seeds, shape=shapes, raw=st.booleans())
def test_bits_equal_jax_random_bits(seed, shape, raw):
    key = jax.random.PRNGKey(seed) if raw else jax.random.key(seed)
    expected = np.asarray(jax.random.bits(key, shape, jnp.uint32))
    got = np.asarray(jax.jit(threefry_bits, static_argnums=1)(key, shape))
    assert got.dtype == np.uint32 and got.shape == shape
    np.testing.assert_array_equal(got, expected)


@given(seed=seeds, n=st.integers(1, 5))
def test_bits_equal_under_vmap_and_for_split_keys(seed, n):
    keys = jax.random.split(jax.random.key(seed), n)
    got = jax.jit(jax.vmap(lambda k: threefry_bits(k, (3, 50))))(keys)
    expected = jax.vmap(lambda k: jax.random.bits(k, (3, 50), jnp.uint32))(keys)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_a_large_draw_equals_jax_random_bits():
    key = jax.random.fold_in(jax.random.key(7), 3)
    shape = (32 * 256 * 192 // 4,)  # a dropout mask of the LM's, 4 bytes per word
    np.testing.assert_array_equal(np.asarray(jax.jit(threefry_bits, static_argnums=1)(key, shape)),
                                  np.asarray(jax.random.bits(key, shape, jnp.uint32)))


@pytest.mark.parametrize("impl", ["rbg", "unsafe_rbg"])
def test_other_implementations_go_to_jax_random_bits(impl):
    key = jax.random.key(5, impl=impl)
    np.testing.assert_array_equal(np.asarray(threefry_bits(key, (4, 9))),
                                  np.asarray(jax.random.bits(key, (4, 9), jnp.uint32)))


def test_the_original_counters_go_to_jax_random_bits():
    """With jax_threefry_partitionable off, jax.random.bits counts differently (its draws differ): still equal."""
    key = jax.random.key(3)
    with jax.threefry_partitionable(False):
        got, expected = threefry_bits(key, (5, 7)), jax.random.bits(key, (5, 7), jnp.uint32)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    assert not np.array_equal(np.asarray(expected), np.asarray(jax.random.bits(key, (5, 7), jnp.uint32)))


@given(seed=seeds, rate=st.sampled_from([0.05, 0.1, 0.15, 0.5, 0.9]),
       shape=st.sampled_from([(4, 8, 12), (3, 5, 7), (1, 33), (2, 2, 2, 6)]))
def test_transformer_dropout_masks_are_those_of_jax_random_bits(seed, rate, shape):
    """The mask Dropout drew with ``jax.random.bits`` before ``threefry_bits``: same key, same bytes."""
    x = jnp.arange(1, 1 + np.prod(shape), dtype=jnp.float32).reshape(shape)
    key = jax.random.key(seed)
    y = Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": key})
    threshold = int(round(rate * 256))
    n = x.size
    rng = nn_rng(key)
    words = jax.random.bits(rng, (-(-n // 4),), jnp.uint32)
    bits = np.asarray(jax.lax.bitcast_convert_type(words, jnp.uint8)).reshape(-1)[:n].reshape(shape)
    kept = bits >= threshold
    np.testing.assert_array_equal(np.asarray(y) != 0, kept)
    np.testing.assert_array_equal(np.asarray(y)[kept], np.asarray(x * (256 / (256 - threshold)))[kept])


def nn_rng(key):
    """The key ``make_rng("dropout")`` returns inside ``Dropout.apply`` with ``rngs={"dropout": key}``."""
    import flax.linen as nn

    class Probe(nn.Module):
        @nn.compact
        def __call__(self):
            return self.make_rng("dropout")

    return Probe().apply({}, rngs={"dropout": key})
