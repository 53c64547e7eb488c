"""Occlusion (Zeiler & Fergus 2014) with Captum's ``Occlusion`` semantics.

    attr = occlusion(f, images, (2, 2), strides=1, baseline=0.0, target=labels)   # [B, H, W, C] -> same

A window of shape ``window`` (one size per feature dimension of ``x``) slides over each example
from the corner at index 0 in steps of ``strides``, until the whole dimension is covered (the last
window in a dimension may be cut off at the edge). For each position the window's features are
replaced by ``baseline`` and the score's drop ``f(x) - f(x_occluded)`` is credited to every
feature under the window; a feature's attribution is the average over the windows that cover it.
PAIR's ``Occlusion`` (square windows over the first two dimensions, stride 1, never cut off)
sums over those windows instead of averaging.
"""
from __future__ import annotations

import itertools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet.arguments import check_int
from jaxnet.explain.targets import check_baseline, check_input, score_fn


def _per_dim(value, ndim: int, name: str) -> tuple[int, ...]:
    """An int or a tuple of ``ndim`` ints, each >= 1, as a tuple."""
    values = (value,) * ndim if isinstance(value, (int, np.integer)) else tuple(value)
    if len(values) != ndim:
        raise ValueError(f"{name}: expected {ndim} sizes (one per feature dimension of x), got {tuple(values)}")
    return tuple(check_int(v, f"{name}[{i}]", minimum=1) for i, v in enumerate(values))


def occlusion_masks(shape: tuple[int, ...], window, strides=1) -> np.ndarray:
    """``[n_windows, *shape] float32``: 1 under each window position (Captum's order and shapes).

    Raises:
      ValueError: a window larger than ``shape``, or a stride larger than the window where the
        window does not span the dimension (features would be left uncovered).
    """
    window = _per_dim(window, len(shape), "window")
    strides = _per_dim(strides, len(shape), "strides")
    starts = []
    for d, (size, w, s) in enumerate(zip(shape, window, strides)):
        if w > size:
            raise ValueError(f"window {window} is larger than the features {tuple(shape)} in dimension {d}")
        if s > w and size > w:
            raise ValueError(f"strides {strides} exceed window {window} in dimension {d}: features would be skipped")
        starts.append(range(0, -(-(size - w) // s) * s + 1, s))  # ceil((size - w) / s) + 1 positions
    masks = []
    for corner in itertools.product(*starts):
        m = np.zeros(shape, np.float32)
        m[tuple(slice(c, c + w) for c, w in zip(corner, window))] = 1.0
        masks.append(m)
    return np.stack(masks)


def occlusion(f: Callable, x, window, *, strides=1, baseline=0.0, target=None) -> jax.Array:
    """Occlusion attributions ``[B, ...]`` like ``x``.

    Args:
      f, target: ``f(x: [B, ...]) -> [B]``, or ``[B, C]`` with ``target``.
      x: ``[B, ...]`` floating point.
      window: the occluding patch, an int (every dimension) or one size per dimension of
        ``x.shape[1:]`` (e.g. ``(2, 2, 1)`` for ``[B, H, W, C]`` images: one channel at a time).
      strides: the patch's step, an int or one per dimension (Captum's default 1).
      baseline: what occluded features become: a number, ``x.shape[1:]`` or ``x.shape``.

    The ``n_windows`` occluded copies of the batch are scored in one vectorised call together
    with ``x`` itself (memory: ``(n_windows + 1) x batch`` inputs), so a window that changes
    nothing the score reads gives exactly 0.
    """
    x = check_input(x)
    baseline = check_baseline(baseline, x)
    masks = jnp.asarray(occlusion_masks(tuple(x.shape[1:]), window, strides), x.dtype)  # (N, ...)
    masks = jnp.concatenate([jnp.zeros_like(masks[:1]), masks])  # position 0: x itself
    scores = score_fn(f, target)
    out = jax.vmap(lambda m: scores(jnp.where(m > 0, baseline, x)))(masks)  # (N + 1, B)
    drops = out[:1] - out[1:]  # (N, B)
    covered = masks[1:].sum(axis=0)  # (...): windows over each feature, >= 1
    return jnp.tensordot(drops, masks[1:], axes=([0], [0])) / covered


__all__ = ["occlusion", "occlusion_masks"]
