"""Many small MLPs trained by full-batch SGD in one Numba kernel (``_mlp_sgd``): the JAX side.

``train(x, y, weights, biases, activations, lr, active, epochs)`` runs ``epochs`` full-batch SGD
steps of ``C`` MLPs that share the data (MSE loss), every model's whole training in cache on one
core (models shared between the cores), and returns their parameters and per-epoch metrics. It
is what ``jaxnet.train.fit_many`` runs for a sweep of plain-SGD dense stacks
(``jaxnet.train.fused``); ``kernels.reference.mlp_sgd`` is what it is checked against.
"""
from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np

from kernels.activations import CODES

_TARGET = "jaxnet_numba_mlp_sgd_f32"
_lock = threading.Lock()
_REGISTERED: list = []


def _target() -> str:
    """The FFI target, its handler compiled (or loaded from Numba's cache) and registered on first use."""
    if not _REGISTERED:
        with _lock:
            if not _REGISTERED:
                from kernels.numba_cpu import _ffi, _mlp_sgd

                handler = _mlp_sgd.handler()
                _ffi.register(_TARGET, handler)
                _REGISTERED.append(handler)
    return _TARGET


def precompile() -> None:
    """Compiles (or loads from Numba's cache) and registers the handler now, not at its first call."""
    _target()


def supported_activations() -> tuple[str, ...]:
    from kernels.numba_cpu._mlp_sgd import SUPPORTED

    return SUPPORTED


def check_args(x, y, weights, biases, activations, lr, active, epochs) -> None:
    """``TypeError`` / ``ValueError`` naming what does not fit ``train``'s shapes and dtypes."""
    if len(weights) == 0 or len(weights) != len(biases) or len(weights) != len(activations):
        raise ValueError(f"mlp_sgd: weights, biases and activations need one entry per layer, got "
                         f"{len(weights)}, {len(biases)} and {len(activations)}")
    for name, a in (("x", x), ("y", y), ("lr", lr), *((f"weights[{i}]", w) for i, w in enumerate(weights)),
                    *((f"biases[{i}]", b) for i, b in enumerate(biases) if b is not None)):
        if a.dtype != jnp.float32:
            raise TypeError(f"mlp_sgd: {name} must be float32, got {a.dtype}")
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 1:
        raise ValueError(f"mlp_sgd: x [n, K] and y [n, F] with n >= 1, got {x.shape} and {y.shape}")
    models = lr.shape[0] if lr.ndim in (1, 2) else -1
    if models < 1 or active.shape != (models,) or (lr.ndim == 2 and lr.shape[1] != int(epochs)):
        raise ValueError(f"mlp_sgd: lr must be [C] or [C, epochs={epochs}] and active [C], got {lr.shape} and "
                         f"{active.shape}")
    width = x.shape[1]
    for i, (w, b, act) in enumerate(zip(weights, biases, activations)):
        if w.ndim != 3 or w.shape[0] != models or w.shape[1] != width:
            raise ValueError(f"mlp_sgd: weights[{i}] must be [C={models}, K={width}, N], got {w.shape}")
        if b is not None and b.shape != (models, w.shape[2]):
            raise ValueError(f"mlp_sgd: biases[{i}] must be [C={models}, N={w.shape[2]}], got {b.shape}")
        if act not in supported_activations():
            raise ValueError(f"mlp_sgd: activation {act!r} of layer {i} is not one of {supported_activations()}")
        width = w.shape[2]
    if width != y.shape[1]:
        raise ValueError(f"mlp_sgd: the last layer's width {width} must be y's {y.shape[1]}")
    if int(epochs) < 1:
        raise ValueError(f"mlp_sgd: epochs must be >= 1, got {epochs}")


def train(x, y, weights, biases, activations, lr, active, epochs: int, leaf_ids=None):
    """``epochs`` full-batch SGD steps of ``C`` MLPs on shared data, under MSE.

    Args:
      x: ``[n, K]`` float32, y: ``[n, F]`` float32 (every model's data).
      weights: per layer ``[C, K_l, N_l]`` float32; biases: per layer ``[C, N_l]`` or None.
      activations: per layer, one of ``supported_activations()``.
      lr: ``[C]`` float32 learning rates, or ``[C, epochs]`` (each epoch's rate: a schedule);
        active: ``[C]`` bool (False: the model is returned as is).
      epochs: static, >= 1.
      leaf_ids: per layer ``(weight id, bias id)``: the order ``nonfinite_leaf`` reports in
        (default: ``(2 l, 2 l + 1)``).

    Returns:
      ``(weights, biases, metrics)``: the parameters after training, and ``metrics[name]:
      [C, epochs]``: ``loss`` (the MSE at the parameters each epoch started from), ``grad_norm``,
      ``update_norm`` (global L2 norms, float32) and ``nonfinite_leaf`` (int32, the smallest leaf
      id with a non-finite gradient, -1 if none). Inactive models' metrics are 0.
    """
    check_args(x, y, weights, biases, activations, lr, active, epochs)
    models, n = lr.shape[0], x.shape[0]
    leaf_ids = leaf_ids or [(2 * i, 2 * i + 1) for i in range(len(weights))]
    pieces, rows, offset, rows_at = [], [], 0, 0
    for (w, b, act), (wid, bid) in zip(zip(weights, biases, activations), leaf_ids):
        k, width = w.shape[1], w.shape[2]
        pieces.append(w.reshape(models, k * width))
        bias_at = -1 if b is None else offset + k * width
        if b is not None:
            pieces.append(b)
        rows.append((k, width, CODES[act], offset, bias_at, wid, bid, rows_at))
        offset += k * width + (0 if b is None else width)
        rows_at += width * n
    if max(offset, rows_at) >= 2**31:  # the layer table is int32
        raise ValueError(f"mlp_sgd: {offset} parameters and {rows_at} scratch elements per model; the kernel "
                         f"indexes fewer than 2**31")
    flat = jnp.concatenate(pieces, axis=1)
    table = jnp.asarray(np.asarray(rows, np.int32))
    epochs = int(epochs)
    out, metrics = jax.ffi.ffi_call(
        _target(), (jax.ShapeDtypeStruct(flat.shape, jnp.float32),
                    jax.ShapeDtypeStruct((models, epochs, 4), jnp.float32)))(
        x.T, y.T, flat, jnp.broadcast_to(lr.reshape(models, -1), (models, epochs)), active.astype(jnp.float32),
        table)
    new_w, new_b, at = [], [], 0
    for w, b in zip(weights, biases):
        size = w.shape[1] * w.shape[2]
        new_w.append(out[:, at:at + size].reshape(w.shape))
        at += size
        if b is not None:
            new_b.append(out[:, at:at + b.shape[1]])
            at += b.shape[1]
        else:
            new_b.append(None)
    named = {"loss": metrics[..., 0], "grad_norm": metrics[..., 1], "update_norm": metrics[..., 2],
             "nonfinite_leaf": metrics[..., 3].astype(jnp.int32)}
    return new_w, new_b, named
