"""The tolerance model: how far a kernel may be from the reference, per element, and why.

Everything here is computed in float64 NumPy from the *inputs*, not from either result, so a
wrong kernel cannot widen its own tolerance.

Notation. ``u = eps(dtype)`` is the machine epsilon (``jnp.finfo(dtype).eps``: 2**-23 for
float32, 2**-7 for bfloat16, 2**-10 for float16, 2**-52 for float64). ``acc`` is the accumulator
dtype of the contract, ``promote(dtype, float32)``: low-precision inputs are multiplied and summed
in float32. ``out`` is the result dtype (x's dtype).

Forward, ``y = act(z)``, ``z = x @ w + b`` with ``K`` terms per dot product. The standard
forward-error bound for a sum of ``n`` products in any order (Higham, *Accuracy and Stability of
Numerical Algorithms*, §3.1) is ``|fl(z) - z| <= gamma_n * (|x| @ |w| + |b|)`` with
``gamma_n ~= n * u_acc / 2``. Two implementations (candidate and reference) are each within that
of the exact ``z``, so they are within ``K_eff * u_acc * M`` of each other, where
``M = |x| @ |w| + |b|`` (float64) and ``K_eff = K + 1`` (the bias add). Bounding ``M`` from the
absolute values is what keeps the model right for large magnitudes and for cancellation, where
a tolerance relative to ``|y|`` would be far too tight and a global ``atol`` far too loose. Then:

  - the activation multiplies that by its Lipschitz constant ``D1 = sup |act'|`` (table below);
  - evaluating a transcendental activation in ``acc`` adds a few ulps: ``4 u_acc (|y| + |z|)``
    (0 for identity and relu, which are exact);
  - the single rounding to ``out`` on store may land the two results one ulp apart:
    ``u_out * |y|`` (``ulp(y) <= eps * |y|`` for normal ``y``);
  - plus an absolute floor of ``K_eff * tiny(acc) + tiny(out)`` for underflow.

  ``tol_y = D1 * K_eff * u_acc * M + act_err + u_out * |y_ref| + floor``

  When every input is an integer and ``M < 2**mantissa_bits(acc)``, every partial sum is exact in
  any order, so the accumulation term is 0 (only the activation and store terms remain). The
  same holds scaled by powers of two: x, w and b multiples of ``2**-e_x``, ``2**-e_w``,
  ``2**-e_b`` and ``M * 2**max(e_x + e_w, e_b) < 2**mantissa_bits(acc)`` (the probe grid of
  ``strategies.probe_call``, multiples of 1/16). This is what lets the harness check an
  activation's derivative *at* its kink exactly (below).

Gradients, for a cotangent ``g`` (shape of ``y``): ``dz = g * act'(z)``, ``grad_x = dz @ w.T``
(``N`` terms), ``grad_w = x.T @ dz`` and ``grad_b = sum(dz)`` (``R`` terms, R = rows of x). The
error in ``dz`` between two implementations is bounded by
``E_dz = |g| * (2 D2 E_z + 4 u_acc S(z) + D1 u_out)``: the forward error ``E_z`` of ``z`` moved
through ``act'`` (Lipschitz constant ``D2 = sup |act''|``), the evaluation of ``act'`` and a
possible rounding of ``dz`` to ``out`` before the matmul (kernels often store it in the input dtype).
``S(z)`` (``derivative_scale``) is ``D1``, except where ``act'`` is a small difference of large
terms, so that the rounding of the tanh or sigmoid inside it is amplified: for gelu_tanh,
``act' = (1 + t)/2 + z (1 - t^2) c (1 + 3 a z^2) / 2`` with ``t = tanh(c (z + a z^3))``, and a
relative error e in t moves it by ``e (|t|/2 + |z| t^2 c (1 + 3 a z^2))`` (at z = -5, 18x ``D1``;
float32 rounds t to -1 there and gives act' = 0 against the exact -1.5e-6); for silu,
``act' = s + z s (1 - s)`` moves by ``e s (1 + |z| |1 - 2 s|)``, growing like ``|z|`` for z > 0.
Each gradient's tolerance is that error pushed through its matmul by absolute values, plus the
matmul's own accumulation (``n u_acc`` times ``|g| D1`` pushed the same way), plus one ulp of
``out`` and the floor, e.g. ``tol_grad_x = (E_dz + N u_acc D1 |g|) @ |w|.T + u_out |gx_ref| + floor``.

Kinks. relu's derivative jumps at ``z = 0``; there, which side a rounded ``z`` falls on is an
accident of summation order, so wherever ``|z| <= 4 E_z`` (and ``z`` is not exact) the
cotangent is set to 0 before the VJP: no check depends on the ambiguous sign. Where ``z`` is
exactly the kink and computed exactly (integer or dyadic inputs as above; all-zero rows), the cotangent is kept and
the kernel must follow the reference's convention for the derivative *at* the kink.

A safety factor ``SAFETY = 2`` multiplies the accumulation terms: they are worst-case bounds
already (typical error grows like sqrt(K), not K), so the factor only covers the constants above.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from kernels import activations

SAFETY = 2.0  # headroom on the worst-case accumulation bounds (see module docstring)
ACT_ULPS = 4.0  # ulps of acc allowed for evaluating a transcendental activation or its derivative


@dataclasses.dataclass(frozen=True)
class ActivationBounds:
    """``d1 = sup |act'|``, ``d2 = sup |act''|`` (away from kinks), ``exact``: evaluated without rounding."""
    d1: float
    d2: float
    kinks: tuple[float, ...] = ()
    exact: bool = False


