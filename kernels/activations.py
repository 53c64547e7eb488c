"""The one table of activations of the fused-dense contract: everything a backend or a test needs.

``ACTIVATIONS`` maps each name to an ``Activation`` record:

- ``fn(z)``, ``grad(z)``: ``act`` and ``act'`` in plain ``jax.numpy`` (the reference uses ``fn``;
  its gradient comes from autodiff of ``fn``, which ``grad`` matches, relu's 1/2 at 0 included).
- ``code``: the integer the native (Numba) kernels switch on; the record's position in the table.
- ``saves``: what a fused backward keeps from the forward: ``"z"`` (the pre-activation), ``"y"``
  (the output: ``act'`` is a function of ``y`` alone, see ``grad_from_y``) or ``"none"``.
- ``grad_from_y(y)``: ``act'`` written through ``y``, for activations that save ``"y"``.
- ``kernel_fn``, ``kernel_grad``: ``fn`` and ``grad`` built only from primitives every kernel
  lowering has (Pallas' Triton lowering has no rule for ``lax.erf``: exact GELU there uses a
  rational erf with float32 accuracy).
- ``np_fn(z)``, ``np_grad(z)``: independent float64 NumPy versions, the ground truth of the tests
  (``kernels.reference.fused_dense_numpy``, ``fused_dense_vjp_numpy``).
- ``d1 = sup |act'|``, ``d2 = sup |act''|`` (away from kinks), ``kinks`` (where ``act'`` jumps),
  ``exact`` (evaluated without rounding) and ``derivative_scale(z)`` (float64: how much a relative
  rounding error inside ``act'`` moves it, ``d1`` unless ``act'`` is a small difference of large
  terms): the inputs of the tolerance model in ``jaxnet.testing.tolerances``.

Adding an activation means one entry here plus its branch in each native kernel that switches on
``code`` (``kernels/numba_cpu/_kernels.py``: its epilogue and derivative functions, called from
``activate_unit`` and ``gradient_unit``); the Pallas kernels, the XLA paths, the hypothesis
strategies, tolerances, mutants and tests read this table.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_A = 0.044715

# Rational approximation of erf on [-4, 4] (erf(+-4) = +-1 in float32): x * P(x^2) / Q(x^2), the
# form XLA and Eigen use for float32. Max abs error ~4e-7 against math.erf, the order of
# lax.erf's own float32 error (~3e-7).
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
          -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
          -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
          -7.37332916720468e-03, -1.42647390514189e-02)


def erf_rational(z):
    """``erf(z)`` from ``+ - * /`` only (for kernel lowerings without ``lax.erf``); float64 inputs,
    which only run in interpret mode, keep ``lax.erf``."""
    if z.dtype == jnp.float64:
        return jax.lax.erf(z)
    z = jnp.clip(z, -4.0, 4.0)
    z2 = z * z
    p = z2 * _ERF_P[0] + _ERF_P[1]  # Horner, in the input's dtype (python floats are weak)
    for c in _ERF_P[2:]:
        p = p * z2 + c
    q = z2 * _ERF_Q[0] + _ERF_Q[1]
    for c in _ERF_Q[2:]:
        q = q * z2 + c
    return z * p / q


def _np_erf(z):
    return np.vectorize(math.erf, otypes=[np.float64])(z)


def _np_sigmoid(z):
    with np.errstate(over="ignore"):  # exp(-z) = inf gives 0, as it should
        return 1.0 / (1.0 + np.exp(-z))


# --- the functions, one group per activation --------------------------------------------------

def _gelu(z, erf=jax.lax.erf):
    """Exact GELU, ``z * Phi(z)`` with the normal CDF written through erf."""
    return 0.5 * z * (1.0 + erf(z * _INV_SQRT_2))


def _gelu_grad(z, erf=jax.lax.erf):
    return 0.5 * (1.0 + erf(z * _INV_SQRT_2)) + z * _INV_SQRT_2PI * jnp.exp(-0.5 * z * z)


def _gelu_tanh(z):
    """The tanh approximation of GELU (GPT-2, BERT)."""
    return 0.5 * z * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_A * z * z * z)))


def _gelu_tanh_grad(z):
    t = jnp.tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_A * z * z * z))
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_A * z * z)


def _np_gelu_tanh_grad(z):
    t = np.tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_A * z**3))
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * _GELU_TANH_A * z * z)


def _gelu_tanh_scale(z):
    """act' = (1 + t)/2 + z (1 - t^2) c (1 + 3 a z^2) / 2: a relative error e in t moves it by
    e (|t|/2 + |z| t^2 c (1 + 3 a z^2)) (18x d1 at z = -5)."""
    t = np.tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_A * z**3))
    return 0.5 * np.abs(t) + np.abs(z) * t * t * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_A * z * z)


def _silu_grad(z):
    s = jax.nn.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def _silu_scale(z):
    """act' = s + z s (1 - s): a relative error e in s moves it by e s (1 + |z| |1 - 2 s|)."""
    s = _np_sigmoid(z)
    return s * (1.0 + np.abs(z) * np.abs(1.0 - 2.0 * s))


def _relu_grad(z):
    # jnp.maximum's autodiff splits the tie: 1/2 at z = 0.
    return jnp.where(z > 0, 1.0, jnp.where(z == 0, 0.5, 0.0)).astype(z.dtype)


def _sigmoid_lowerable(z):
    return 1.0 / (1.0 + jnp.exp(-z))


