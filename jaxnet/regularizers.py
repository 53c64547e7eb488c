"""L1 and L2 penalties over parameter pytrees, applied to the leaves a filter selects.

Conventions (chosen so the gradients are the textbook ones):

- ``l2(params) = 0.5 * sum(w**2)``, so ``grad l2 = w`` on every selected leaf: adding
  ``λ * l2`` to a loss is exactly coupled weight decay of strength λ.
- ``l1(params) = sum(|w|)``, so ``grad l1 = sign(w)`` (0 at exactly 0).

Unselected leaves (biases, norm scales by default) contribute nothing and get a zero gradient.

A *filter* is ``filter(path, leaf) -> bool`` over the paths of ``jax.tree_util``
(``tree_flatten_with_path``). The default, ``is_weight``, selects weights and not biases:
a leaf whose last path name is "kernel" or "embedding", or any leaf with ``ndim >= 2``; 1-d and
scalar leaves (``bias``, LayerNorm ``scale``, ...) are left alone. The same rule gives the weight
decay mask in ``jaxnet.optim`` (``weight_mask``).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Filter = Callable[[tuple, Any], bool]

WEIGHT_NAMES = ("kernel", "embedding")


def _last_name(path: tuple) -> str | None:
    """The name of a path's last key (dict key, attribute or index), or None for the root."""
    if not path:
        return None
    key = path[-1]
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def is_weight(path: tuple, leaf) -> bool:
    """The default filter: named "kernel"/"embedding", or at least 2-d. Biases and scales are not."""
    return _last_name(path) in WEIGHT_NAMES or jnp.ndim(leaf) >= 2


def _selected(params, filter: Filter) -> list[jax.Array]:
    leaves_with_paths, _ = jax.tree_util.tree_flatten_with_path(params)
    return [jnp.asarray(leaf) for path, leaf in leaves_with_paths if filter(path, leaf)]


def _total(terms: list[jax.Array]) -> jax.Array:
    # A float32 zero start: an empty selection is a float32 0, and float64 terms still promote it.
    return sum(terms, jnp.zeros((), jnp.float32))


def _upcast(w: jax.Array) -> jax.Array:
    # Squares of bfloat16 weights summed in bfloat16 lose most of their digits; sum in >= float32.
    return w.astype(jnp.promote_types(w.dtype, jnp.float32))


def l2(params, filter: Filter = is_weight) -> jax.Array:
    """``0.5 * sum(w**2)`` over the selected leaves; its gradient is ``w`` there, 0 elsewhere.

    Args:
      params: any pytree of arrays (e.g. Flax ``variables["params"]``).
      filter: ``filter(path, leaf) -> bool``; default ``is_weight``.

    Returns:
      A scalar (float32, or float64 if a selected leaf is float64). 0 if nothing is selected.
    """
    return _total([0.5 * jnp.sum(jnp.square(_upcast(w))) for w in _selected(params, filter)])


def l1(params, filter: Filter = is_weight) -> jax.Array:
    """``sum(|w|)`` over the selected leaves; its gradient is ``sign(w)`` there, 0 elsewhere.

    Args and returns as ``l2``.
    """
    # w·sign(w) is |w| exactly, and its gradient is sign(w) with 0 at w = 0 (the smallest
    # subgradient), where jnp.abs's would be 1.
    return _total([jnp.sum(_upcast(w) * jnp.sign(_upcast(w))) for w in _selected(params, filter)])


def penalty(params, l1: float = 0.0, l2: float = 0.0, filter: Filter = is_weight) -> jax.Array:
    """``l1 * l1(params) + l2 * l2(params)`` (elastic net); terms with a zero coefficient are skipped.

    Args:
      params: a pytree of arrays.
      l1: coefficient of the L1 penalty ``sum |w|``.
      l2: coefficient of the L2 penalty ``0.5 * sum w²``.
      filter: which leaves are penalised; default ``is_weight``.

    Returns:
      A scalar to add to the loss.
    """
    total = jnp.zeros((), jnp.float32)
    # Python floats only: a traced coefficient always takes both terms.
    if not (isinstance(l1, (int, float)) and l1 == 0):
        total = total + l1 * _l1(params, filter)
    if not (isinstance(l2, (int, float)) and l2 == 0):
        total = total + l2 * _l2(params, filter)
    return total


_l1, _l2 = l1, l2  # `penalty`'s arguments shadow the functions' names


def weight_mask(params, filter: Filter = is_weight):
    """A pytree of bools with ``params``' structure: True where ``filter`` selects the leaf.

    The form Optax masks take, e.g. ``optax.add_decayed_weights(1e-4, mask=weight_mask)``.
    """
    return jax.tree_util.tree_map_with_path(lambda path, leaf: bool(filter(path, leaf)), params)