def activation_bounds(name: str) -> ActivationBounds:
    """Bounds for ``name`` from ``kernels.activations``; unknown activations get conservative smooth
    bounds (d1=d2=1.5)."""
    act = activations.ACTIVATIONS.get(name)
    if act is None:
        return ActivationBounds(1.5, 1.5)
    return ActivationBounds(act.d1, act.d2, act.kinks, act.exact)


def derivative_scale(name: str, z: np.ndarray) -> np.ndarray:
    """How much rounding errors (relative, in the tanh or sigmoid inside it) can move ``act'(z)``,
    per unit of relative error: ``D1``, or more where ``act'`` is a small difference of large
    terms (gelu_tanh, silu; see the module docstring and ``kernels.activations``). Shape of ``z``,
    float64."""
    act = activations.ACTIVATIONS.get(name)
    if act is None:
        return np.full(np.shape(z), activation_bounds(name).d1)
    return act.derivative_scale(z)


def _finfo(dtype):
    import jax.numpy as jnp  # deferred: keeps this module importable without initialising jax
    return jnp.finfo(dtype)


def eps(dtype) -> float:
    """Machine epsilon of ``dtype`` (float16 2**-10, bfloat16 2**-7, float32 2**-23, float64 2**-52)."""
    return float(_finfo(dtype).eps)


def tiny(dtype) -> float:
    """Smallest normal number of ``dtype``."""
    return float(_finfo(dtype).tiny)


def accumulator(dtype) -> np.dtype:
    """The dtype the contract accumulates ``dtype`` inputs in: ``promote(dtype, float32)``."""
    import jax.numpy as jnp
    return np.dtype(jnp.promote_types(dtype, jnp.float32))


def mantissa_bits(dtype) -> int:
    return int(_finfo(dtype).nmant) + 1


def _as64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _binary_places(a: np.ndarray | None, limit: int) -> int | None:
    """The least ``e <= limit`` with every ``a * 2**e`` an integer (0 for None), else None.
    Scaling by a power of two is exact in float64, so the test itself cannot round."""
    if a is None:
        return 0
    if not np.all(np.isfinite(a)):
        return None
    for e in range(limit + 1):
        scaled = a * 2.0 ** e
        if np.all(scaled == np.round(scaled)):
            return e
    return None


def _exact_sums(x64, w64, b64, m, acc) -> bool:
    """Every product and partial sum of ``x @ w + b`` is exactly representable in ``acc``: all
    inputs are integer multiples of ``2**-e`` (x, w, b each their own e) and the largest sum of
    magnitudes ``m``, counted in units of the products' ``2**-(e_x + e_w)``, stays below
    ``2**mantissa_bits(acc)``."""
    bits = mantissa_bits(acc)
    ex, ew, eb = (_binary_places(a, bits) for a in (x64, w64, b64))
    if ex is None or ew is None or eb is None:
        return False
    unit = max(ex + ew, eb)
    return bool(np.all(m * 2.0 ** unit < 2.0 ** bits))


