"""Numba kernels for ``y = act(x @ w + b)`` and its backward pass, on row-major 2-D arrays.

The arrays are views of XLA's buffers (``numba.carray``); outputs are written in place, and the
only allocations are scratch (packed panels of w or g, x transposed, g). Accumulation is in the
array dtype (float32 or float64); bfloat16/float16 are upcast to float32 by the caller.

Two GEMM forms, both register-tiled so that LLVM keeps the accumulators in vector registers:

- ``panel_gemm`` (forward, dX, dW): ``X @ W`` with W in NR-wide column panels (packed, or read
  in place when it stays in cache), an MR x NR accumulator tile (``TILES``: 8 x 32 with AVX-512,
  4 x 16 with AVX2; float64 has MR / 2 rows) whose rows are stored as vectors, X read in place
  through strides (x, g, or x.T) and broadcast from memory; the bias is the tiles' starting value
  and the activation is applied per block while it is in cache (the fused epilogue).
- ``gemm_nt``: ``a @ b.T`` with both operands read along their contiguous axis, 4 x 4 tiles of
  vectorised dot products: dX for a few rows against a large w, and the forward for N < 16.

Transposes (and the packing of w.T) move 16 x 16 blocks (8 x 8 in float64) through registers;
layers with a tiny w run as loops along M on transposed operands (``_tiny_forward``).

Big problems split into blocks that are shared, through an atomic counter, with helper tasks
on XLA's own intra-op thread pool (``XLA_FFI_ThreadPool_Schedule``): no second thread pool
competes with XLA's for the cores, and nothing here holds a lock or global state. A packed W is
packed by the blocks too, each column group by the first block to meet it (``_packed_group``),
so that the threads pack in parallel instead of waiting for the caller to pack all of W.

An activation's ``code`` in ``kernels.activations`` selects its epilogue and derivative; its
``saves`` says what the backward pass needs: the pre-activation ``z`` (gelu, gelu_tanh, silu), the
output ``y`` (tanh, sigmoid: their derivatives are ``1 - y**2`` and ``y * (1 - y)``; relu, see
below), or nothing (identity).

relu keeps ``jnp.maximum``'s derivative, 1/2 at z = 0, which y alone cannot tell from z < 0. Its
forward therefore reports whether any z was exactly 0 (a "tie", from ``activate``); without
ties the backward takes relu' from y, and with them it recomputes z (one more GEMM). Saving
z instead would cost a second [M, N] output on every call and twice the residual memory.

Compile time: the GEMM blocks, the two GEMMs, the forward, the backward and each activation's
epilogue and derivative are separate C-callable units (the factories ``*_unit``, compiled by
``_handlers``) that call each other by link-time name (``_link``), so that each is compiled once:
Numba would otherwise link, optimise and code-generate every callee again inside each caller. An
activation's units have its ``code`` as a constant, so a call compiles its own activation only.
Within a unit, thin wrappers are ``inline="always"`` (one level fewer), and constant arguments
that buy no speed go through ``_ffi.nonliteral`` (one specialisation per dtype instead of one per
call site).

Measured figures behind the thresholds and layouts here are in docs/benchmarks.md.
"""
from __future__ import annotations

import math
import os

import numpy as np
from numba import carray, njit, types

from kernels.activations import CODES
from kernels.machine import describe
from kernels.numba_cpu import _fastmath as _fm
from kernels.numba_cpu import _ffi, _link
from kernels.numba_cpu._pipeline import Compiler
from kernels.numba_cpu._ffi import nonliteral as _nl

# The activation codes the epilogues switch on, from the one table (module-level ints: Numba
# freezes them into the compiled code as constants).
IDENTITY = CODES["identity"]
RELU = CODES["relu"]
GELU = CODES["gelu"]
GELU_TANH = CODES["gelu_tanh"]
SILU = CODES["silu"]
TANH = CODES["tanh"]
SIGMOID = CODES["sigmoid"]
# An internal code, past every code of the table: relu's gradient taken from y, with no ties.
RELU_FROM_Y = max(CODES.values()) + 1

_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715

_OPTS = dict(cache=True, fastmath=True, boundscheck=False, error_model="numpy", nogil=True, pipeline_class=Compiler)
# Transcendental epilogues keep strict IEEE semantics (no fastmath): inf/nan inputs must give the
# reference's answers (e.g. sigmoid(-inf) = 0, tanh(inf) = 1).
_STRICT = dict(cache=True, fastmath=False, boundscheck=False, error_model="numpy", nogil=True, pipeline_class=Compiler)


def _unit(**options):
    """Marks a unit's factory: ``factory(nbtype, code)`` returns the function that ``_handlers``
    compiles as the unit, with these Numba options (those of the code it inlines)."""
    def mark(factory):
        factory.options = options
        return factory
    return mark


# Cache blocking (elements), a run-time record of int64 slots at the address ``blk`` that the
# handlers fill from the call's attributes: the values depend on the machine (``blocking.py``
# derives them), and Numba would freeze module globals into the compiled code and cache it keyed
# on the source alone. The register tile (MR x NR below) stays a constant: its accumulators must
# stay in registers.
# ``gemm_nt``: a block is mb rows of a by nb rows of b (the unit of work shared between threads),
# the reduction in lb-long passes (a 4 x lb strip of a in L1, the nb x lb panel of b in L2; long
# passes amortise each 4 x 4 tile's 16 horizontal sums).
# ``panel_gemm``: reduction blocks of kc, blocks of at most pmb rows (a multiple of MR) x pg panels.
# The backward's dW transposes x first from rows of dwt bytes (``backward_unit``).
BLOCKING_FIELDS = ("kc", "pg", "pmb", "mb", "nb", "lb", "dwt")  # the record's slots, in order
BLK_KC, BLK_PG, BLK_PMB, BLK_MB, BLK_NB, BLK_LB, BLK_DWT = (8 * i for i in range(len(BLOCKING_FIELDS)))
BLK_SLOTS = len(BLOCKING_FIELDS)  # a literal for stack_buffer


@njit(inline="always", **_STRICT)
def _exp(v, fast):
    return _fm.exp(v) if fast else math.exp(v)


@njit(inline="always", **_STRICT)
def _erf(v, fast):
    return _fm.erf(v) if fast else math.erf(v)


@njit(inline="always", **_STRICT)
def _tanh(v, fast):
    return _fm.tanh(v) if fast else math.tanh(v)


@njit(inline="always", **_STRICT)
def _sigmoid(v, fast):
    return 1.0 / (1.0 + _exp(-v, fast))


# Elements per chunk of an in-place transcendental epilogue (its scratch: 16 KiB in float32).
EPI_CHUNK = 4096


@njit(inline="always", **_STRICT)
def _relu_range(src, dst, lo, hi):
    """``dst[j] = max(src[j], 0)`` for j in [lo, hi), nan propagating; returns whether some
    ``src[j]`` is exactly 0 (a tie, +0 or -0). Inlined so that in place (src and dst the same
    variable) LLVM sees one pointer and vectorises without an overlap check; two views of one
    buffer would fail the check and run scalar. The tie test is a boolean or (cheaper than an
    integer count)."""
    zero = dst.dtype.type(0)  # a float64 0.0 would widen every float32 element and back
    ties = False
    for j in range(lo, hi):
        v = src[j]
        ties |= v == zero
        dst[j] = v if (v > zero or v != v) else zero
    return ties


# One function per activation and direction, ``out[j - ob] = act(src[j])`` for j in [lo, hi) and
# ``g[j] = dy[j] * act'(r[j])`` on 1-D arrays: a unit compiles only its own (``activate``,
# ``gradient``). float32 uses the vectorisable ``_fastmath`` functions (computed in float64, a
# few float32 ulps); float64 uses libm.
@njit(**_STRICT)
def _gelu(src, out, ob, lo, hi):
    fast = _fm.is_float32(out)
    for j in range(lo, hi):
        v = np.float64(src[j])
        out[j - ob] = 0.5 * v * (1.0 + _erf(v * _INV_SQRT_2, fast))


@njit(**_STRICT)
def _gelu_tanh(src, out, ob, lo, hi):
    fast = _fm.is_float32(out)
    for j in range(lo, hi):
        v = np.float64(src[j])
        out[j - ob] = 0.5 * v * (1.0 + _tanh(_SQRT_2_OVER_PI * (v + _GELU_C * v * v * v), fast))


@njit(**_STRICT)
def _silu(src, out, ob, lo, hi):
    fast = _fm.is_float32(out)
    for j in range(lo, hi):
        v = np.float64(src[j])
        out[j - ob] = v * _sigmoid(v, fast)


@njit(**_STRICT)
def _tanh_act(src, out, ob, lo, hi):
    fast = _fm.is_float32(out)
    for j in range(lo, hi):
        out[j - ob] = _tanh(np.float64(src[j]), fast)


@njit(**_STRICT)
def _sigmoid_act(src, out, ob, lo, hi):
    fast = _fm.is_float32(out)
    for j in range(lo, hi):
        out[j - ob] = _sigmoid(np.float64(src[j]), fast)


@njit(**_STRICT)
def _relu_grad(dy, r, g, from_y):
    """relu' from z (``jnp.maximum``'s: 1, 0 and 1/2 at the tie) or, ``from_y``, from y when no
    z was 0 (y > 0 exactly where z > 0; nan: 0, as from z)."""
    # Constants in g's dtype: float64 ones would widen every float32 element and back.
    one, half, zero = g.dtype.type(1), g.dtype.type(0.5), g.dtype.type(0)
    if from_y:
        for j in range(np.uint64(g.size)):
            g[j] = dy[j] * (one if r[j] > zero else zero)
        return
    for j in range(np.uint64(g.size)):
        v = r[j]
        g[j] = dy[j] * (one if v > zero else (half if v == zero else zero))


