"""Seeded synthetic data with a known generating function."""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxnet.arguments import check_fraction


@dataclasses.dataclass(frozen=True)
class RegressionData:
    """``x: [n, n_features] float32``, ``y: [n, 1] float32``; ``noise_std`` is the noise added to y,
    so ``noise_std**2`` is the lowest MSE any model can reach on fresh data."""

    x: np.ndarray
    y: np.ndarray
    noise_std: float


def make_regression(n: int = 256, n_features: int = 10, *, noise_std: float = 0.1,
                    seed: int = 0) -> RegressionData:
    """Regression targets from a known smooth function plus Gaussian noise.

    ``y = sin(x @ u) + 0.5 * (x @ v) + noise_std * eps`` with ``x, eps ~ N(0, 1)`` and ``u, v``
    fixed unit-norm directions drawn from ``seed``: a linear part any net fits and a nonlinear part
    a small ReLU net fits only in part.
    """
    if n < 1 or n_features < 1:
        raise ValueError(f"need n >= 1 and n_features >= 1, got n={n}, n_features={n_features}")
    rng = np.random.default_rng(seed)
    u, v = rng.standard_normal((2, n_features))
    u, v = u / np.linalg.norm(u), v / np.linalg.norm(v)
    x = rng.standard_normal((n, n_features))
    y = np.sin(x @ u) + 0.5 * (x @ v) + noise_std * rng.standard_normal(n)
    return RegressionData(x.astype(np.float32), y[:, None].astype(np.float32), float(noise_std))


def train_val_split(*arrays: np.ndarray, val_fraction: float, seed: int = 0):
    """Splits arrays along axis 0 by one seeded permutation: ``(a_train, a_val, b_train, b_val, ...)``."""
    val_fraction = check_fraction(val_fraction, "val_fraction")
    n = len(arrays[0])
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    val, train = perm[:n_val], perm[n_val:]
    return tuple(part for a in arrays for part in (a[train], a[val]))
