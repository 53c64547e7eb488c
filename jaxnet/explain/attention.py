"""Attention maps of jaxnet's transformers, per layer and head, and attention rollout.

    weights = attention_weights(model, variables, ids)   # ids [B, T] -> [L, B, H, T, T]
    flow = rollout(weights)                              # [B, T, T]: how much token j feeds position i

``CausalSelfAttention`` sows its softmax probabilities into the ``"intermediates"`` collection;
Flax keeps them only when that collection is mutable, so ``model.apply`` without it (training,
generation) does not store them. Row ``i`` of a map is query position ``i``'s distribution over
key positions (causal: zero above the diagonal), before attention dropout.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp

SOWN = "attention_weights"  # the name CausalSelfAttention sows its probabilities under
VALUE_RELATION = "value_relation"  # and its value relations (distillation), into RELATIONS
HIDDEN_STATE = "hidden_state"  # and each Block its output (distillation), into "intermediates"
RELATIONS = "relations"  # a collection of their own: computed only when it is mutable


def attention_weights(model, variables, ids, **apply_kwargs) -> jax.Array:
    """The attention probabilities of every layer: ``[L, B, H, T, T]`` (layer order = block order).

    Args:
      model: a ``TransformerLM`` or ``TransformerClassifier`` (any module whose attention sows
        ``"attention_weights"``); variables: its ``{"params": ...}``; ids: ``[B, T]`` token ids.
      apply_kwargs: passed to ``model.apply`` (inference by default: ``train=False``).

    Raises:
      ValueError: the model sowed no attention weights.
    """
    return output_and_attention(model, variables, ids, **apply_kwargs)[1]


def output_and_attention(model, variables, ids, *, value_relations: bool = False, hidden_states: bool = False,
                         **apply_kwargs) -> tuple:
    """``(model's output, attention_weights)`` of one ``model.apply`` (as ``attention_weights``);
    with ``value_relations``, the maps are ``[2L, B, H, T, T]``: the L attention maps, then each
    layer's value relation (MiniLM: ``softmax(v v^T / sqrt(d))`` per head, over every position).
    With ``hidden_states``, ``(output, maps, states)``: ``states [L, B, T, C]``, each block's output."""
    collections = ["intermediates", RELATIONS] if value_relations else ["intermediates"]
    out, state = model.apply(variables, ids, mutable=collections, **apply_kwargs)
    maps = _by_block(model, state.get("intermediates", {}), SOWN)
    if value_relations:
        maps = jnp.concatenate([maps, _by_block(model, state.get(RELATIONS, {}), VALUE_RELATION)])
    if hidden_states:
        return out, maps, _by_block(model, state.get("intermediates", {}), HIDDEN_STATE)
    return out, maps


def _by_block(model, sown, name: str) -> jax.Array:
    """The arrays sown under ``name``, stacked in block order: ``[L, ...]``."""
    found = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(sown)[0]:
        names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
        if name in names:
            block = next((int(m.group(1)) for n in names if (m := re.fullmatch(r"block(\d+)", n))), len(found))
            found.append((block, leaf))
    if not found:
        raise ValueError(f"{type(model).__name__} sowed no {name!r}; expected a jaxnet transformer "
                         f"(jaxnet.models.TransformerLM or TransformerClassifier)")
    return jnp.stack([leaf for _, leaf in sorted(found, key=lambda item: item[0])])


def rollout(weights) -> jax.Array:
    """Attention rollout (Abnar & Zuidema 2020) of ``weights: [L, B, H, T, T]`` -> ``[B, T, T]``.

    Per layer the heads are averaged, the identity is added for the residual connection and
    the rows are normalised again (``0.5 A + 0.5 I`` when A's rows sum to 1); the layers are then
    multiplied from the first up: ``R = A_L ... A_2 A_1``. Row ``i`` of ``R`` is how much each
    input token flows into position ``i`` at the top; its rows sum to 1.
    """
    w = jnp.asarray(weights)
    if w.ndim != 5 or w.shape[-1] != w.shape[-2]:
        raise ValueError(f"weights: expected [L, B, H, T, T] attention maps, got shape {tuple(w.shape)}")
    a = w.astype(jnp.float32).mean(axis=2) + jnp.eye(w.shape[-1], dtype=jnp.float32)  # (L, B, T, T)
    a = a / a.sum(axis=-1, keepdims=True)
    out = a[0]
    for layer in a[1:]:
        out = layer @ out
    return out


__all__ = ["HIDDEN_STATE", "RELATIONS", "SOWN", "VALUE_RELATION", "attention_weights", "output_and_attention",
           "rollout"]
