"""Baselines for recommendation: the global mean, user and item biases, popularity.

    predict = bias_baseline(train)               # explicit ratings: mu + b_u + b_i
    scores = popularity(train, num_items)        # implicit feedback: one score per item
"""
from __future__ import annotations

import numpy as np


def bias_baseline(train, damping: float = 5.0, sweeps: int = 10):
    """``predict(user, item)`` of ``mu + b_u + b_i`` fitted by damped alternating least squares
    (Koren's baseline predictor): ``b_i = sum(r - mu - b_u) / (n_i + damping)``, then ``b_u`` alike.

    ``train``: ``jaxnet.data.ratings.Ratings`` (``user``, ``item``, ``rating`` arrays, dense ids).
    """
    mu = float(train.rating.mean())
    bu, bi = np.zeros(train.num_users), np.zeros(train.num_items)
    nu = np.bincount(train.user, minlength=train.num_users)
    ni = np.bincount(train.item, minlength=train.num_items)
    for _ in range(sweeps):
        bi = np.bincount(train.item, train.rating - mu - bu[train.user], train.num_items) / (ni + damping)
        bu = np.bincount(train.user, train.rating - mu - bi[train.item], train.num_users) / (nu + damping)
    return lambda user, item: mu + bu[user] + bi[item]


def popularity(train, num_items: int, seed: int = 0) -> np.ndarray:
    """``[num_items]`` scores: each item's training count, ties broken at random (plus noise in
    [0, 0.5), below one count)."""
    jitter = np.random.default_rng(seed).uniform(0, 0.5, num_items)
    return np.bincount(train.item, minlength=num_items) + jitter


__all__ = ["bias_baseline", "popularity"]
