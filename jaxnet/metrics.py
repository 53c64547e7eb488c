"""Evaluation metrics: classification (accuracy, confusion matrix) and top-K ranking (HR, NDCG).

Per-example metrics return ``[B]`` values, the form ``fit(metrics=...)`` and ``make_eval_step``
average over a dataset.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def accuracy(logits, labels):
    """``logits: [B, C]``, ``labels: int [B]`` -> ``float32 [B]``: 1 where the top class is the label."""
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
    """``int64 [C, C]``: entry ``[i, j]`` counts examples of true class i predicted as j."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} must have one shape")
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (labels, predictions), 1)
    return cm


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """``float64 [C]``: recall of each class from a confusion matrix (NaN for a class with no examples)."""
    totals = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.diag(cm) / totals


def rank_of_first(scores):
    """``scores: [U, 1 + N]`` with the positive item in column 0 -> ``int32 [U]``: its 0-based rank.

    Ties count against the positive (a constant scorer ranks it last, not first), so a model
    cannot score well by predicting the same value everywhere.
    """
    scores = jnp.asarray(scores)
    return jnp.sum(scores[:, 1:] >= scores[:, :1], axis=1).astype(jnp.int32)


def hit_rate_at_k(scores, k: int = 10):
    """``float32 [U]``: 1 where the positive (column 0 of ``scores: [U, 1 + N]``) ranks in the top ``k``."""
    return (rank_of_first(scores) < k).astype(jnp.float32)


def ndcg_at_k(scores, k: int = 10):
    """``float32 [U]``: ``1 / log2(rank + 2)`` when the positive (column 0) ranks in the top ``k``,
    else 0: NDCG with one relevant item, whose ideal DCG is 1."""
    rank = rank_of_first(scores)
    return jnp.where(rank < k, 1.0 / jnp.log2(rank.astype(jnp.float32) + 2.0), 0.0)
