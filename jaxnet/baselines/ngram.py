"""Interpolated Kneser–Ney n-gram language model over integer token streams (a classical baseline).

    lm = KneserNey.fit(train_ids, order=6, vocab_size=len(vocab))
    bits = lm.cross_entropy(val_ids, context=train_ids) / math.log(2)   # bits per token

Chen & Goodman (1998), interpolated Kneser–Ney with one absolute discount per order,
``D_k = n1 / (n1 + 2 n2)`` from the counts-of-counts of that order:

    p_k(w | h) = (max(c_k(h w) - D_k, 0) + D_k N1+(h •) p_{k-1}(w | h')) / c_k(h •)

where ``h'`` drops ``h``'s oldest token; ``c_k`` is the raw count at the highest order and the
continuation count ``N1+(• h w)`` (distinct left neighbours) below it; an unseen context
(``c_k(h •) = 0``) passes ``p_{k-1}`` through; ``p_0`` is uniform over the vocabulary. Every
token of the vocabulary gets probability > 0, and each ``p_k(• | h)`` sums to 1.

Counting and scoring are vectorised with NumPy: an n-gram is one int64 key
(``sum ids[j] * V**(k-1-j)``), so ``vocab_size ** order`` must stay below ``2**63``.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np


def _keys(ids: np.ndarray, k: int, v: int) -> np.ndarray:
    """``[N - k + 1]`` int64 keys of the k-grams of ``ids`` (k = 0: one empty key per position)."""
    n = len(ids) - k + 1
    key = np.zeros(max(n, 0), np.int64)
    for j in range(k):
        key = key * v + ids[j: j + n]
    return key


@dataclasses.dataclass
class _Order:
    """Tables of one order k: k-gram counts, and per (k-1)-gram context its total and its
    number of distinct continuations."""

    gram_keys: np.ndarray  # sorted unique k-gram keys
    gram_counts: np.ndarray
    ctx_keys: np.ndarray  # sorted unique (k-1)-gram keys
    ctx_totals: np.ndarray  # c_k(h •)
    ctx_types: np.ndarray  # N1+(h •)
    discount: float


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """``values`` at ``query`` where present in the sorted ``keys``, else 0."""
    if len(keys) == 0:
        return np.zeros(len(query), values.dtype)
    i = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    return np.where(keys[i] == query, values[i], 0)


def _discount(counts: np.ndarray) -> float:
    n1, n2 = np.sum(counts == 1), np.sum(counts == 2)
    return float(n1 / (n1 + 2 * n2)) if n1 + n2 > 0 and n1 > 0 else 0.5


@dataclasses.dataclass
class KneserNey:
    """A fitted interpolated Kneser–Ney model (see the module docstring)."""

    order: int
    vocab_size: int
    tables: list  # _Order for k = 1..order

    @classmethod
    def fit(cls, ids, *, order: int, vocab_size: int) -> "KneserNey":
        """Counts the n-grams of ``ids: [N] int`` (values in ``[0, vocab_size)``) up to ``order``."""
        ids = np.asarray(ids, np.int64)
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        if vocab_size ** order >= 2 ** 63:
            raise ValueError(f"vocab_size ** order = {vocab_size}**{order} does not fit an int64 key; lower the order")
        if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"ids must be in [0, {vocab_size}), got [{ids.min()}, {ids.max()}]")
        tables = []
        for k in range(1, order + 1):
            if k == order:
                grams, counts = np.unique(_keys(ids, k, vocab_size), return_counts=True)
            else:  # continuation counts: distinct left neighbours of each k-gram
                longer = np.unique(_keys(ids, k + 1, vocab_size))
                grams, counts = np.unique(longer % vocab_size ** k, return_counts=True)
            ctx = grams // vocab_size  # the (k-1)-gram context of each k-gram (sorted with grams)
            ctx_keys, start, types = np.unique(ctx, return_index=True, return_counts=True)
            totals = np.add.reduceat(counts, start) if len(counts) else counts
            tables.append(_Order(grams, counts, ctx_keys, totals, types, _discount(counts)))
        return cls(order, vocab_size, tables)

    def log_probs(self, ids, context=None) -> np.ndarray:
        """``[N]`` natural-log probabilities of every token of ``ids`` given what precedes it
        (the tail of ``context`` before the first one, when given)."""
        ids = np.asarray(ids, np.int64)
        pre = np.asarray(context[-(self.order - 1):] if context is not None and self.order > 1 else [],
                         np.int64)
        full = np.concatenate([pre, ids])
        n, v = len(ids), self.vocab_size
        p = np.full(n, 1.0 / v)
        offset = len(pre)
        for k, t in enumerate(self.tables, start=1):
            # Target i (at full[offset + i]) with its k - 1 previous tokens, where they exist.
            first = max(k - 1 - offset, 0)  # targets without k-1 tokens of history keep p_{k-1}
            if first >= n:
                continue
            grams = _keys(full[offset + first - (k - 1):], k, v)[: n - first]
            ctx = grams // v
            total = _lookup(t.ctx_keys, t.ctx_totals, ctx).astype(np.float64)
            types = _lookup(t.ctx_keys, t.ctx_types, ctx).astype(np.float64)
            count = _lookup(t.gram_keys, t.gram_counts, grams).astype(np.float64)
            lower = p[first:]
            seen = total > 0
            safe_total = np.where(seen, total, 1.0)
            mixed = (np.maximum(count - t.discount, 0.0) + t.discount * types * lower) / safe_total
            p[first:] = np.where(seen, mixed, lower)
        return np.log(p)

    def cross_entropy(self, ids, context=None) -> float:
        """Mean negative log-likelihood (nats per token) of ``ids``."""
        return float(-np.mean(self.log_probs(ids, context)))


def bits_per_token(model: KneserNey, ids, context=None) -> float:
    return model.cross_entropy(ids, context) / math.log(2)


def interpolate(log_p, log_q, weight: float) -> np.ndarray:
    """``log((1 - weight) * p + weight * q)``, token by token: two models' natural-log probabilities
    of the same tokens (``[N]`` each, e.g. a network's and ``KneserNey.log_probs``) linearly
    interpolated, the classic way of combining a neural and an n-gram language model. Each model's
    distributions sum to 1, so the mixture's do too. Computed in logs (no underflow).
    """
    if not 0 <= weight <= 1:
        raise ValueError(f"interpolate: weight must be in [0, 1], got {weight}")
    log_p, log_q = np.asarray(log_p, np.float64), np.asarray(log_q, np.float64)
    if log_p.shape != log_q.shape:
        raise ValueError(f"interpolate: the two models scored different tokens: shapes {log_p.shape} and {log_q.shape}")
    with np.errstate(divide="ignore"):  # log(0) = -inf at weight 0 or 1: that model drops out
        return np.logaddexp(np.log1p(-weight) + log_p, np.log(weight) + log_q)


__all__ = ["KneserNey", "bits_per_token", "interpolate"]
