"""exp, expm1, tanh, sigmoid and erf written as straight-line arithmetic, so that LLVM vectorises
the float32 epilogues (calls into libm stay scalar, an order of magnitude slower per element).

They compute in float64 and are accurate to a few float32 ulps (a few 1e-8 relative; erf
1.5e-7 absolute), which is what the float32 kernels need; float64 kernels keep libm.
Non-finite inputs give IEEE answers: nan propagates, exp(-inf) = 0, exp(inf) = inf.
"""
from __future__ import annotations

import math

from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

# inline="always": LLVM does not inline the nested ones (tanh -> expm1 -> exp) by itself, and a call
# left in an epilogue loop stops it vectorising.
_OPTS = dict(cache=True, fastmath=False, boundscheck=False, error_model="numpy", nogil=True, inline="always")

_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)
# Abramowitz & Stegun 7.1.26: erf(x) = 1 - t (a1 + t (a2 + ...)) exp(-x^2), t = 1 / (1 + p x),
# |error| <= 1.5e-7 for x >= 0.
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


@intrinsic
def _f64_from_bits(typingctx, bits):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.int64), codegen


@njit(**_OPTS)
def exp(x):
    """e**x for float64 x (relative error < 1e-8; 0 below -708, inf above 709)."""
    xc = min(max(x, -708.0), 709.0)
    n = math.floor(xc * _LOG2E + 0.5)
    r = xc - n * _LN2  # |r| <= ln2 / 2
    # Taylor to degree 8: the remainder (ln2/2)^9 / 9! < 2e-10.
    p = 1.0 + r * (1.0 + r * (1.0 / 2 + r * (1.0 / 6 + r * (1.0 / 24 + r * (1.0 / 120 + r * (
        1.0 / 720 + r * (1.0 / 5040 + r * (1.0 / 40320))))))))
    e = p * _f64_from_bits((int(n) + 1023) << 52)
    if x != x:
        return x
    return math.inf if x > 709.0 else e


@njit(**_OPTS)
def expm1(x):
    """e**x - 1, accurate near 0 (Taylor below |x| = 1/2, else from ``exp``)."""
    small = x * (1.0 + x * (1.0 / 2 + x * (1.0 / 6 + x * (1.0 / 24 + x * (1.0 / 120 + x * (
        1.0 / 720 + x * (1.0 / 5040 + x * (1.0 / 40320 + x * (1.0 / 362880)))))))))
    return small if abs(x) < 0.5 else exp(x) - 1.0


@njit(**_OPTS)
def tanh(x):
    """tanh through expm1(2|x|): no cancellation near 0, exactly +-1 far out."""
    a = abs(x)
    em = expm1(2.0 * min(a, 20.0))  # tanh(20) = 1 in float64
    t = em / (em + 2.0)
    return t if x >= 0 else (-t if x < 0 else x)  # the last branch: nan


@njit(**_OPTS)
def sigmoid(x):
    return 1.0 / (1.0 + exp(-x))


@njit(**_OPTS)
def erf(x):
    """erf to 1.5e-7 absolute (A&S 7.1.26), odd by construction."""
    a = min(abs(x), 6.0)  # erf(6) = 1 - 2e-17
    t = 1.0 / (1.0 + _AS_P * a)
    poly = t * (_AS_A[0] + t * (_AS_A[1] + t * (_AS_A[2] + t * (_AS_A[3] + t * _AS_A[4]))))
    e = 1.0 - poly * exp(-a * a)
    return e if x >= 0 else (-e if x < 0 else x)


def is_float32(a):
    """True for a float32 array, as a compile-time constant in Numba code."""
    return a.dtype.itemsize == 4


@overload(is_float32, jit_options={"cache": True})
def _is_float32(a):
    answer = isinstance(a, types.Array) and a.dtype == types.float32
    return lambda a: answer