# --- the table ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Activation:
    """One activation (see the module docstring for each field). Calling it applies ``fn``."""

    name: str
    fn: Callable
    grad: Callable
    saves: str
    np_fn: Callable
    np_grad: Callable
    d1: float
    d2: float
    grad_from_y: Callable | None = None
    kernel_fn: Callable | None = None  # None: ``fn`` lowers everywhere
    kernel_grad: Callable | None = None  # None: ``grad`` lowers everywhere
    kinks: tuple[float, ...] = ()
    exact: bool = False
    scale: Callable | None = None  # derivative_scale beyond d1, float64 NumPy; None: d1
    code: int = -1  # set from the position in ACTIVATIONS

    def __call__(self, z):
        return self.fn(z)

    def lowerable_fn(self, z):
        """``act(z)`` from primitives every kernel lowering has."""
        return (self.kernel_fn or self.fn)(z)

    def lowerable_grad(self, z):
        """``act'(z)`` from primitives every kernel lowering has."""
        return (self.kernel_grad or self.grad)(z)

    def derivative_scale(self, z) -> np.ndarray:
        """Float64 ``[z.shape]``: how much a unit relative rounding error inside ``act'`` moves it."""
        z = np.asarray(z, dtype=np.float64)
        if self.scale is None:
            return np.full(z.shape, self.d1)
        with np.errstate(over="ignore", invalid="ignore"):
            return np.maximum(self.d1, np.nan_to_num(self.scale(z), nan=np.inf))


# Suprema computed in float64 on a fine grid (and by hand where closed-form): gelu' peaks at 1.129,
# gelu'' at 2 phi(0) = 0.798; gelu_tanh within 1%; silu' peaks at 1.0998, silu'' at 0.5 (z = 0);
# tanh'' at 0.770; sigmoid' at 0.25, sigmoid'' at 0.0962.
_TABLE = (
    Activation("identity", fn=lambda z: z, grad=jnp.ones_like, saves="none",
               np_fn=lambda z: z, np_grad=np.ones_like, d1=1.0, d2=0.0, exact=True),
    Activation("relu", fn=lambda z: jnp.maximum(z, 0), grad=_relu_grad, saves="y",
               grad_from_y=lambda y: (y > 0).astype(y.dtype),  # only where no z was exactly 0
               np_fn=lambda z: np.maximum(z, 0.0),
               np_grad=lambda z: np.where(z > 0, 1.0, np.where(z == 0, 0.5, 0.0)),
               d1=1.0, d2=0.0, kinks=(0.0,), exact=True),
    Activation("gelu", fn=_gelu, grad=_gelu_grad, saves="z",
               kernel_fn=lambda z: _gelu(z, erf_rational), kernel_grad=lambda z: _gelu_grad(z, erf_rational),
               np_fn=lambda z: 0.5 * z * (1.0 + _np_erf(z * _INV_SQRT_2)),
               np_grad=lambda z: 0.5 * (1 + _np_erf(z * _INV_SQRT_2)) + z * np.exp(-z * z / 2) * _INV_SQRT_2PI,
               d1=1.13, d2=0.80),
    Activation("gelu_tanh", fn=_gelu_tanh, grad=_gelu_tanh_grad, saves="z",
               np_fn=lambda z: 0.5 * z * (1.0 + np.tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_A * z**3))),
               np_grad=_np_gelu_tanh_grad, d1=1.13, d2=0.81, scale=_gelu_tanh_scale),
    Activation("silu", fn=lambda z: z * jax.nn.sigmoid(z), grad=_silu_grad, saves="z",
               kernel_fn=lambda z: z * _sigmoid_lowerable(z),
               kernel_grad=lambda z: _sigmoid_lowerable(z) * (1.0 + z * (1.0 - _sigmoid_lowerable(z))),
               np_fn=lambda z: z * _np_sigmoid(z),
               np_grad=lambda z: _np_sigmoid(z) * (1 + z * (1 - _np_sigmoid(z))),
               d1=1.10, d2=0.50, scale=_silu_scale),
    Activation("tanh", fn=jnp.tanh, grad=lambda z: (1.0 - jnp.tanh(z)) * (1.0 + jnp.tanh(z)), saves="y",
               grad_from_y=lambda y: 1.0 - y * y,
               np_fn=np.tanh, np_grad=lambda z: 1 - np.tanh(z) ** 2, d1=1.0, d2=0.77),
    Activation("sigmoid", fn=jax.nn.sigmoid, grad=lambda z: jax.nn.sigmoid(z) * (1.0 - jax.nn.sigmoid(z)),
               saves="y", grad_from_y=lambda y: y * (1.0 - y),
               kernel_fn=_sigmoid_lowerable,
               kernel_grad=lambda z: _sigmoid_lowerable(z) * (1.0 - _sigmoid_lowerable(z)),
               np_fn=_np_sigmoid, np_grad=lambda z: _np_sigmoid(z) * (1 - _np_sigmoid(z)),
               d1=0.25, d2=0.097),
)

ACTIVATIONS: dict[str, Activation] = {a.name: dataclasses.replace(a, code=i) for i, a in enumerate(_TABLE)}
NAMES: tuple[str, ...] = tuple(ACTIVATIONS)
# The native kernels' integer codes, by name.
CODES: dict[str, int] = {name: a.code for name, a in ACTIVATIONS.items()}


def get(name: str) -> Activation:
    """The activation called ``name`` (callable: ``get("relu")(z)``); ``ValueError`` names the choices."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


__all__ = ["ACTIVATIONS", "CODES", "NAMES", "Activation", "erf_rational", "get"]
