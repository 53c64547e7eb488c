"""The activations of the fused-dense contract, with their derivatives.

Each entry is written once in plain ``jax.numpy`` and is what every backend is checked
against. ``grad`` is the derivative with respect to the pre-activation ``z``; it is used by
backends that fuse the backward pass (the reference itself gets its gradients from autodiff).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)


def identity(z):
    return z


def relu(z):
    return jnp.maximum(z, 0)


def gelu(z):
    """Exact GELU, ``z * Phi(z)`` with the normal CDF written through erf."""
    return 0.5 * z * (1.0 + jax.lax.erf(z * _INV_SQRT_2))


def gelu_tanh(z):
    """The tanh approximation of GELU (GPT-2, BERT)."""
    return 0.5 * z * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z**3)))


def silu(z):
    return z * jax.nn.sigmoid(z)


def tanh(z):
    return jnp.tanh(z)


def sigmoid(z):
    return jax.nn.sigmoid(z)


ACTIVATIONS = {
    "identity": identity,
    "relu": relu,
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
    "silu": silu,
    "tanh": tanh,
    "sigmoid": sigmoid,
}


def get(name: str):
    """Returns the activation function called ``name``; raises ``ValueError`` naming the choices."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]
