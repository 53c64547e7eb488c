"""Integrated gradients (Sundararajan et al. 2017) with Captum's conventions.

    attr = integrated_gradients(f, x, target=labels)                       # [B, ...]
    attr, delta = integrated_gradients(f, x, target=labels, return_delta=True)   # delta: [B]

Attribution ``i`` is ``(x - x')_i`` times the path integral of ``d f / d x_i`` from the baseline
``x'`` (zeros by default, as in Captum) to ``x``, the integral taken by a quadrature rule over
``steps`` points ``alpha_k`` with weights ``w_k``:
``attr = (x - x') * sum_k w_k grad f(x' + alpha_k (x - x'))``. Completeness: each example's
attributions sum to ``f(x) - f(x')`` up to the rule's error, returned as the convergence delta
``sum(attr) - (f(x) - f(x'))`` (Captum's sign).

Rules (``method``), ``path_rule`` gives their points and weights:

- ``"gausslegendre"`` (Captum's default): Gauss-Legendre nodes and weights mapped to [0, 1];
  exact when the integrand is a polynomial of degree < 2 * steps.
- ``"riemann_left"``, ``"riemann_right"``, ``"riemann_middle"``: Captum's points, weights 1/steps.
- ``"riemann_trapezoid"``: ``steps`` equally spaced points from 0 to 1, the true trapezoid
  weights (1/(steps-1), halved at both ends); Captum's own weights are 1/steps with halved ends,
  which sum to 1 - 1/steps rather than 1.
- ``"pair"``: PAIR ``saliency``'s ``IntegratedGradients``: ``np.linspace(0, 1, steps)``, both ends
  included, each weighted 1/steps (weights sum to 1; first-order accurate, like a left sum).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet.arguments import check_choice, check_int
from jaxnet.explain.targets import check_baseline, check_input, score_fn, sum_over_features

METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "pair")


def path_rule(method: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``(alphas, weights)``, each ``[steps] float64``: where on the path the gradient is taken
    (``alpha`` in [0, 1]) and how much each point counts (summing to 1). See the module docstring."""
    check_choice(method, "method", METHODS)
    n = check_int(steps, "steps", minimum=1)
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)  # on [-1, 1], weights summing to 2
        return 0.5 * (nodes + 1.0), 0.5 * weights
    if method == "riemann_trapezoid":
        if n < 2:
            raise ValueError(f"steps must be >= 2 for riemann_trapezoid (both ends of the path), got {n}")
        weights = np.full(n, 1.0 / (n - 1))
        weights[[0, -1]] /= 2
        return np.linspace(0.0, 1.0, n), weights
    alphas = {"riemann_left": np.arange(n) / n, "riemann_right": np.arange(1, n + 1) / n,
              "riemann_middle": (np.arange(n) + 0.5) / n, "pair": np.linspace(0.0, 1.0, n)}[method]
    return alphas, np.full(n, 1.0 / n)


def integrated_gradients(f: Callable, x, baseline=None, *, steps: int = 50, method: str = "gausslegendre",
                         target=None, return_delta: bool = False):
    """Integrated gradients of each example's score along the straight path from ``baseline`` to ``x``.

    Args:
      f, target: ``f(x: [B, ...]) -> [B]``, or ``[B, C]`` with ``target`` (an int or ``[B]`` ints);
        see ``jaxnet.explain.targets``.
      x: ``[B, ...]`` floating point.
      baseline: None (zeros), a number, ``x.shape[1:]`` (one for all) or ``x.shape``.
      steps: points on the path, >= 1 (>= 2 for ``riemann_trapezoid``); a static Python int. All
        ``steps`` gradients of the batch are taken in one vectorised call (memory: steps x batch).
      method: the quadrature rule, one of ``METHODS``.
      return_delta: also return the convergence delta ``[B]``.

    Returns:
      ``attr [B, ...]`` like ``x``, or ``(attr, delta [B])`` with
      ``delta = sum(attr[b]) - (f(x)[b] - f(baseline)[b])``.
    """
    x = check_input(x)
    baseline = check_baseline(baseline, x)
    alphas, weights = path_rule(method, steps)
    scores = score_fn(f, target)
    grad = jax.grad(lambda z: scores(z).sum())
    diff = x - baseline
    grads = jax.vmap(lambda a: grad(baseline + a * diff))(jnp.asarray(alphas, x.dtype))  # (steps, B, ...)
    attr = diff * jnp.tensordot(jnp.asarray(weights, x.dtype), grads, axes=1)
    if not return_delta:
        return attr
    return attr, sum_over_features(attr) - (scores(x) - scores(baseline))


__all__ = ["METHODS", "integrated_gradients", "path_rule"]
