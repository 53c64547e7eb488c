"""What an attribution explains: one score per example, and the inputs and baselines it is taken over.

Every method in ``jaxnet.explain`` takes ``f`` batched: ``f(x: [B, ...]) -> [B]`` (one score per
example), or ``[B, C]`` (say, class logits) together with ``target``, the class to explain: an
int for every example or ``[B]`` ints, one per example (Captum's convention). Examples must not
interact inside ``f`` (run models in inference mode: ``train=False``), so the gradient of
``sum(f(x))`` with respect to ``x[b]`` is the gradient of example ``b``'s own score.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet.data.checks import snippet


def check_input(x, name: str = "x") -> jax.Array:
    """``x: [B, ...]`` floating point, as a JAX array; ``TypeError``/``ValueError`` otherwise."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating-point array [B, ...], got dtype {x.dtype}")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"{name}: expected a batch [B, ...] with B >= 1, got shape {tuple(x.shape)}")
    return x


def check_baseline(baseline, x: jax.Array, name: str = "baseline") -> jax.Array:
    """``baseline`` broadcast to ``x.shape``: None (zeros, Captum's default), a number, one input
    ``x.shape[1:]`` for every example, or ``x.shape`` (one per example)."""
    if baseline is None:
        return jnp.zeros_like(x)
    b = jnp.asarray(baseline, dtype=x.dtype)
    if b.shape not in ((), tuple(x.shape[1:]), tuple(x.shape)):
        raise ValueError(f"{name}: shape {tuple(b.shape)} does not match x {tuple(x.shape)}; expected (), "
                         f"{tuple(x.shape[1:])} or {tuple(x.shape)}")
    return jnp.broadcast_to(b, x.shape)


def score_fn(f: Callable, target=None) -> Callable[[jax.Array], jax.Array]:
    """``f`` as a function ``[B, ...] -> [B]``: its output as it is (``target=None``), or column
    ``target`` of a ``[B, C]`` output. The output's shape is checked when the function is called
    (at trace time under ``jit``), with a ``ValueError`` saying what was expected."""
    if target is not None:
        t = jnp.asarray(target)
        if not jnp.issubdtype(t.dtype, jnp.integer) or t.ndim > 1:
            raise TypeError(f"target: expected an int or [B] ints, got {snippet(target)} (dtype {t.dtype})")

    def scores(x):
        out = f(x)
        b = x.shape[0]
        if target is None:
            if out.shape != (b,):
                raise ValueError(f"f must return one score per example, shape ({b},), got {tuple(out.shape)}; "
                                 f"for per-class outputs [B, C] pass target= (the class to explain)")
            return out
        if out.ndim != 2 or out.shape[0] != b:
            raise ValueError(f"with target, f must return [B, C] = [{b}, C], got {tuple(out.shape)}")
        if t.ndim == 1 and t.shape[0] != b:
            raise ValueError(f"target: {t.shape[0]} indices for a batch of {b}")
        try:
            host = np.asarray(t)
        except jax.errors.TracerArrayConversionError:  # a traced target: nothing to check here
            host = np.zeros((), np.int32)
        bad = host[(host < 0) | (host >= out.shape[1])]
        if bad.size:
            raise ValueError(f"target: {snippet(bad.tolist())} out of range for {out.shape[1]} outputs")
        idx = jnp.broadcast_to(t, (b,))
        return jnp.take_along_axis(out, idx[:, None], axis=1)[:, 0]

    return scores


def sum_over_features(a: jax.Array) -> jax.Array:
    """``[B, ...] -> [B]``: the sum of each example's attributions."""
    return a.reshape(a.shape[0], -1).sum(axis=1)


__all__ = ["check_baseline", "check_input", "score_fn", "sum_over_features"]
