"""Gradient attributions: saliency, input x gradient and SmoothGrad.

    grads = saliency(f, x, target=labels)                 # d f(x)[b, labels[b]] / d x[b], [B, ...]
    ixg = input_x_gradient(f, x, target=labels)           # x * grads
    smooth = smoothgrad(f, x, jax.random.key(0), target=labels)   # grads averaged over noisy copies

``f`` and ``target`` as in ``jaxnet.explain.targets``: ``f(x: [B, ...]) -> [B]``, or ``[B, C]``
with ``target``. Every function is a pure JAX computation: wrap it in ``jax.jit`` or ``jax.vmap``.

SmoothGrad's noise has two conventions, both offered by name:

- ``noise_kind="relative"`` (PAIR's ``saliency`` package, ``stdev_spread``; the SmoothGrad paper):
  sigma = ``noise_level`` x (max - min) of each example's values; the default 0.15 is PAIR's 15%.
- ``noise_kind="absolute"`` (Captum's ``NoiseTunnel``, ``stdevs``): sigma = ``noise_level``.

The draws are ``jax.random.normal(key, (samples, *x.shape))`` times sigma: the same key gives the
same attributions. ``squared=True`` averages squared gradients (PAIR's default ``magnitude=True``,
Captum's ``"smoothgrad_sq"``); ``False`` averages the gradients (Captum's ``"smoothgrad"``).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxnet.arguments import check_choice, check_int, check_number
from jaxnet.explain.targets import check_input, score_fn

NOISE_KINDS = ("relative", "absolute")


def _is_key(key) -> bool:
    """A typed key (``jax.random.key``) or a raw ``uint32 [2]`` one (``jax.random.PRNGKey``)."""
    dtype = getattr(key, "dtype", None)
    if dtype is None:
        return False
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) or (dtype == jnp.uint32 and key.shape == (2,))


def saliency(f: Callable, x, *, target=None) -> jax.Array:
    """The gradient of each example's score with respect to its input, ``[B, ...]`` like ``x``.

    Signed (PAIR's ``GradientSaliency``; Captum's ``Saliency(abs=False)``): take ``jnp.abs`` for
    Captum's default. For a linear score ``x @ w`` it is ``w`` for every example.
    """
    x = check_input(x)
    scores = score_fn(f, target)
    return jax.grad(lambda z: scores(z).sum())(x)


def input_x_gradient(f: Callable, x, *, target=None) -> jax.Array:
    """``x * saliency(f, x)``, ``[B, ...]`` (Captum's ``InputXGradient``). For a linear score
    ``x @ w + c`` each example's attributions sum to ``f(x) - f(0)``."""
    x = check_input(x)
    return x * saliency(f, x, target=target)


def smoothgrad(f: Callable, x, key: jax.Array, *, target=None, samples: int = 25, noise_level: float = 0.15,
               noise_kind: str = "relative", squared: bool = False) -> jax.Array:
    """SmoothGrad (Smilkov et al. 2017): ``saliency`` averaged over ``samples`` noisy copies of ``x``.

    Args:
      f, x, target: as ``saliency``; ``x: [B, ...]``.
      key: a JAX PRNG key; the noise is ``sigma * jax.random.normal(key, (samples, *x.shape))``.
      samples: noisy copies per example, >= 1 (25: PAIR's ``nsamples``; Captum's default is 5).
      noise_level, noise_kind: sigma = ``noise_level * (max(x[b]) - min(x[b]))`` per example
        ("relative", PAIR) or ``noise_level`` ("absolute", Captum); ``noise_level >= 0``.
      squared: average the squared gradients (PAIR's ``magnitude=True``) instead of the gradients.

    Returns:
      ``[B, ...]`` like ``x``.
    """
    x = check_input(x)
    samples = check_int(samples, "samples", minimum=1)
    noise_level = check_number(noise_level, "noise_level", minimum=0.0)
    check_choice(noise_kind, "noise_kind", NOISE_KINDS)
    if not _is_key(key):
        raise TypeError(f"key: expected a JAX PRNG key (jax.random.key(0)), got {type(key).__name__}")
    if noise_kind == "relative":
        flat = x.reshape(x.shape[0], -1)
        spread = (flat.max(axis=1) - flat.min(axis=1)).reshape((-1,) + (1,) * (x.ndim - 1))  # (B, 1, ...)
        sigma = noise_level * spread
    else:
        sigma = jnp.asarray(noise_level, x.dtype)
    noise = sigma * jax.random.normal(key, (samples,) + x.shape, x.dtype)  # (S, B, ...)
    grads = jax.vmap(lambda n: saliency(f, x + n, target=target))(noise)
    return jnp.mean(grads * grads if squared else grads, axis=0)


__all__ = ["NOISE_KINDS", "input_x_gradient", "saliency", "smoothgrad"]