@njit(**_STRICT)
def _gelu_grad(dy, z, g):
    fast = _fm.is_float32(g)
    for j in range(np.uint64(g.size)):
        v = np.float64(z[j])
        g[j] = dy[j] * (0.5 * (1.0 + _erf(v * _INV_SQRT_2, fast)) + v * _INV_SQRT_2PI * _exp(-0.5 * v * v, fast))


@njit(**_STRICT)
def _gelu_tanh_grad(dy, z, g):
    fast = _fm.is_float32(g)
    for j in range(np.uint64(g.size)):
        v = np.float64(z[j])
        t = _tanh(_SQRT_2_OVER_PI * (v + _GELU_C * v * v * v), fast)
        g[j] = dy[j] * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * v * v))


@njit(**_STRICT)
def _silu_grad(dy, z, g):
    fast = _fm.is_float32(g)
    for j in range(np.uint64(g.size)):
        v = np.float64(z[j])
        sg = _sigmoid(v, fast)
        g[j] = dy[j] * (sg * (1.0 + v * (1.0 - sg)))


@njit(**_STRICT)
def _tanh_grad(dy, y, g):
    for j in range(np.uint64(g.size)):
        yv = y[j]
        g[j] = dy[j] * (1.0 - yv * yv)


@njit(**_STRICT)
def _sigmoid_grad(dy, y, g):
    for j in range(np.uint64(g.size)):
        yv = y[j]
        g[j] = dy[j] * (yv * (1.0 - yv))


@njit(**_STRICT)
def _rows(ld, i0, i1, j0, j1):
    """``(ld, runs, width)``, unsigned: the block ``[i0:i1, j0:j1]`` of an array with rows of ``ld``
    elements as ``runs`` ranges of ``width`` elements of the flattened array, one range when it
    holds whole rows (per-row overhead dominates a small block)."""
    ldu = np.uint64(ld)
    if j0 == 0 and j1 == ld:
        return ldu, np.uint64(1), np.uint64(i1 - i0) * ldu
    return ldu, np.uint64(i1 - i0), np.uint64(j1 - j0)


@_unit(**_STRICT)
def activate_unit(nbtype, code):
    """The unit ``activate_<name>`` of ``nbtype`` for the activation ``code`` (not identity; a
    constant, so Numba drops the other activations' branches unread): ``activate(z, y, rows, ld,
    i0, i1, j0, j1)`` sets ``y = act(z)`` on the block ``[i0:i1, j0:j1]`` of the ``[rows, ld]``
    arrays at z and y (y may be z: in place) and returns 1 if relu met a z that is exactly 0.

    Rows are ranges of the flattened arrays, not views: a row view costs as much as a narrow
    row's work, and a flat range with bounds keeps the unit stride LLVM needs to vectorise. In
    place, relu reads and writes one array (``_relu_range``) and a costly activation goes
    through a scratch range, as LLVM's runtime overlap check would send a loop between two
    aliasing views to its scalar version.
    """
    def activate(z, y, rows, ld, i0, i1, j0, j1):
        same = z == y
        zf = carray(_ffi.as_pointer(z, nbtype), rows * ld)
        yf = carray(_ffi.as_pointer(y, nbtype), rows * ld)
        ldu, nruns, width = _rows(ld, i0, i1, j0, j1)
        if code == RELU:  # no scratch: even an empty allocation is a large part of a small relu
            ties = False
            for r in range(nruns):
                start = (np.uint64(i0) + r) * ldu + np.uint64(j0)
                if same:
                    ties |= _relu_range(zf, zf, start, start + width)
                else:
                    ties |= _relu_range(zf, yf, start, start + width)
            return 1 if ties else 0
        # In place, the scratch covers one chunk of a range, not the whole block (which can be all
        # of a tall narrow layer's output).
        step = max(min(width, np.uint64(EPI_CHUNK)) if same else width, np.uint64(1))
        tmp = np.empty(np.int64(step) if same else 0, yf.dtype)
        for r in range(nruns):
            start = (np.uint64(i0) + r) * ldu + np.uint64(j0)
            for lo in range(start, start + width, step):
                hi = min(lo + step, start + width)
                # In place: the activation goes to tmp[j - lo] (out) and is copied back.
                out, ob = (tmp, lo) if same else (yf, np.uint64(0))
                if code == GELU:
                    _gelu(zf, out, ob, lo, hi)
                elif code == GELU_TANH:
                    _gelu_tanh(zf, out, ob, lo, hi)
                elif code == SILU:
                    _silu(zf, out, ob, lo, hi)
                elif code == TANH:
                    _tanh_act(zf, out, ob, lo, hi)
                elif code == SIGMOID:
                    _sigmoid_act(zf, out, ob, lo, hi)
                if same:
                    for j in range(lo, hi):
                        zf[j] = tmp[j - lo]
        return 0
    return activate


@_unit(**_STRICT)
def gradient_unit(nbtype, code):
    """The unit ``gradient_<name>`` of ``nbtype`` for the activation ``code`` (not identity; a
    constant): ``gradient(dy, r, g, n, act)`` sets ``g = dy * act'(.)`` on n elements from the
    residual r; ``act``: relu's ``RELU`` (r is z) or ``RELU_FROM_Y``."""
    def gradient(dy, r, g, n, act):
        dys, rs, gs = (carray(_ffi.as_pointer(dy, nbtype), n), carray(_ffi.as_pointer(r, nbtype), n),
                       carray(_ffi.as_pointer(g, nbtype), n))
        if code == RELU:
            _relu_grad(dys, rs, gs, act == RELU_FROM_Y)
        elif code == GELU:
            _gelu_grad(dys, rs, gs)
        elif code == GELU_TANH:
            _gelu_tanh_grad(dys, rs, gs)
        elif code == SILU:
            _silu_grad(dys, rs, gs)
        elif code == TANH:
            _tanh_grad(dys, rs, gs)
        elif code == SIGMOID:
            _sigmoid_grad(dys, rs, gs)
        return 0
    return gradient


@njit(**_STRICT)
def epilogue(z, y, bias, has_bias, act, act_unit, i0, i1, j0, j1):
    """``z += bias`` and ``y = act(z)`` on the block ``[i0:i1, j0:j1]``; ``y`` may be ``z``.
    Returns whether relu met a z that is exactly 0 (always False for other activations).

    The activation itself is the unit at address ``act_unit`` (``activate_unit``; unused for
    identity). One call per block, not per row: a call costs as much as the work of a short row.
    """
    zf, yf = _ffi.as_shape(z, z.size), _ffi.as_shape(y, y.size)
    ld, nruns, width = _rows(z.shape[1], i0, i1, j0, j1)
    if has_bias:
        for i in range(np.uint64(i0), np.uint64(i1)):
            base = i * ld
            for j in range(base + np.uint64(j0), base + np.uint64(j1)):
                zf[j] += bias[j - base]
    same = z.ctypes.data == y.ctypes.data
    if act != IDENTITY:
        return _link.call_address(act_unit, (z.ctypes.data, y.ctypes.data, z.shape[0], z.shape[1], i0, i1, j0,
                                             j1)) != 0
    if not same:
        for r in range(nruns):
            start = (np.uint64(i0) + r) * ld + np.uint64(j0)
            for j in range(start, start + width):
                yf[j] = zf[j]
    return False


@njit(**_STRICT)
def activation_grad(dy, r, g, act, grad_unit):
    """``g = dy * act'(.)`` from the residual ``r`` (z or y, the activation's ``saves``; relu: z, or y
    with ``act = RELU_FROM_Y``); all [M, N], processed as flat arrays (no per-row views, see
    ``activate_unit``). act' is the unit at address ``grad_unit`` (``gradient_unit``; unused for
    identity)."""
    if act != IDENTITY:
        _link.call_address(grad_unit, (dy.ctypes.data, r.ctypes.data, g.ctypes.data, dy.size, act))
        return
    dyr, gr = _ffi.as_shape(dy, dy.size), _ffi.as_shape(g, g.size)
    for j in range(np.uint64(dy.size)):
        gr[j] = dyr[j]


