"""``threefry_bits(key, shape)``: the bits ``jax.random.bits(key, shape, jnp.uint32)`` draws, hashed
by an unrolled threefry that XLA fuses into the code around it.

On the CPU, JAX lowers threefry2x32 as a ``fori_loop`` of five rounds, each writing the whole
state out to memory; the same twenty rounds written out as array operations become one fused
loop (7x faster for a dropout mask of the LM's, docs/benchmarks.md). The bits are identical:
the same counters (the flat index of each element, ``jax_threefry_partitionable``), key
schedule and rotations as ``jax._src.random.threefry2x32`` (Salmon et al., "Parallel random
numbers: as easy as 1, 2, 3", SC 2011). Keys ``jax.random.bits`` would not hash this way (another
PRNG implementation, the non-partitionable counters, 2**32 elements or more) go to
``jax.random.bits`` itself, so the result is always ``jax.random.bits``'s.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)  # Threefish's key-schedule constant


def _rotate_left(v, r: int):
    return (v << np.uint32(r)) | (v >> np.uint32(32 - r))


def _threefry_key_words(key):
    """``(k0, k1)`` uint32 scalars of a threefry key, or None when ``jax.random.bits`` would hash it
    another way."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != () or str(jax.random.key_impl(key)) != "threefry2x32":
            return None
        data = jax.random.key_data(key)
    else:  # a raw uint32[2] key, read by the default implementation
        if key.shape != (2,) or key.dtype != jnp.uint32 or jax.config.jax_default_prng_impl != "threefry2x32":
            return None
        data = key
    return data[0], data[1]


def threefry_bits(key, shape: tuple[int, ...]) -> jax.Array:
    """``jax.random.bits(key, shape, jnp.uint32)``, bit for bit; ``shape`` static.

    ``key``: a scalar typed key (``jax.random.key``) or a raw ``uint32[2]`` key.
    """
    shape = tuple(int(d) for d in shape)
    size = math.prod(shape)
    words = _threefry_key_words(key)
    if words is None or not jax.config.jax_threefry_partitionable or size >= 2**32 or size == 0:
        return jax.random.bits(key, shape, jnp.uint32)
    k0, k1 = words
    keys = (k0, k1, k0 ^ k1 ^ _PARITY)
    # Counters: the element's flat index as a uint64, high word 0 (size < 2**32), low word the index.
    x0 = jnp.broadcast_to(keys[0], shape)
    x1 = jax.lax.iota(jnp.uint32, size).reshape(shape) + keys[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = _rotate_left(x1, r) ^ x0
        x0 = x0 + keys[(i + 1) % 3]
        x1 = x1 + keys[(i + 2) % 3] + np.uint32(i + 1)
    return x0 ^ x1