@dataclasses.dataclass
class FusedDenseBounds:
    """Per-element tolerances for one fused-dense call ``act(x @ w + b)``; all arrays float64.

    Attributes:
      z: ``[..., N]`` exact-ish pre-activation (float64 from the inputs as given).
      m: ``[..., N]`` ``|x| @ |w| + |b|``, the scale of every rounding error in ``z``.
      err_z: ``[..., N]`` bound on ``|z_candidate - z_reference|`` (0 where inputs make z exact).
      exact: every partial sum is exactly representable in the accumulator.
    """
    x: np.ndarray
    w: np.ndarray
    b: np.ndarray | None
    activation: str
    dtype: np.dtype
    z: np.ndarray
    m: np.ndarray
    err_z: np.ndarray
    exact: bool

    @classmethod
    def from_inputs(cls, x, w, b, activation: str) -> "FusedDenseBounds":
        dtype = np.dtype(x.dtype)
        x64, w64, b64 = _as64(x), _as64(w), _as64(b)
        with np.errstate(over="ignore", invalid="ignore"):
            z = x64 @ w64 + (0.0 if b64 is None else b64)
            m = np.abs(x64) @ np.abs(w64) + (0.0 if b64 is None else np.abs(b64))
        acc = accumulator(dtype)
        k_eff = w64.shape[0] + 1
        exact = _exact_sums(x64, w64, b64, m, acc)
        if exact:
            err_z = np.zeros_like(m)
        else:  # all-zero terms (m == 0) sum to exactly 0 in any order
            err_z = np.where(m == 0, 0.0, SAFETY * k_eff * eps(acc) * m + k_eff * tiny(acc))
        return cls(x64, w64, b64, activation, dtype, z, m, err_z, exact)

    # --- forward ---------------------------------------------------------------------------
    def forward(self, y_ref) -> np.ndarray:
        """Tolerance on ``|y_candidate - y_reference|``, shape of ``y``."""
        ab = activation_bounds(self.activation)
        acc, out = accumulator(self.dtype), self.dtype
        y = np.abs(_as64(y_ref))
        act_err = 0.0 if ab.exact else ACT_ULPS * eps(acc) * (y + np.abs(self.z))
        return ab.d1 * self.err_z + act_err + eps(out) * y + tiny(out)

    # --- gradients -------------------------------------------------------------------------
    def kink_mask(self) -> np.ndarray:
        """True where ``z`` is within rounding of a kink of the activation (derivative ambiguous)."""
        mask = np.zeros(self.z.shape, dtype=bool)
        for k in activation_bounds(self.activation).kinks:
            mask |= (np.abs(self.z - k) <= 4.0 * self.err_z) & (self.err_z > 0)
        return mask

    def _err_dz(self, g64: np.ndarray) -> np.ndarray:
        ab = activation_bounds(self.activation)
        acc, out = accumulator(self.dtype), self.dtype
        act_eval = ACT_ULPS * eps(acc) * derivative_scale(self.activation, self.z)
        return np.abs(g64) * (2.0 * ab.d2 * self.err_z + act_eval + ab.d1 * eps(out))

    def grads(self, g, grads_ref: dict) -> dict:
        """Tolerances for ``grad_x``, ``grad_w`` and (if b is given) ``grad_b`` for cotangent ``g``.

        ``grads_ref`` maps "x"/"w"/"b" to the reference's gradients (for the one-ulp store term).
        """
        ab = activation_bounds(self.activation)
        acc, out = accumulator(self.dtype), self.dtype
        g64 = np.abs(_as64(g))
        k, n = self.w.shape
        rows = int(np.prod(self.x.shape[:-1], dtype=np.int64))
        e_dz = self._err_dz(g64)
        floor_n = (n + 1) * tiny(acc) + tiny(out)
        floor_r = (rows + 1) * tiny(acc) + tiny(out)
        scale = ab.d1 * g64
        tols = {}
        with np.errstate(over="ignore", invalid="ignore"):
            if "x" in grads_ref:
                t = (e_dz + SAFETY * (n + 1) * eps(acc) * scale) @ np.abs(self.w).T
                tols["x"] = t + eps(out) * np.abs(_as64(grads_ref["x"])) + floor_n
            x2 = np.abs(self.x).reshape(rows, k)
            s_r = (e_dz + SAFETY * (rows + 1) * eps(acc) * scale).reshape(rows, n)
            if "w" in grads_ref:
                tols["w"] = x2.T @ s_r + eps(out) * np.abs(_as64(grads_ref["w"])) + floor_r
            if "b" in grads_ref:
                tols["b"] = s_r.sum(axis=0) + eps(out) * np.abs(_as64(grads_ref["b"])) + floor_r
        return tols


@dataclasses.dataclass(frozen=True)
class GenericTolerance:
    """For argument strategies other than the fused-dense contract: ``atol + rtol * |expected|``.

    ``rtol = atol = SAFETY * accumulation * eps(dtype)``, where ``accumulation`` is the length of
    the longest sum behind one output element (pass it; 8 is a guess for elementwise-ish code).
    """
    accumulation: int = 8

    def __call__(self, expected) -> np.ndarray:
        exp = np.asarray(expected)
        try:
            e = eps(exp.dtype)
        except ValueError:  # not a float dtype
            e = eps(np.float32)
        r = SAFETY * self.accumulation * e
        return r + r * np.abs(_as64(exp))