@njit(**_OPTS)
def _tile44(a, b, c, i, j, l0, l1, acc):
    """``c[i:i+4, j:j+4] (+)= a[i:i+4, l0:l1] @ b[j:j+4, l0:l1].T``.

    Sixteen scalar reductions over one contiguous loop: LLVM vectorises the l loop (fastmath
    allows the reassociation), keeping 16 vector accumulators in registers, 8 loads per 16 FMAs.
    """
    zero = c.dtype.type(0)
    a0, a1, a2, a3 = a[i], a[i + 1], a[i + 2], a[i + 3]
    b0, b1, b2, b3 = b[j], b[j + 1], b[j + 2], b[j + 3]
    s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = zero
    s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = zero
    for l in range(np.uint64(l0), np.uint64(l1)):  # unsigned: no negative-index wraparound
        x0, x1, x2, x3 = a0[l], a1[l], a2[l], a3[l]
        y0, y1, y2, y3 = b0[l], b1[l], b2[l], b3[l]
        s00 += x0 * y0
        s01 += x0 * y1
        s02 += x0 * y2
        s03 += x0 * y3
        s10 += x1 * y0
        s11 += x1 * y1
        s12 += x1 * y2
        s13 += x1 * y3
        s20 += x2 * y0
        s21 += x2 * y1
        s22 += x2 * y2
        s23 += x2 * y3
        s30 += x3 * y0
        s31 += x3 * y1
        s32 += x3 * y2
        s33 += x3 * y3
    if acc:
        s00 += c[i, j]
        s01 += c[i, j + 1]
        s02 += c[i, j + 2]
        s03 += c[i, j + 3]
        s10 += c[i + 1, j]
        s11 += c[i + 1, j + 1]
        s12 += c[i + 1, j + 2]
        s13 += c[i + 1, j + 3]
        s20 += c[i + 2, j]
        s21 += c[i + 2, j + 1]
        s22 += c[i + 2, j + 2]
        s23 += c[i + 2, j + 3]
        s30 += c[i + 3, j]
        s31 += c[i + 3, j + 1]
        s32 += c[i + 3, j + 2]
        s33 += c[i + 3, j + 3]
    c[i, j], c[i, j + 1], c[i, j + 2], c[i, j + 3] = s00, s01, s02, s03
    c[i + 1, j], c[i + 1, j + 1], c[i + 1, j + 2], c[i + 1, j + 3] = s10, s11, s12, s13
    c[i + 2, j], c[i + 2, j + 1], c[i + 2, j + 2], c[i + 2, j + 3] = s20, s21, s22, s23
    c[i + 3, j], c[i + 3, j + 1], c[i + 3, j + 2], c[i + 3, j + 3] = s30, s31, s32, s33


@njit(**_OPTS)
def _tile41(a, b, c, i, j, l0, l1, acc):
    """``c[i:i+4, j] (+)= a[i:i+4, l0:l1] @ b[j, l0:l1]`` (the right edge)."""
    zero = c.dtype.type(0)
    a0, a1, a2, a3, b0 = a[i], a[i + 1], a[i + 2], a[i + 3], b[j]
    s0 = s1 = s2 = s3 = zero
    for l in range(np.uint64(l0), np.uint64(l1)):  # unsigned: no negative-index wraparound
        y = b0[l]
        s0 += a0[l] * y
        s1 += a1[l] * y
        s2 += a2[l] * y
        s3 += a3[l] * y
    if acc:
        s0, s1, s2, s3 = s0 + c[i, j], s1 + c[i + 1, j], s2 + c[i + 2, j], s3 + c[i + 3, j]
    c[i, j], c[i + 1, j], c[i + 2, j], c[i + 3, j] = s0, s1, s2, s3


@njit(**_OPTS)
def _tile14(a, b, c, i, j, l0, l1, acc):
    """``c[i, j:j+4] (+)= a[i, l0:l1] @ b[j:j+4, l0:l1].T`` (the bottom edge)."""
    zero = c.dtype.type(0)
    a0, b0, b1, b2, b3 = a[i], b[j], b[j + 1], b[j + 2], b[j + 3]
    s0 = s1 = s2 = s3 = zero
    for l in range(np.uint64(l0), np.uint64(l1)):  # unsigned: no negative-index wraparound
        x = a0[l]
        s0 += x * b0[l]
        s1 += x * b1[l]
        s2 += x * b2[l]
        s3 += x * b3[l]
    if acc:
        s0, s1, s2, s3 = s0 + c[i, j], s1 + c[i, j + 1], s2 + c[i, j + 2], s3 + c[i, j + 3]
    c[i, j], c[i, j + 1], c[i, j + 2], c[i, j + 3] = s0, s1, s2, s3


@njit(**_OPTS)
def _tile11(a, b, c, i, j, l0, l1, acc):
    s = c.dtype.type(0)
    a0, b0 = a[i], b[j]
    for l in range(np.uint64(l0), np.uint64(l1)):  # unsigned: no negative-index wraparound
        s += a0[l] * b0[l]
    c[i, j] = s + c[i, j] if acc else s


@njit(inline="always", **_OPTS)
def _block(a, b, c, i0, i1, j0, j1, lb):
    """``c[i0:i1, j0:j1] = a[i0:i1] @ b[j0:j1].T`` (a: [M, L], b: [N, L], both row-major).

    4 x 4 register tiles; the reduction is cut into ``lb``-long passes so that the rows of b in
    use (j1 - j0 of them) stay in L2 while each 4-row strip of a is reused from L1.
    """
    L = a.shape[1]
    if L == 0:
        c[i0:i1, j0:j1] = 0
        return
    for l0 in range(0, L, lb):
        l1 = min(l0 + lb, L)
        acc = l0 > 0
        i = i0
        while i + 4 <= i1:
            j = j0
            while j + 4 <= j1:
                _tile44(a, b, c, i, j, l0, l1, acc)
                j += 4
            while j < j1:
                _tile41(a, b, c, i, j, l0, l1, acc)
                j += 1
            i += 4
        while i < i1:
            j = j0
            while j + 4 <= j1:
                _tile14(a, b, c, i, j, l0, l1, acc)
                j += 4
            while j < j1:
                _tile11(a, b, c, i, j, l0, l1, acc)
                j += 1
            i += 1


