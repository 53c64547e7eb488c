"""Hypothesis strategies for kernel tests: sizes, shapes, dtypes, activations, values, calls.

Arrays are not drawn element by element (a 128x128 matrix would blow Hypothesis's buffer and
shrink for ever). A call is drawn as a handful of *parameters* -- shapes, dtype, activation, a
value kind, a seed, a few special elements -- and built deterministically by
``make_fused_dense_call``. Hypothesis shrinks the parameters, and the smallest failing call is
printed as the ``make_fused_dense_call(...)`` expression that rebuilds it.

Value kinds (``VALUE_KINDS``):
  normal      standard normal.
  wide        log-uniform magnitudes over six decades, random signs (scales mixed in one sum).
  large       normal times a large scale (dtype-aware, so results stay finite in float16).
  zeros       mostly +0.0 and -0.0, with whole rows of x zero (relu's kink, computed exactly).
  kink        small integers with b = -(x @ w)[row 0]: pre-activations exactly at 0, exactly.
  near_kink   normal, with b = -(x @ w)[row 0] rounded: pre-activations within a few ulps of 0.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from kernels import activations as activations_table

ACTIVATIONS = activations_table.NAMES
DEFAULT_DTYPES = ("float32", "bfloat16", "float16")
VALUE_KINDS = ("normal", "wide", "large", "zeros", "kink", "near_kink")

# Hypothesis shrinks sampled_from towards the front: small and ordinary first.
EDGE_SIZES = (1, 2, 0)
PRIME_SIZES = (3, 5, 7, 11, 13, 17, 31, 61, 127)
BLOCK_SIZES = (8, 16, 32, 64, 128)  # the sizes kernels tile by, and one either side of them
NEAR_BLOCK_SIZES = (9, 15, 33, 63, 65, 129)
SIZES = EDGE_SIZES + PRIME_SIZES + BLOCK_SIZES + NEAR_BLOCK_SIZES
BATCH_SIZES = (1, 2, 3, 0, 4, 5)

DEFAULT_MAX_ELEMENTS = 1 << 15  # x + w + y elements per call: a memory (and compile-time) budget

# A few exact values Hypothesis may plant in the arrays; "L" and "-L" stand for +-large scale.
SPECIAL_VALUES = (0.0, -0.0, 1.0, -1.0, 0.5, -3.0, "L", "-L")


def dtypes(names=DEFAULT_DTYPES) -> st.SearchStrategy[str]:
    """Float dtype names, e.g. ``dtypes(("float32", "bfloat16"))``."""
    return st.sampled_from(tuple(names))


def activations(names=ACTIVATIONS) -> st.SearchStrategy[str]:
    """Activation names of the fused-dense contract."""
    return st.sampled_from(tuple(names))


def value_kinds(names=VALUE_KINDS) -> st.SearchStrategy[str]:
    return st.sampled_from(tuple(names))


def sizes(max_size: int = 129) -> st.SearchStrategy[int]:
    """A dimension: edges (0, 1), primes, block sizes and one either side, or anything up to ``max_size``."""
    listed = tuple(s for s in SIZES if s <= max_size)
    return st.one_of(st.sampled_from(listed), st.integers(0, max_size))


@st.composite
def fused_dense_shapes(draw, *, max_elements: int = DEFAULT_MAX_ELEMENTS, max_batch_dims: int = 2,
                       max_size: int = 129):
    """``(batch, K, N)``: x is ``batch + (K,)``, w ``(K, N)``, y ``batch + (N,)``.

    ``batch`` has 0 to ``max_batch_dims`` dims (0: x is a vector). The aspect is drawn:
    "square", "tall" (many rows, few outputs) or "wide" (few rows, many outputs). Calls over
    ``max_elements`` (x + w + y) are rejected with ``assume``.
    """
    aspect = draw(st.sampled_from(("square", "tall", "wide")))
    big = st.integers(max_size // 2, 4 * max_size)
    small = st.sampled_from((1, 2, 3, 5, 8))
    n_batch = draw(st.integers(0, max_batch_dims))
    batch = [draw(st.sampled_from(BATCH_SIZES)) for _ in range(max(n_batch - 1, 0))]
    if n_batch:
        batch.append(draw(big if aspect == "tall" else small if aspect == "wide" else sizes(max_size)))
    k = draw(sizes(max_size))
    n = draw(big if aspect == "wide" else small if aspect == "tall" else sizes(max_size))
    rows = math.prod(batch)
    assume(rows * k + k * n + rows * n <= max_elements)
    return tuple(batch), k, n


@dataclasses.dataclass(frozen=True, eq=False)
class Call:
    """Arguments for one call ``fn(*args, **kwargs)``; ``spec`` is how it was built (for messages)."""
    args: tuple
    kwargs: dict
    spec: str = ""

    def __repr__(self) -> str:
        if self.spec:
            return self.spec
        def show(a):
            return f"{np.dtype(a.dtype).name}{list(a.shape)}" if hasattr(a, "shape") else repr(a)
        parts = [show(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"Call({', '.join(parts)})"

    def describe(self) -> str:
        """Shapes and dtypes of the arrays, then the keyword arguments."""
        names = ("x", "w", "b") if len(self.args) == 3 else tuple(f"arg{i}" for i in range(len(self.args)))
        parts = []
        for name, a in zip(names, self.args):
            parts.append(f"{name}: {np.dtype(a.dtype).name}{list(a.shape)}" if hasattr(a, "shape") else f"{name}: {a!r}")
        parts += [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return "  ".join(parts)


def large_scale(dtype: str, k: int) -> float:
    """A large-magnitude scale for ``dtype`` that keeps ``K * scale**2`` (and ``|b|``) finite."""
    if dtype == "float16":  # max 65504
        return float(min(100.0, math.sqrt(2000.0 / max(k, 1))))
    return 1e4


def _np_dtype(name: str):
    import jax.numpy as jnp
    return jnp.dtype(name)


def _values(rng: np.random.Generator, kind: str, shape, scale: float) -> np.ndarray:
    if kind == "wide":
        mag = 10.0 ** rng.uniform(-3, 3, shape)
        return np.where(rng.random(shape) < 0.5, -mag, mag)
    if kind == "large":
        return rng.standard_normal(shape) * scale
    if kind == "zeros":
        v = rng.standard_normal(shape) * (rng.random(shape) < 0.3)
        return np.where((v == 0) & (rng.random(shape) < 0.5), -0.0, v)
    if kind == "kink":
        return rng.integers(-2, 3, shape).astype(np.float64)
    return rng.standard_normal(shape)  # normal, near_kink


def make_fused_dense_call(batch=(), k: int = 1, n: int = 1, *, dtype: str = "float32",
                          activation: str = "relu", bias: bool = True, values: str = "normal",
                          seed: int = 0, specials=()) -> Call:
    """Builds one fused-dense call deterministically (what the strategy draws, made concrete).

    Args:
      batch: leading dims of x (``()``: x is ``[K]``).
      k, n: contraction and output sizes; w is ``[k, n]``.
      dtype: one dtype for x, w and b.
      activation: the ``activation=`` keyword.
      bias: whether b is an array or None.
      values: a kind from ``VALUE_KINDS``.
      seed: NumPy seed for the values.
      specials: ``(array, position in [0, 1), value)`` triples planted after generation, value
        from ``SPECIAL_VALUES``.

    Returns:
      ``Call`` with NumPy ``args=(x, w, b)`` and ``kwargs={"activation": activation}``.
    """
    npd = _np_dtype(dtype)
    rng = np.random.default_rng(seed)
    batch = tuple(batch)
    scale = large_scale(dtype, k)
    x = _values(rng, values, batch + (k,), scale)
    w = _values(rng, values, (k, n), scale)
    b = _values(rng, values, (n,), scale) if bias else None
    if values == "zeros" and x.ndim > 1 and x.shape[0] and x.size:
        x[rng.random(x.shape[0]) < 0.5] = -0.0
        x[0] = 0.0
    arrays = {"x": x, "w": w, "b": b}
    for name, pos, val in specials:
        a = arrays.get(name)
        if a is None or a.size == 0:
            continue
        v = {"L": scale, "-L": -scale}.get(val, val)
        a.reshape(-1)[min(int(pos * a.size), a.size - 1)] = v
    x, w = x.astype(npd), w.astype(npd)
    if values in ("kink", "near_kink") and bias and x.size and n:
        row0 = x.reshape(-1, k)[0].astype(np.float64) @ w.astype(np.float64)
        b = -row0
    b = None if b is None else b.astype(npd)
    spec = (f"make_fused_dense_call(batch={batch}, k={k}, n={n}, dtype={dtype!r}, "
            f"activation={activation!r}, bias={bias}, values={values!r}, seed={seed}"
            + (f", specials={tuple(specials)!r}" if specials else "") + ")")
    return Call((x, w, b), {"activation": activation}, spec)


@st.composite
def fused_dense_calls(draw, *, dtypes=DEFAULT_DTYPES, activations=ACTIVATIONS, values=VALUE_KINDS,
                      max_elements: int = DEFAULT_MAX_ELEMENTS, max_batch_dims: int = 2,
                      max_size: int = 129, allow_no_bias: bool = True):
    """Calls of the fused-dense contract ``fn(x, w, b, activation=...)`` as ``Call`` objects.

    Example::

        @given(call=fused_dense_calls(dtypes=("float32",)))
        def test_my_kernel(call):
            x, w, b = call.args
            ...
    """
    batch, k, n = draw(fused_dense_shapes(max_elements=max_elements, max_batch_dims=max_batch_dims,
                                          max_size=max_size))
    dtype = draw(st.sampled_from(tuple(dtypes)))
    activation = draw(st.sampled_from(tuple(activations)))
    bias = draw(st.sampled_from((True, True, True, False))) if allow_no_bias else True
    kind = draw(st.sampled_from(tuple(values)))
    seed = draw(st.integers(0, 2**16 - 1))
    specials = draw(st.lists(st.tuples(st.sampled_from(("x", "w", "b")), st.floats(0, 1, exclude_max=True),
                                       st.sampled_from(SPECIAL_VALUES)), max_size=3))
    return make_fused_dense_call(batch, k, n, dtype=dtype, activation=activation, bias=bias,
                                 values=kind, seed=seed, specials=tuple(specials))


# Probe grid: pre-activations every 1/16 over [-8, 8] (exact in every dtype drawn), where the
# activations and their look-alikes differ most (gelu vs its tanh or sigmoid approximations at
# |z| ~ 1-3, silu vs x*sigmoid(1.1x) everywhere but 0), and relu's kink at 0.
PROBE_STEP = 1.0 / 16
PROBE_LIMIT = 8.0
PROBE_MIN = 0.25  # below it (0 aside), see probe_call
PROBE_BIAS = 0.5


def probe_call(activation: str, dtype: str = "float32") -> Call:
    """One targeted call per activation and dtype: ``x`` is ``[P, 1]``, ``w = [[1]]``, ``b = [0.5]``
    and ``x = z - 0.5``, so the pre-activations ``z`` are exactly a fixed grid over [-8, 8]
    (``PROBE_STEP``; every point exact in bfloat16 too), where the activation, its derivative and
    the bias add before it are checked at points a random search may never reach.

    ``0 < |z| < PROBE_MIN`` is left to the random search: with ``z`` this exact the tolerance is
    relative to ``|x| + |b|``, and an exactly equal rewrite such as ``tanh(z) = 2 sigmoid(2z) - 1``
    loses more than that to cancellation there.
    """
    npd = _np_dtype(dtype)
    z = np.arange(-PROBE_LIMIT, PROBE_LIMIT + PROBE_STEP / 2, PROBE_STEP)
    z = z[(np.abs(z) >= PROBE_MIN) | (z == 0)]
    x = (z - PROBE_BIAS)[:, None].astype(npd)
    w = np.ones((1, 1), npd)
    b = np.full((1,), PROBE_BIAS, npd)
    return Call((x, w, b), {"activation": activation}, f"probe_call({activation!r}, {dtype!r})")


def most_precise(dtypes) -> str:
    """The dtype with the smallest epsilon: where the tolerance is tightest, so a look-alike
    activation shows (in bfloat16 gelu and its tanh approximation round to the same values)."""
    import jax.numpy as jnp
    return min(dtypes, key=lambda d: float(jnp.finfo(d).eps))


def probe_calls(dtypes=DEFAULT_DTYPES, activations=ACTIVATIONS) -> list[Call]:
    """``probe_call`` for every activation and dtype, activation-major (the order they run in)."""
    return [probe_call(a, d) for a in activations for d in dtypes]


def as_call(drawn: Any) -> Call:
    """Accepts what an argument strategy draws: a ``Call``, or an ``(args, kwargs)`` pair."""
    if isinstance(drawn, Call):
        return drawn
    args, kwargs = drawn
    return Call(tuple(args), dict(kwargs))
