"""The definition of correct for ``fused_dense`` and ``quantized_dense``: plain ``jax.numpy``.

``fused_dense`` and ``quantized_dense`` here are what every backend (the "xla" one included) is
checked against; ``fused_dense_numpy`` and ``fused_dense_vjp_numpy`` are the independent float64 NumPy
forward and backward the tests check both against (the activations come from the one table,
``kernels.activations``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels import activations
from kernels.checks import check_fused_dense_args
from kernels.quantized import check_quantized_dense_args, compute_dtype, quantize_rows, scale_row


def fused_dense(x, w, b=None, *, activation: str = "relu", backend: str = "reference"):
    """``y = act(x @ w + b)`` in plain jax.numpy.

    Args:
      x: ``[..., K]`` float array.
      w: ``[K, N]`` float array.
      b: ``[N]`` float array or None.
      activation: a name from ``kernels.activations.ACTIVATIONS``.
      backend: accepted for signature compatibility with ``kernels.fused_dense``; must be
        "reference" (the "xla" backend is ``kernels.xla``, checked against this function).

    Returns:
      ``[..., N]`` in x's dtype. Low-precision inputs (bfloat16, float16) are multiplied with a
      float32 accumulator and the bias and activation are applied in float32 before the cast.
    """
    if backend != "reference":
        raise ValueError(f"kernels.reference.fused_dense is the reference, not a backend: pass "
                         f"backend='reference' or call kernels.fused_dense(backend={backend!r})")
    check_fused_dense_args(x, w, b, activation)
    act = activations.get(activation)
    acc = jnp.promote_types(x.dtype, jnp.float32)
    z = jnp.matmul(x, w, preferred_element_type=acc, precision=jax.lax.Precision.HIGHEST)
    if b is not None:
        z = z + b.astype(acc)
    return act(z).astype(x.dtype)


def quantized_dense(x, w_q, scale, b=None, *, activation: str = "relu", act_quant=None,
                    backend: str = "reference"):
    """``act(x @ (w_q * scale) + b)`` in plain jax.numpy, the contract of ``kernels.quantized``.

    Args:
      x: ``[..., K]`` float array.
      w_q: ``[K, N]`` int8.
      scale: ``[N]``, ``[1]`` or ``[]`` float (per channel or per tensor).
      b: ``[N]`` float or None.
      activation: a name from ``kernels.activations.ACTIVATIONS``.
      act_quant: None: the weights are dequantised (``w_q * scale`` in acc, the compute dtype
        ``promote(x.dtype, float32)``) and multiplied with x as given. "int8": x is quantised per
        row (``kernels.quantized.quantize_rows``), the int8 dot accumulates exactly in int32 and
        ``z = acc * scale_x[:, None] * scale[None, :]``.
      backend: must be "reference" (signature compatibility with ``kernels.quantized_dense``).

    Returns:
      ``[..., N]`` in x's dtype; the bias and activation are applied in acc before the cast.
    """
    if backend != "reference":
        raise ValueError(f"kernels.reference.quantized_dense is the reference, not a backend: pass "
                         f"backend='reference' or call kernels.quantized_dense(backend={backend!r:.80})")
    check_quantized_dense_args(x, w_q, scale, b, activation, act_quant)
    acc = compute_dtype(x)
    s = scale_row(scale, w_q.shape[1], acc)  # (N,)
    if act_quant is None:
        w = w_q.astype(acc) * s  # (K, N)
        z = jnp.matmul(x.astype(acc), w, precision=jax.lax.Precision.HIGHEST)
    else:
        q, sx = quantize_rows(x)  # (..., K) int8, (...,)
        dot = jax.lax.dot_general(q, w_q, (((q.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
        z = dot.astype(acc) * sx[..., None] * s
    if b is not None:
        z = z + b.astype(acc)
    return activations.get(activation)(z).astype(x.dtype)


def _z_numpy(x, w, b):
    z = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    return z if b is None else z + np.asarray(b, np.float64)


def fused_dense_numpy(x, w, b=None, *, activation: str = "relu") -> np.ndarray:
    """Float64 NumPy ``act(x @ w + b)``: an independent check on the jax reference.

    Returns ``[..., N]`` float64 whatever the input dtypes.
    """
    with np.errstate(over="ignore"):
        return activations.get(activation).np_fn(_z_numpy(x, w, b))


def fused_dense_vjp_numpy(x, w, b, dy, *, activation: str = "relu"):
    """Float64 NumPy forward and backward: ``(y, dx, dw, db)`` for the cotangent ``dy``.

    ``x: [..., K]``, ``w: [K, N]``, ``b: [N]`` or None, ``dy: [..., N]``; ``db`` is None without a
    bias. ``act'`` is the table's analytic ``np_grad`` (relu: 1/2 at exactly 0, as autodiff of the
    reference gives), not autodiff.
    """
    act = activations.get(activation)
    x64, w64, dy64 = (np.asarray(a, np.float64) for a in (x, w, dy))
    z = _z_numpy(x64, w64, b)
    with np.errstate(over="ignore"):
        y = act.np_fn(z)
        rows = int(np.prod(x64.shape[:-1]))  # M; reshape(-1, ...) cannot infer it when K or N is 0
        dz = (dy64 * act.np_grad(z)).reshape(rows, w64.shape[1])  # (M, N)
    x2 = x64.reshape(rows, w64.shape[0])  # (M, K)
    db = None if b is None else dz.sum(axis=0)
    return y, (dz @ w64.T).reshape(x64.shape), x2.T @ dz, db


def mlp_sgd(x, y, weights, biases, activations_, lr, active, epochs: int, leaf_ids=None):
    """What ``kernels.numba_cpu.mlp_sgd.train`` computes (same arguments and results), in jax.numpy:
    per model (``vmap``) ``epochs`` full-batch SGD steps (``lax.scan``; ``lr`` ``[C]`` or
    ``[C, epochs]``) of the dense stack
    ``act_l(h @ W_l + b_l)`` under MSE (``mean((pred - y)**2)``), gradients by autodiff, the
    update ``p + (-lr) * g``; inactive models come back unchanged with metrics 0."""
    leaf_ids = leaf_ids or [(2 * i, 2 * i + 1) for i in range(len(weights))]
    acts = [activations.get(a) for a in activations_]

    def loss_fn(params):
        h = x
        for (w, b), act in zip(params, acts):
            h = act(jnp.matmul(h, w, precision=jax.lax.Precision.HIGHEST) + (0.0 if b is None else b))
        return jnp.mean(jnp.square(h - y))

    def one(params, rates, live):
        def step(p, rate):
            loss, g = jax.value_and_grad(loss_fn)(p)
            updates = jax.tree.map(lambda t: -rate * t, g)
            new = jax.tree.map(jnp.add, p, updates)
            bad = [jnp.where(~jnp.all(jnp.isfinite(gw)), wid, 1 << 30) for (gw, _), (wid, _) in zip(g, leaf_ids)]
            bad += [jnp.where(~jnp.all(jnp.isfinite(gb)), bid, 1 << 30)
                    for (_, gb), (_, bid) in zip(g, leaf_ids) if gb is not None]
            first = jnp.min(jnp.stack(bad))
            m = {"loss": loss, "grad_norm": jnp.sqrt(sum(jnp.sum(t * t) for t in jax.tree.leaves(g))),
                 "update_norm": jnp.sqrt(sum(jnp.sum(t * t) for t in jax.tree.leaves(updates))),
                 "nonfinite_leaf": jnp.where(first == 1 << 30, -1, first).astype(jnp.int32)}
            return new, m

        new, m = jax.lax.scan(step, params, rates)
        return (jax.tree.map(lambda a, b: jnp.where(live, a, b), new, params),
                jax.tree.map(lambda v: jnp.where(live, v, jnp.zeros_like(v)), m))

    params = [(w, b) for w, b in zip(weights, biases)]
    rates = jnp.broadcast_to(lr.reshape(lr.shape[0], -1), (lr.shape[0], int(epochs)))
    new, m = jax.vmap(one)(params, rates, active)
    return [w for w, _ in new], [b for _, b in new], m