@njit(inline="always", **_OPTS)
def _grid_block(a, b, c, t, nbj, mb, nb, lb):
    """Block ``t`` of the (mb x nb) grid of ``gemm_nt``."""
    M, N = c.shape
    i0, j0 = (t // nbj) * mb, (t % nbj) * nb
    _block(a, b, c, i0, min(i0 + mb, M), j0, min(j0 + nb, N), lb)


# A GEMM's blocks are a "job": a block of int64 slots that describes the operands, read by the
# unit ``blocks`` (``blocks_unit``), which claims blocks with an atomic counter until none is left.
# On the calling thread alone the job lives on its stack. Shared, it is malloc'd and also run by
# helper tasks scheduled on XLA's intra-op pool; any number of helpers (none, if the pool runs
# tasks inline or late) is correct, and the last party to let go of the job frees it, so a
# helper that starts after the work is done touches only the job, never the (by then released)
# buffers. Slots after the header, per kind: 0 = ``gemm_nt`` blocks, 1 = ``panel_gemm`` blocks,
# 2 = ``_mlp_sgd``'s models (its slots stay clear of the header and ``_J_TIES``).
_J_NEXT, _J_DONE, _J_REFS, _J_KIND, _J_NBLOCKS = 0, 8, 16, 24, 32
_J_BYTES = 256
_J_SLOTS = _J_BYTES // 8  # a literal for stack_buffer
# shared: operand sizes (kind 0: c [M, N] = a [M, L] @ b [N, L].T; kind 1: y [M, N], w [L, N])
_J_M, _J_N, _J_L, _J_B = 80, 88, 96, 48
# kind 0 (gemm_nt)
_J_A, _J_C, _J_NBJ, _J_MB, _J_NB, _J_LB = 40, 56, 120, 128, 136, 144
# kind 1 (panel_gemm)
_J_BIAS, _J_Y, _J_HAS_BIAS, _J_ACT = 64, 72, 104, 112
_J_XF, _J_SR, _J_SL, _J_WP, _J_PACKED, _J_Z, _J_SAVE_Z, _J_NGROUPS = 152, 160, 168, 176, 184, 192, 200, 208
_J_TIES = 216  # kind 1: nonzero once a block's relu met a z that is exactly 0
_J_ACT_UNIT = 224  # kind 1: the activation's unit (``epilogue``)
_J_KC, _J_PMB = 232, 240  # kind 1: the blocking (``panel_gemm``)
_J_PACK_FLAGS = 248  # kind 1, packed: int64 [ngroups, 2], per column group (claimed, packed)
# kind 1, _J_PACKED: w read in place, or packed into wp by each column group's first block, from
# w [L, N] or from w.T given as [N, L]
_IN_PLACE, _PACK_W, _PACK_WT = 0, 1, 2
_ADDRESS = (1 << 56) - 1  # a shared job's address, below the helper count (``start_job``)
# What the package's other jobs (kind 2) use of this: the claim and done counters, the flag that
# ``finish_job`` returns (there: a model's scratch could not be allocated), the address mask.
NEXT, DONE, FLAG, ADDRESS = _J_NEXT, _J_DONE, _J_TIES, _ADDRESS
# The slots each kind's unit fills, in the order of the values it passes to ``_put``.
_NT_SLOTS = (_J_A, _J_B, _J_C, _J_M, _J_N, _J_L, _J_NBJ, _J_MB, _J_NB, _J_LB)
_PANEL_SLOTS = (_J_XF, _J_SR, _J_SL, _J_B, _J_WP, _J_PACKED, _J_BIAS, _J_HAS_BIAS, _J_Y, _J_Z, _J_M, _J_N, _J_L,
                _J_SAVE_Z, _J_ACT, _J_ACT_UNIT, _J_NGROUPS, _J_KC, _J_PMB, _J_PACK_FLAGS)


@njit(inline="always", **_OPTS)
def _claim_nt(job, a, b, c, nblocks, nbj, mb, nb, lb):
    """Runs ``gemm_nt`` blocks of the job until none is left unclaimed."""
    while True:
        t = _ffi.atomic_add(job + _J_NEXT, 1)
        if t >= nblocks:
            return
        _grid_block(a, b, c, t, nbj, mb, nb, lb)
        _ffi.atomic_add(job + _J_DONE, 1)


@njit(inline="always", **_OPTS)
def _group_panels(npan, ngroups, g):
    """``(p0, p1)``: the panels of column group ``g`` of ``ngroups`` (equal groups of whole panels,
    the last shorter or empty), as ``_panel_block`` computes with them and ``_packed_group`` packs."""
    pg = (npan + ngroups - 1) // ngroups
    return g * pg, min(g * pg + pg, npan)


@njit(inline="always", **_OPTS)
def _packed_group(w, wp, mode, flags, g, ngroups):
    """Column group ``g``'s panels of wp, packed: by this thread if it is the first to meet the
    group (the group's first block, claimed before its others), else waited for. Groups are packed
    in parallel, not by the caller before the blocks start."""
    slot = flags.ctypes.data + 16 * g
    if _ffi.atomic_load(slot + 8) == 0:
        if _ffi.atomic_add(slot, 1) == 0:
            p0, p1 = _group_panels(wp.shape[0], ngroups, g)
            if p0 < p1:
                if mode == _PACK_WT:  # w is w.T, [N, L]: its rows p0 * NR on are the group's columns
                    pack_panels_t(w[p0 * NR:min(p1 * NR, w.shape[0])], wp[p0:p1])
                else:
                    pack_panels(w, wp[p0:p1], p0 * NR)
            _ffi.atomic_add(slot + 8, 1)
        else:
            while _ffi.atomic_load(slot + 8) == 0:
                _ffi.cpu_yield()


@njit(inline="always", **_OPTS)
def _claim_panel(job, xf, sr, sl, w, wp, mode, flags, bias, has_bias, y, z, save_z, act, act_unit, nblocks, ngroups,
                 kc, pmb):
    """Runs ``panel_gemm`` blocks of the job until none is left unclaimed, packing each column
    group of w at its first block (``_packed_group``) unless w is read in place; a block's relu tie
    is recorded in the job (before the block counts as done)."""
    packed = mode != _IN_PLACE
    while True:
        t = _ffi.atomic_add(job + _J_NEXT, 1)
        if t >= nblocks:
            return
        if packed:
            _packed_group(w, wp, mode, flags, t % ngroups, ngroups)
        if _panel_block(xf, sr, sl, w, wp, packed, bias, has_bias, y, z, save_z, act, act_unit, t, ngroups, kc, pmb):
            _ffi.atomic_add(job + _J_TIES, 1)
        _ffi.atomic_add(job + _J_DONE, 1)


@njit(inline="always", **_OPTS)
def release(job):
    """Lets go of a shared job; the last party frees it."""
    if _ffi.atomic_add(job + _J_REFS, -1) == 1:
        _ffi.c_free(job)


@_unit(**_OPTS)
def blocks_unit(nbtype, code):
    """The unit ``blocks`` of ``nbtype``: ``blocks(job)``, run by the calling thread and by each
    helper task, claims the job's blocks until none is left (the caller or the task then lets go
    of the job)."""
    def blocks(job):
        ld = _ffi.load_i64
        m, n, l = ld(job + _J_M), ld(job + _J_N), ld(job + _J_L)
        if ld(job + _J_KIND) == 0:
            a = carray(_ffi.as_pointer(ld(job + _J_A), nbtype), (m, l))
            b = carray(_ffi.as_pointer(ld(job + _J_B), nbtype), (n, l))
            c = carray(_ffi.as_pointer(ld(job + _J_C), nbtype), (m, n))
            _claim_nt(job, a, b, c, ld(job + _J_NBLOCKS), ld(job + _J_NBJ), ld(job + _J_MB), ld(job + _J_NB),
                      ld(job + _J_LB))
            return 0
        y = carray(_ffi.as_pointer(ld(job + _J_Y), nbtype), (m, n))
        bias = carray(_ffi.as_pointer(ld(job + _J_BIAS), nbtype), (n,))
        mode = ld(job + _J_PACKED)
        ngroups = ld(job + _J_NGROUPS)
        xf = carray(_ffi.as_pointer(ld(job + _J_XF), nbtype), (m * l,))
        # w [L, N], or w.T as [N, L] (``_PACK_WT``: then only packed from, never read in place).
        w = carray(_ffi.as_pointer(ld(job + _J_B), nbtype), (n, l) if mode == _PACK_WT else (l, n))
        wp = carray(_ffi.as_pointer(ld(job + _J_WP), nbtype), ((n + NR - 1) // NR if mode != _IN_PLACE else 1, l, NR))
        flags = carray(_ffi.as_pointer(ld(job + _J_PACK_FLAGS), types.int64), (ngroups, 2))
        z = carray(_ffi.as_pointer(ld(job + _J_Z), nbtype), (m, n))
        _claim_panel(job, xf, ld(job + _J_SR), ld(job + _J_SL), w, wp, mode, flags, bias, ld(job + _J_HAS_BIAS) == 1,
                     y, z, ld(job + _J_SAVE_Z) == 1, ld(job + _J_ACT), ld(job + _J_ACT_UNIT), ld(job + _J_NBLOCKS),
                     ngroups, ld(job + _J_KC), ld(job + _J_PMB))
        return 0
    return blocks


@njit(inline="always", **_OPTS)
def _init_job(job, refs, kind, nblocks):
    st = _ffi.store_i64
    st(job + _J_NEXT, 0)
    st(job + _J_DONE, 0)
    st(job + _J_REFS, refs)
    st(job + _J_KIND, kind)
    st(job + _J_NBLOCKS, nblocks)
    st(job + _J_TIES, 0)
    return job


@njit(inline="always", **_OPTS)
def _put(job, slots, values):
    """``job[slots[i]] = values[i]`` (int64 tuples)."""
    for i in range(len(slots)):
        _ffi.store_i64(job + slots[i], values[i])


@njit(inline="always", **_OPTS)
def start_job(frame, task, nblocks, kind):
    """The job for ``nblocks`` blocks: slots on the calling unit's stack when they run on the
    calling thread only, else a malloc'd job with the number of helpers to schedule in the top
    byte of its address (addresses are < 2**56; ``_ADDRESS`` masks it off)."""
    local = _link.address_of(_ffi.stack_buffer(_J_SLOTS, np.int64, True))
    if task == 0 or nblocks < 2:
        return _init_job(local, 1, kind, nblocks)
    helpers = _ffi.threadpool_num_threads(frame)
    if helpers < 0:
        _ffi.destroy_error(frame, -helpers)
        return _init_job(local, 1, kind, nblocks)
    # The calling thread works too: with as many helpers as pool threads, one more thread than
    # cores would contend for them.
    helpers = min(helpers - 1, nblocks - 1)
    if helpers <= 0:
        return _init_job(local, 1, kind, nblocks)
    job = _ffi.c_malloc(_J_BYTES)
    if job == 0:
        return _init_job(local, 1, kind, nblocks)
    return _init_job(job, helpers + 1, kind, nblocks) | (helpers << 56)


@njit(inline="always", **_OPTS)
def schedule_helpers(frame, task, tagged):
    """Schedules the helper tasks of a job made by ``start_job`` (if any) on XLA's pool; returns
    the job's address."""
    job, helpers = tagged & _ADDRESS, tagged >> 56
    for _ in range(helpers):
        err = _ffi.threadpool_schedule(frame, task, job)
        if err != 0:  # that helper will never run: drop its reference
            _ffi.destroy_error(frame, err)
            _ffi.atomic_add(job + _J_REFS, -1)
    return job


@njit(inline="always", **_OPTS)
def _run_job(frame, task, tagged, like):
    """Schedules the helpers of a job made by ``start_job`` (if any), then runs blocks on the
    calling thread (the unit ``blocks`` of ``like``'s dtype); returns the job's address."""
    job = schedule_helpers(frame, task, tagged)
    _link.call("blocks", like, (job,))
    return job


@njit(**_OPTS)
def finish_job(job, shared, nblocks):
    """After the calling thread ran out of blocks: waits for the helpers' blocks and lets go of
    a ``shared`` job. Returns whether a block recorded a relu tie (``_J_TIES``; panel jobs only).
    The caller's own scratch that the blocks read must stay alive until then (``_link.keep``).
    """
    while _ffi.atomic_load(job + _J_DONE) < nblocks:
        _ffi.cpu_yield()
    ties = _ffi.atomic_load(job + _J_TIES) != 0
    if shared:
        release(job)
    return ties


@_unit(**_OPTS)
def gemm_nt_unit(nbtype, code):
    """The unit ``gemm_nt`` of ``nbtype``: ``gemm_nt(a, b, c, M, N, L, frame, task, blk)`` sets
    ``c = a @ b.T`` (a: [M, L], b: [N, L], c: [M, N], all row-major) in mb x nb blocks of the
    blocking record at ``blk``.

    With ``task`` (the address of the dtype's helper task, 0 for none) the blocks are shared
    with helpers on XLA's intra-op thread pool, reached through the call ``frame``.
    """
    def gemm_nt(a, b, c, M, N, L, frame, task, blk):
        mb, nb, lb = _ffi.load_i64(blk + BLK_MB), _ffi.load_i64(blk + BLK_NB), _ffi.load_i64(blk + BLK_LB)
        nbj = (N + nb - 1) // nb
        nblocks = ((M + mb - 1) // mb) * nbj
        tagged = start_job(frame, task, nblocks, 0)
        job = tagged & _ADDRESS
        _put(job, _NT_SLOTS, (a, b, c, M, N, L, nbj, mb, nb, lb))
        finish_job(_run_job(frame, task, tagged, nbtype), tagged != job, nblocks)
        return 0
    return gemm_nt


@njit(inline="always", **_OPTS)
def call_gemm_nt(a, b, c, frame, task, blk):
    """``gemm_nt`` (its unit) on C-contiguous arrays."""
    _link.call("gemm_nt", c, (a.ctypes.data, b.ctypes.data, c.ctypes.data, c.shape[0], c.shape[1], a.shape[1], frame,
                              task, blk))
    _link.keep((a, b, c))


# Panel GEMM: ``c = X @ w`` with w packed into column panels of NR (zero-padded), X read in place
# through strides (x itself, or x transposed). The MR x NR accumulator tile lives in registers
# (a stack buffer indexed only by constants); each step of the reduction broadcasts MR values of
# X and streams one contiguous NR-wide row of the panel. No transpose of anything is needed.
# The cache blocks around it (kc, pg, pmb) come from the blocking record: a tile's strip of X
# (MR x kc) stays in L1, a block's packed panels (kc x pg*NR) in L2.
# The tile is compiled in, one per vector width (float32 rows x columns; float64 has MR / 2 rows
# of NR): its accumulators, the panel row and a broadcast must fit the vector registers.
TILES = {
    512: (8, 32),  # AVX-512: 16 of the 32 zmm registers accumulate (2 a row)
    256: (4, 16),  # AVX/AVX2: 8 of the 16 ymm (6 x 16, BLIS's Haswell tile, spilled: docs/benchmarks.md)
    128: (4, 8),  # SSE and narrower: 8 of the 16 xmm registers
}
TILE_ENV = "JAXNET_NUMBA_TILE"  # "MRxNR", one of TILES' values: another width's tile (tests, comparisons)


def register_tile(vector_bits: int) -> tuple[int, int]:
    """``(MR, NR)`` for a machine's widest float vector (``Machine.vector_bits``)."""
    return TILES[max(b for b in TILES if b <= max(vector_bits, min(TILES)))]


def _tile_in_force() -> tuple[int, int]:
    """This process's tile: ``$JAXNET_NUMBA_TILE`` if set, else this machine's."""
    text = os.environ.get(TILE_ENV, "")
    if not text:
        return register_tile(describe().vector_bits)
    known = {f"{mr}x{nr}": (mr, nr) for mr, nr in TILES.values()}
    if text not in known:
        raise ValueError(f"${TILE_ENV} must be one of {sorted(known)}, got {text!r:.80}")
    return known[text]


MR, NR = _tile_in_force()  # rows per register tile (float32; float64: ``_mr``), columns per panel
_TILE = MR * NR  # a literal for stack_buffer


@njit(**_OPTS)
def pack_panels(w, wp, c0):
    """``wp[p, k, jj] = w[k, c0 + p * NR + jj]``, zero past N. w: [K, N], wp: [ceil((N - c0) / NR), K, NR]."""
    K, N = w.shape
    for p in range(wp.shape[0]):
        j0 = c0 + p * NR
        cols = min(NR, N - j0)
        for k in range(np.uint64(K)):
            wk, dst = w[k], wp[p, k]
            for jj in range(np.uint64(cols)):
                dst[jj] = wk[np.uint64(j0) + jj]
            for jj in range(np.uint64(cols), np.uint64(NR)):
                dst[jj] = 0


@njit(**_OPTS)
def pack_panels_t(wt, wp):
    """``pack_panels(wt.T, wp, 0)`` without forming the transpose: wt: [N, K], wp: [ceil(N / NR), K, NR].

    Each panel is the transpose of NR rows of wt (``_transpose_tile``), zero-padded.
    """
    N, K = wt.shape
    wtf = _ffi.as_shape(wt, wt.size)
    v = _tv(wt)
    for p in range(wp.shape[0]):
        j0 = p * NR
        cols = min(NR, N - j0)
        dst = wp[p]
        # The panel is the transpose of wt[j0 : j0 + cols, :] (row length NR).
        _transpose_tile(wtf, K, _ffi.as_shape(dst, dst.size), NR, j0, j0 + cols, 0, K, j0, v)
        for k in range(np.uint64(K)):
            for jj in range(cols, NR):
                dst[k, jj] = 0


@njit(inline="always", **_OPTS)
def _mr(a):
    """Rows per register tile for ``a``'s dtype, a compile-time constant: MR in float32; MR / 2
    in float64, whose NR columns take twice the vectors a row."""
    return MR if _fm.is_float32(a) else MR // 2


@njit(**_OPTS)
def _panel_tiles(xf, sr, sl, i0, i1, bf, ps, ls, p0, p1, l0, l1, dst, acc_in, bias, has_bias):
    """``dst[i0:i1, panels p0:p1] (+)= X[i0:i1, l0:l1] @ B[l0:l1, panels p0:p1]``, register tile
    by register tile, with ``X[r, l] = xf[r*sr + l*sl]`` and ``B[l, p*NR + jj] = bf[p*ps + l*ls + jj]``
    (packed panels: ``ps = K*NR, ls = NR``; w read in place: ``ps = NR, ls = N``, full panels
    only, as ``bf[p*ps + l*ls + jj]`` must be in bounds for every jj < NR).

    With ``has_bias``, on the first pass over the reduction (not ``acc_in``) every tile starts
    from the bias row instead of zero, so the bias costs no pass of its own over the block.

    A tile is ``_mr(dst)`` rows high (the float64 tile skips the rows from MR / 2) and NR wide. In a short
    last tile, rows past the end repeat the last valid row of X (in bounds; computed, never
    stored). All tiles of a block in one call: a call per tile (arguments, reference counts)
    would cost a large part of a small GEMM.
    """
    mr = _mr(dst)
    N = dst.shape[1]
    ld = np.uint64(N)
    df = _ffi.as_shape(dst, dst.size)
    tile = _ffi.stack_buffer(_TILE, dst.dtype, True)
    acc, accf = carray(tile, (MR, NR)), carray(tile, (_TILE,))
    edge = carray(_ffi.stack_buffer(_TILE, dst.dtype, True), (MR, NR))
    su, lsu, psu = np.uint64(sl), np.uint64(ls), np.uint64(ps)
    add_bias = has_bias and not acc_in
    for r0 in range(i0, i1, mr):
        rows = min(mr, i1 - r0)
        o0 = np.uint64(r0 * sr)
        o1 = np.uint64((r0 + min(1, rows - 1)) * sr)
        o2 = np.uint64((r0 + min(2, rows - 1)) * sr)
        o3 = np.uint64((r0 + min(3, rows - 1)) * sr)
        o4 = np.uint64((r0 + min(4, rows - 1)) * sr)
        o5 = np.uint64((r0 + min(5, rows - 1)) * sr)
        o6 = np.uint64((r0 + min(6, rows - 1)) * sr)
        o7 = np.uint64((r0 + min(7, rows - 1)) * sr)
        for p in range(p0, p1):
            j0 = p * NR
            if add_bias and j0 + NR <= N:
                for r in range(mr):
                    _ffi.vector_copy(accf, r * NR, bias, j0, NR, False)
            elif add_bias:
                # Columns past N (a partial panel) repeat the last bias; they are never stored.
                for jj in range(NR):
                    bv = bias[min(j0 + jj, N - 1)]
                    for r in range(mr):
                        acc[r, jj] = bv
            else:
                for r in range(mr):
                    for jj in range(NR):
                        acc[r, jj] = 0
            bp = np.uint64(p) * psu
            for l in range(np.uint64(l0), np.uint64(l1)):
                ol, bl = l * su, bp + l * lsu
                # In bounds for any rows; those past mr are unused (and dropped by LLVM).
                a0, a1, a2, a3 = xf[o0 + ol], xf[o1 + ol], xf[o2 + ol], xf[o3 + ol]
                a4, a5, a6, a7 = xf[o4 + ol], xf[o5 + ol], xf[o6 + ol], xf[o7 + ol]
                for jj in range(np.uint64(NR)):
                    v = bf[bl + jj]
                    acc[0, jj] += a0 * v
                    if mr > 1:  # compile-time constants: no branch is left in the loop
                        acc[1, jj] += a1 * v
                    if mr > 2:
                        acc[2, jj] += a2 * v
                    if mr > 3:
                        acc[3, jj] += a3 * v
                    if mr > 4:
                        acc[4, jj] += a4 * v
                    if mr > 5:
                        acc[5, jj] += a5 * v
                    if mr > 6:
                        acc[6, jj] += a6 * v
                    if mr > 7:
                        acc[7, jj] += a7 * v
            cols = min(NR, N - j0)
            if rows == mr and cols == NR:  # constant indices only: acc stays in registers
                for r in range(mr):
                    _ffi.vector_copy(df, np.uint64(r0 + r) * ld + np.uint64(j0), accf, r * NR, NR, acc_in)
                continue
            for r in range(mr):
                for jj in range(NR):
                    edge[r, jj] = acc[r, jj]
            for r in range(rows):
                d = dst[r0 + r]
                for jj in range(cols):
                    d[j0 + jj] = edge[r, jj] + d[j0 + jj] if acc_in else edge[r, jj]


@njit(inline="always", **_OPTS)
def _panel_block(xf, sr, sl, w, wp, packed, bias, has_bias, y, z, save_z, act, act_unit, t, ngroups, kc, pmb):
    """Block ``t`` of ``panel_gemm`` (at most ``pmb`` rows, a multiple of MR, x ``ngroups``'s
    share of the panels; all blocks of one size), reduced in ``kc``-long passes, then its
    epilogue; returns whether relu met a tie (``epilogue``).

    Accumulates in z (if ``save_z``) or y; w is read from its packed panels ``wp`` or, when not
    ``packed``, in place (only the last, partial panel is packed, as ``wp[0]``).
    """
    M, N = y.shape
    K = wp.shape[1]
    npan = (N + NR - 1) // NR
    nfull = N // NR
    acc = z if save_z else y
    # Blocks of equal size (rows in whole register tiles), at most pmb rows x pg panels: with
    # pmb-row blocks, 80 rows had split 64 + 16 between two threads. As pmb is a multiple of MR,
    # the rounding up to whole tiles never leaves a block empty.
    nrb = (M + pmb - 1) // pmb
    rows = ((M + nrb - 1) // nrb + MR - 1) // MR * MR
    i0 = (t // ngroups) * rows
    i1 = min(i0 + rows, M)
    p0, p1 = _group_panels(npan, ngroups, t % ngroups)
    wpf = _ffi.as_shape(wp, wp.size)
    for k0 in range(0, max(K, 1), kc):
        k1 = min(k0 + kc, K)
        if packed:
            _panel_tiles(xf, sr, sl, i0, i1, wpf, K * NR, _nl(NR), p0, p1, k0, k1, acc, k0 > 0, bias, has_bias)
            continue
        _panel_tiles(xf, sr, sl, i0, i1, _ffi.as_shape(w, w.size), _nl(NR), N, p0, min(p1, nfull), k0, k1, acc, k0 > 0,
                     bias, has_bias)
        if p1 > nfull:  # the partial last panel, packed alone as wp[0] (panel index nfull, ps = 0)
            _panel_tiles(xf, sr, sl, i0, i1, wpf, _nl(0), _nl(NR), nfull, p1, k0, k1, acc, k0 > 0, bias, has_bias)
    if act != IDENTITY or save_z:
        j0, j1 = p0 * NR, min(p1 * NR, N)
        return epilogue(acc, y, bias, _nl(False), act, act_unit, i0, i1, j0, j1)
    return False


# Below this many columns of dy, dX always uses the panel form on w.T: each dot product of
# the dot form would be too short to pay for its horizontal sums.
DOT_MIN_N = 64
# From this many rows of dy, dX uses the panel form whatever the size of w (packing w.T is then
# repaid), and from DX_PANEL_MIN_M_SMALL_W rows when w has at most DX_PANEL_SMALL_W elements
# (in L2: packing it is cheap). Below, with a large w, the dot form (packing would dominate).
DX_PANEL_MIN_M = 256
DX_PANEL_MIN_M_SMALL_W = 64
DX_PANEL_SMALL_W = 1 << 16
# Up to UNPACKED_MAX_M rows of X, W is read in place: packing it would cost more than it saves.
# Up to UNPACKED_MAX_M_SMALL_W rows too, when W has at most ``_unpacked_max_w_bytes`` bytes:
# with 8 or fewer register-tile strips reusing it, a W that stays in cache is read as fast in
# place as packed (a 1024^2 float32 W loses: its 4 KiB rows alias in L1; float64 gains only at
# 64^2, hence the per-dtype limit).
UNPACKED_MAX_M = 32
UNPACKED_MAX_M_SMALL_W = 64
# dW = x.T @ g reads x.T in place, a stride of x's row a step: from rows of the blocking's dwt
# bytes (``blocking.derive``: a page, where those steps all fall in one L1 set) x is transposed
# first, where g has enough columns (DW_TRANSPOSE_MIN_N) to repay the copy (docs/benchmarks.md).
DW_TRANSPOSE_MIN_N = 512


@njit(inline="always", **_OPTS)
def _unpacked_max_w_bytes(a):
    """A compile-time constant per dtype: 2 MiB in float32, 32 KiB (64^2) in float64."""
    return (1 << 21) if _fm.is_float32(a) else (1 << 15)


@njit(**_OPTS)
def _read_in_place(m, w):
    """Whether ``panel_gemm`` with M = ``m`` rows reads ``w`` (not transposed) in place."""
    return m <= UNPACKED_MAX_M or (m <= UNPACKED_MAX_M_SMALL_W and w.nbytes <= _unpacked_max_w_bytes(w))


@_unit(**_OPTS)
def panel_gemm_unit(nbtype, code):
    """The unit ``panel_gemm`` of ``nbtype``: ``panel_gemm(xf, sr, sl, w, w_rows, w_cols, bias,
    has_bias, y, z, M, N, save_z, act, act_unit, frame, task, w_t, blk)`` sets ``y = act(X @ W + b)``
    (and ``z = X @ W + b`` if ``save_z``), ``y, z: [M, N]``, and returns 1 if relu met a tie
    (``epilogue``). ``X: [M, K]`` is read as ``xf[r * sr + l * sl]``; W: [K, N] is the
    ``[w_rows, w_cols]`` array w, or its transpose if ``w_t`` (packed straight from its rows); the
    bias b: [N]. Blocks (kc, pg, pmb of the blocking record at ``blk``) shared with XLA's pool as
    in ``gemm_nt_unit``.
    """
    def panel_gemm(xf, sr, sl, w, w_rows, w_cols, bias, has_bias, y, z, M, N, save_z, act, act_unit, frame, task,
                   w_t, blk):
        kc, pg, pmb = _ffi.load_i64(blk + BLK_KC), _ffi.load_i64(blk + BLK_PG), _ffi.load_i64(blk + BLK_PMB)
        wa, w_t = carray(_ffi.as_pointer(w, nbtype), (w_rows, w_cols)), w_t != 0
        K = w_cols if w_t else w_rows
        npan = (N + NR - 1) // NR
        # W is read in place only when it is not transposed and M is small (so ``w``'s shape, as
        # the helpers rebuild it, matters only then).
        packed = w_t or not _read_in_place(M, wa)
        ngroups = (npan + pg - 1) // pg
        if task != 0 and M <= pmb and ngroups == 1:
            # One panel a block, so that a problem of one row block still has blocks to share.
            ngroups = npan
        if packed:  # each column group packed by its first block (``_packed_group``)
            wp = np.empty((npan, K, NR), wa.dtype)  # (panels, K, NR)
        elif N % NR:  # only the partial last panel
            wp = np.empty((1, K, NR), wa.dtype)
            pack_panels(wa, wp, N // NR * NR)
        else:  # nothing to pack: a view of w stands in for wp (never read; no allocation)
            wp = _ffi.as_shape(wa, (1, K, N))
        flags = np.zeros((ngroups if packed else 1, 2), np.int64)
        mode = _PACK_WT if w_t else _PACK_W if packed else _IN_PLACE
        nblocks = ((M + pmb - 1) // pmb) * ngroups
        tagged = start_job(frame, task, nblocks, 1)
        job = tagged & _ADDRESS
        _put(job, _PANEL_SLOTS, (xf, sr, sl, w, np.int64(wp.ctypes.data), np.int64(mode), bias, has_bias,
                                 y, z, M, N, K, save_z, act, act_unit, np.int64(ngroups), kc, pmb,
                                 np.int64(flags.ctypes.data)))
        ties = finish_job(_run_job(frame, task, tagged, nbtype), tagged != job, nblocks)
        _link.keep((wp, flags))  # this function's scratch, read by the blocks
        return 1 if ties else 0
    return panel_gemm


@njit(inline="always", **_OPTS)
def call_panel_gemm(xf, sr, sl, w, bias, has_bias, y, z, save_z, act, act_unit, frame, task, w_t, blk):
    """``panel_gemm`` (its unit) on C-contiguous arrays: xf flat, w 2-D, bias [N], y and z [M, N]."""
    ties = _link.call("panel_gemm", y, (xf.ctypes.data, sr, sl, w.ctypes.data, w.shape[0], w.shape[1],
                                        bias.ctypes.data, has_bias, y.ctypes.data, z.ctypes.data, y.shape[0],
                                        y.shape[1], save_z, act, act_unit, frame, task, w_t, blk))
    _link.keep((xf, w, bias, y, z))
    return ties != 0


@njit(inline="always", **_OPTS)
def _tv(a):
    """Side of ``_ffi.transpose_block``'s square block for ``a``'s dtype (a compile-time
    constant): one 64-byte vector a row, 16 in float32, 8 in float64."""
    return 16 if _fm.is_float32(a) else 8


@njit(inline="always", **_OPTS)
def _transpose_tile(af, lda, of, ldo, i0, i1, j0, j1, shift, v):
    """``of[j*ldo + i - shift] = af[i*lda + j]`` for i in [i0, i1), j in [j0, j1): a tile of a
    transpose on flat arrays (``shift`` moves it left in the output): v x v register blocks
    (``_ffi.transpose_block``), the ragged edges element by element."""
    ib, jb = i0 + (i1 - i0) // v * v, j0 + (j1 - j0) // v * v
    for i in range(i0, ib, v):
        for j in range(j0, jb, v):
            _ffi.transpose_block(af, np.uint64(i * lda + j), np.uint64(lda), of, np.uint64(j * ldo + i - shift),
                                 np.uint64(ldo))
    # Unsigned indices: no negative-index wraparound checks in the inner loops.
    la, lo, sh = np.uint64(lda), np.uint64(ldo), np.uint64(shift)
    for j in range(np.uint64(jb), np.uint64(j1)):  # right edge, all rows
        for i in range(np.uint64(i0), np.uint64(i1)):
            of[j * lo + i - sh] = af[i * la + j]
    for j in range(np.uint64(j0), np.uint64(jb)):  # bottom edge
        for i in range(np.uint64(ib), np.uint64(i1)):
            of[j * lo + i - sh] = af[i * la + j]


@njit(**_OPTS)
def transpose(a, out):
    """``out[:] = a.T`` in 32 x 32 tiles (both sides touch whole cache lines); a plain copy when
    either side is 1.

    The tiles are register-transposed blocks (``_transpose_tile``) except where element-by-element
    tiles measured faster: a side shorter than a block, and a tall ``a`` (over 512 rows, under
    1024 columns).
    """
    M, N = a.shape
    v = _tv(a)
    if M == 1 or N == 1:
        af, of = _ffi.as_shape(a, a.size), _ffi.as_shape(out, out.size)
        for i in range(np.uint64(a.size)):
            of[i] = af[i]
    elif M >= v and N >= v and (M <= 512 or N >= 1024):
        af, of = _ffi.as_shape(a, a.size), _ffi.as_shape(out, out.size)
        for i0 in range(0, M, 32):
            for j0 in range(0, N, 32):
                _transpose_tile(af, N, of, M, i0, min(i0 + 32, M), j0, min(j0 + 32, N), 0, v)
    else:
        for i0 in range(0, M, 32):
            i1 = min(i0 + 32, M)
            for j0 in range(0, N, 32):
                j1 = min(j0 + 32, N)
                # Unsigned indices: no negative-index wraparound checks in the inner loops.
                for j in range(np.uint64(j0), np.uint64(j1)):
                    for i in range(np.uint64(i0), np.uint64(i1)):
                        out[j, i] = a[i, j]


# w with at most this many elements: forward and backward run as plain loops along M (the
# GEMMs' fixed costs, packing and 8 x 32 tiles, would outweigh the arithmetic).
TINY_W = 64


@njit(**_OPTS)
def _column_forward(x, w, b, has_bias, y, z, save_z, act, act_unit):
    """``forward`` for one column (N = 1) and a tiny w: a dot product of each row of x with w,
    four rows at a time (four independent sums in flight), no transposes or scratch: the
    transposed layout of ``_tiny_forward`` spends most of its time transposing x.
    """
    M, K = x.shape
    xf, wf = _ffi.as_shape(x, M * K), _ffi.as_shape(w, K)
    out = _ffi.as_shape(z if save_z else y, M)
    zero = x.dtype.type(0)
    b0 = b[0] if has_bias else zero
    ku, one = np.uint64(K), np.uint64(1)
    m4 = np.uint64(M // 4 * 4)
    for i in range(np.uint64(0), m4, np.uint64(4)):
        r0 = i * ku
        r1 = r0 + ku
        r2 = r1 + ku
        r3 = r2 + ku
        s0 = s1 = s2 = s3 = zero
        for l in range(ku):
            wl = wf[l]
            s0 += xf[r0 + l] * wl
            s1 += xf[r1 + l] * wl
            s2 += xf[r2 + l] * wl
            s3 += xf[r3 + l] * wl
        out[i] = s0 + b0
        out[i + one] = s1 + b0
        out[i + 2 * one] = s2 + b0
        out[i + 3 * one] = s3 + b0
    for i in range(m4, np.uint64(M)):
        r0 = i * ku
        s0 = zero
        for l in range(ku):
            s0 += xf[r0 + l] * wf[l]
        out[i] = s0 + b0
    if save_z or act != IDENTITY:
        return epilogue(_ffi.as_shape(out, (1, M)), _ffi.as_shape(y, (1, M)), b, _nl(False), act, act_unit, _nl(0),
                        _nl(1), _nl(0), M)
    return False


@njit(**_OPTS)
def _tiny_forward(x, w, b, has_bias, y, z, save_z, act, act_unit):
    """``forward`` for a tiny w (K * N <= ``TINY_W``) of more than one column (one column:
    ``_column_forward``), in the transposed layout: ``y.T[j]`` is a sum of K scaled rows of x.T,
    then bias and activation along those rows, so every inner loop runs along M (loops along K
    or N would be a few iterations each, all overhead). With K = 1, x is x.T.
    """
    M, K = x.shape
    N = w.shape[1]
    if K != 1:
        xt = np.empty((K, M), x.dtype)  # (K, M)
        transpose(x, xt)
    else:
        xt = _ffi.as_shape(x, (1, M))
    at = np.empty((N, M), x.dtype)  # (N, M)
    mu = np.uint64(M)
    for j in range(N):
        aj = at[j]
        for i in range(mu):
            aj[i] = 0
        for l in range(K):
            wv, xl = w[l, j], xt[l]
            for i in range(mu):
                aj[i] += wv * xl[i]
        if has_bias:
            bv = b[j]
            for i in range(mu):
                aj[i] += bv
    if save_z:
        transpose(at, z)
    ties = False
    if act != IDENTITY:  # elementwise: row by row of at
        ties = epilogue(at, at, b, _nl(False), act, act_unit, _nl(0), N, _nl(0), M)
    transpose(at, y)
    return ties


# Below this many columns of w the forward pass uses the dot form (``gemm_nt`` on w.T): a
# 32-wide panel would be mostly zero padding.
NARROW_N = 16


@_unit(**_OPTS)
def forward_unit(nbtype, code):
    """The unit ``forward`` of ``nbtype``: ``forward(x, w, b, y, z, M, K, N, has_bias, save_z, act,
    act_unit, frame, task, blk)`` sets ``y = act(x @ w + b)`` and, if ``save_z``, ``z = x @ w + b``, and
    returns 1 if relu met a z that is exactly 0.

    x: [M, K], w: [K, N], b: [N] (ignored unless ``has_bias``), y: [M, N], z: [M, N] or unused;
    ``act_unit``: the address of the activation's unit (``epilogue``); ``blk``: the address of
    the blocking record.
    w is packed once into NR-wide column panels (unless ``_read_in_place``); x is read in place; bias
    and activation are applied to each block right after it is computed. For N below
    ``NARROW_N``, dot products of x's rows with w's columns (w transposed once, it is small);
    for a tiny w, ``_column_forward`` (one column) or ``_tiny_forward``.
    """
    def forward(x, w, b, y, z, M, K, N, has_bias, save_z, act, act_unit, frame, task, blk):
        x, w, b = (carray(_ffi.as_pointer(x, nbtype), (M, K)), carray(_ffi.as_pointer(w, nbtype), (K, N)),
                   carray(_ffi.as_pointer(b, nbtype), N))
        y, z = carray(_ffi.as_pointer(y, nbtype), (M, N)), carray(_ffi.as_pointer(z, nbtype), (M, N))
        has_bias, save_z = has_bias != 0, save_z != 0
        if K * N <= TINY_W:
            if N == 1:
                return 1 if _column_forward(x, w, b, has_bias, y, z, save_z, act, act_unit) else 0
            return 1 if _tiny_forward(x, w, b, has_bias, y, z, save_z, act, act_unit) else 0
        if N < NARROW_N:
            acc = z if save_z else y
            wt = np.empty((N, K), w.dtype)  # (N, K)
            transpose(w, wt)
            call_gemm_nt(x, wt, acc, frame, task, blk)
            if has_bias or act != IDENTITY or save_z:
                return 1 if epilogue(acc, y, b, has_bias, act, act_unit, _nl(0), M, _nl(0), N) else 0
            return 0
        ties = call_panel_gemm(_ffi.as_shape(x, M * K), K, 1, w, b, has_bias, y, z, save_z, act, act_unit, frame, task,
                               False, blk)
        return 1 if ties else 0
    return forward


@njit(inline="always", **_OPTS)
def call_forward(x, w, b, has_bias, y, z, save_z, act, act_unit, frame, task, blk):
    """``forward`` (its unit) on C-contiguous arrays."""
    M, K = x.shape
    ties = _link.call("forward", x, (x.ctypes.data, w.ctypes.data, b.ctypes.data, y.ctypes.data, z.ctypes.data, M, K,
                                     w.shape[1], has_bias, save_z, act, act_unit, frame, task, blk))
    _link.keep((x, w, b, y, z))
    return ties != 0


# Up to this many rows of w (K), a one-column backward runs as ``_column_backward``; above,
# the loops along K of ``_tiny_backward`` vectorise and the row-wise form loses.
COLUMN_MAX_K = 15
_COLUMN_ACC = COLUMN_MAX_K + 1  # a literal for stack_buffer


@njit(**_OPTS)
def _column_backward(dy, x, w, r, act, grad_unit, dx, dw, db, has_bias):
    """``backward`` for one column (N = 1) and K <= ``COLUMN_MAX_K``, in one pass over the rows
    of x and dx, eight at a time: ``dw[l]`` gains eight products per pass (one dependency chain
    step per eight rows) and ``dx[i, l] = g[i] * w[l]`` is stored beside it; no transposes
    (which ``_tiny_backward``'s layout pays for).
    """
    M, K = x.shape
    g = np.empty(M, dy.dtype)  # (M,)
    activation_grad(_ffi.as_shape(dy, (1, M)), _ffi.as_shape(r, (1, M)), _ffi.as_shape(g, (1, M)), act, grad_unit)
    zero = dy.dtype.type(0)
    if has_bias:
        s = zero
        for i in range(np.uint64(M)):
            s += g[i]
        db[0] = s
    xf, wf, dxf = _ffi.as_shape(x, M * K), _ffi.as_shape(w, K), _ffi.as_shape(dx, M * K)
    ku, one = np.uint64(K), np.uint64(1)
    acc = _ffi.stack_buffer(_COLUMN_ACC, dy.dtype, True)  # dw's sums: a stack buffer aliases nothing
    for l in range(ku):
        acc[l] = zero
    m8 = np.uint64(M // 8 * 8)
    for i in range(np.uint64(0), m8, np.uint64(8)):
        g0, g1, g2, g3 = g[i], g[i + one], g[i + 2 * one], g[i + 3 * one]
        g4, g5, g6, g7 = g[i + 4 * one], g[i + 5 * one], g[i + 6 * one], g[i + 7 * one]
        for l in range(ku):
            o, wl = i * ku + l, wf[l]
            x0, x1, x2, x3 = xf[o], xf[o + ku], xf[o + 2 * ku], xf[o + 3 * ku]
            x4, x5, x6, x7 = xf[o + 4 * ku], xf[o + 5 * ku], xf[o + 6 * ku], xf[o + 7 * ku]
            acc[l] += ((x0 * g0 + x1 * g1) + (x2 * g2 + x3 * g3)) + ((x4 * g4 + x5 * g5) + (x6 * g6 + x7 * g7))
            dxf[o] = g0 * wl
            dxf[o + ku] = g1 * wl
            dxf[o + 2 * ku] = g2 * wl
            dxf[o + 3 * ku] = g3 * wl
            dxf[o + 4 * ku] = g4 * wl
            dxf[o + 5 * ku] = g5 * wl
            dxf[o + 6 * ku] = g6 * wl
            dxf[o + 7 * ku] = g7 * wl
    for i in range(m8, np.uint64(M)):
        g0 = g[i]
        for l in range(ku):
            o = i * ku + l
            acc[l] += xf[o] * g0
            dxf[o] = g0 * wf[l]
    for l in range(K):
        dw[l, 0] = acc[l]


@njit(**_OPTS)
def _tiny_backward(dy, x, w, r, act, grad_unit, dx, dw, db, has_bias):
    """``backward`` for a tiny w (K * N <= ``TINY_W``), in the transposed layout of
    ``_tiny_forward``: ``g.T = dy.T * act'(r.T)`` row by row, ``db[j]`` the sum of row j,
    ``dw[l, j]`` a dot product of two rows and ``dx.T[l]`` a sum of N scaled rows. With N = 1
    dy and r are their own transposes, and dx is formed in place as ``g[i] * w[l]`` (a
    transpose back from dx.T cost more than the products); with K = 1, x and dx are too."""
    M, N = dy.shape
    K = x.shape[1]
    mu = np.uint64(M)
    if N != 1:
        dyt = np.empty((N, M), dy.dtype)  # (N, M)
        transpose(dy, dyt)
        rt = np.empty((N, M), r.dtype)  # (N, M)
        transpose(r, rt)
    else:
        dyt, rt = _ffi.as_shape(dy, (1, M)), _ffi.as_shape(r, (1, M))
    gt = np.empty((N, M), dy.dtype)  # (N, M)
    activation_grad(dyt, rt, gt, act, grad_unit)
    if has_bias:
        for j in range(N):
            gj = gt[j]
            s = dy.dtype.type(0)
            for i in range(mu):
                s += gj[i]
            db[j] = s
    if K != 1:
        xt = np.empty((K, M), x.dtype)  # (K, M)
        transpose(x, xt)
    else:
        xt = _ffi.as_shape(x, (1, M))
    if N == 1:
        g0 = gt[0]
        for l in range(K):
            xl = xt[l]
            s = dy.dtype.type(0)
            for i in range(mu):
                s += xl[i] * g0[i]
            dw[l, 0] = s
        ku = np.uint64(K)
        dxf, wf = _ffi.as_shape(dx, dx.size), _ffi.as_shape(w, w.size)
        for i in range(mu):
            gv = g0[i]
            for l in range(ku):
                dxf[i * ku + l] = gv * wf[l]
        return
    dxt = np.empty((K, M), x.dtype) if K != 1 else _ffi.as_shape(dx, (1, M))  # (K, M)
    for l in range(K):
        xl, dl, wl = xt[l], dxt[l], w[l]
        for i in range(mu):
            dl[i] = 0
        for j in range(N):
            gj, wv = gt[j], wl[j]
            s = dy.dtype.type(0)
            for i in range(mu):
                dl[i] += wv * gj[i]
                s += xl[i] * gj[i]
            dw[l, j] = s
    if K != 1:
        transpose(dxt, dx)


@njit(**_OPTS)
def _column_sums(gf, M, N, db):
    """``db[j] = sum_i g[i, j]`` for ``g: [M, N]`` given flat as ``gf``.

    Four rows per pass over db: row by row, each db element waits on its own store from the
    previous row (store-to-load forwarding); four rows halve that chain's length per element.
    """
    nu, mu = np.uint64(N), np.uint64(M)
    for j in range(nu):
        db[j] = 0
    m4 = mu // np.uint64(4) * np.uint64(4)
    for i in range(np.uint64(0), m4, np.uint64(4)):
        b0 = i * nu
        b1 = b0 + nu
        b2 = b1 + nu
        b3 = b2 + nu
        for j in range(nu):
            db[j] += (gf[b0 + j] + gf[b1 + j]) + (gf[b2 + j] + gf[b3 + j])
    for i in range(m4, mu):
        base = i * nu
        for j in range(nu):
            db[j] += gf[base + j]


@_unit(**_OPTS)
def backward_unit(nbtype, code):
    """The unit ``backward`` of ``nbtype``: ``backward(dy, x, w, b, r, dx, dw, db, M, K, N, ties, act,
    grad_unit, has_bias, frame, task, blk)`` sets the gradients of ``y = act(x @ w + b)`` given ``dy``
    and the residual ``r`` (what the activation ``saves``); ``grad_unit``: the address of the
    activation's unit (``activation_grad``).

    dy, r: [M, N]; x: [M, K]; w: [K, N]; b: [N] (read only for relu with ties, if
    ``has_bias``); dx: [M, K]; dw: [K, N]; db: [N] (if ``has_bias``).
    relu: r is y and ``ties`` what its forward returned. Without ties relu' comes from y; with
    them z is recomputed by ``forward`` itself (the same blocks, so the same z to the bit) and
    relu' (1/2 at z = 0) taken from it.
    ``g = dy * act'`` is formed once (one pass over dy and r) and feeds all three products:
    ``db = sum_i g``;
    ``dx = g @ w.T``: panel form (w.T packed straight from w's rows), or the dot form (g and w
    both read along N) when M is too small to repay packing a large w (``DX_PANEL_*``);
    ``dw = x.T @ g``: panel form with x.T read in place through strides and g as the panels, or
    from x transposed first where its rows alias in L1 (the blocking's dwt, ``DW_TRANSPOSE_MIN_N``);
    for N <= NR (panels mostly padding) as ``dw.T = g.T @ x``, the small [N, K] result then transposed.
    Each choice compares the elements that the extra passes move (transposes, packing): all
    forms do the same multiply-adds in the same order. A tiny w goes to
    ``_column_backward`` (one column, K <= ``COLUMN_MAX_K``) or ``_tiny_backward``.
    """
    def backward(dy, x, w, b, r, dx, dw, db, M, K, N, ties, act, grad_unit, has_bias, frame, task, blk):
        dy, r = carray(_ffi.as_pointer(dy, nbtype), (M, N)), carray(_ffi.as_pointer(r, nbtype), (M, N))
        x, dx = carray(_ffi.as_pointer(x, nbtype), (M, K)), carray(_ffi.as_pointer(dx, nbtype), (M, K))
        w, dw = carray(_ffi.as_pointer(w, nbtype), (K, N)), carray(_ffi.as_pointer(dw, nbtype), (K, N))
        b, db = carray(_ffi.as_pointer(b, nbtype), N), carray(_ffi.as_pointer(db, nbtype), N)
        has_bias = has_bias != 0
        if act == RELU:
            if ties:
                z = np.empty((M, N), dy.dtype)  # (M, N)
                call_forward(x, w, b, has_bias, z, z, False, IDENTITY, 0, frame, task, blk)
                r = z
            else:
                act = RELU_FROM_Y
        if N == 1 and K <= COLUMN_MAX_K:
            _column_backward(dy, x, w, r, act, grad_unit, dx, dw, db, has_bias)
            return 0
        if K * N <= TINY_W:
            _tiny_backward(dy, x, w, r, act, grad_unit, dx, dw, db, has_bias)
            return 0
        g = np.empty((M, N), dy.dtype)  # (M, N)
        activation_grad(dy, r, g, act, grad_unit)
        gf = _ffi.as_shape(g, M * N)
        if has_bias:
            _column_sums(gf, M, N, db)
        if N < DOT_MIN_N or M >= DX_PANEL_MIN_M or (M >= DX_PANEL_MIN_M_SMALL_W and K * N <= DX_PANEL_SMALL_W):
            call_panel_gemm(gf, N, 1, w, db, False, dx, dx, False, IDENTITY, 0, frame, task, True, blk)
        else:
            call_gemm_nt(g, w, dx, frame, task, blk)
        if N <= NR:
            dwt = np.empty((N, K), x.dtype)  # (N, K)
            call_panel_gemm(gf, 1, N, x, db, False, dwt, dwt, False, IDENTITY, 0, frame, task, False, blk)
            transpose(dwt, dw)
        else:
            # X = x.T, g as the panels: read in place (X[k, i] = x[i, k]: each step of the reduction
            # broadcasts MR adjacent elements of one row of x), or from x transposed first.
            xf, sr, sl = _ffi.as_shape(x, M * K), 1, K
            if K * x.itemsize >= _ffi.load_i64(blk + BLK_DWT) and N >= DW_TRANSPOSE_MIN_N:
                xt = np.empty((K, M), x.dtype)  # (K, M)
                transpose(x, xt)
                xf, sr, sl = _ffi.as_shape(xt, K * M), M, 1
            call_panel_gemm(xf, sr, sl, g, db, False, dw, dw, False, IDENTITY, 0, frame, task, False, blk)
        return 0
    return backward
