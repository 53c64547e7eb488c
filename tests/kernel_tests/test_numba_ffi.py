"""``kernels.numba_cpu._ffi``'s building blocks, where the kernels' tests cannot see them."""
from __future__ import annotations

from numba import carray, int32, njit

from kernels.numba_cpu import _ffi

_WORDS = 4096  # 16 KiB of int32: the w8a8 block's scratch


@njit
def _dirty(value):
    """Leaves ``value`` in a 16 KiB stack frame (below the caller's, where the next call's lands)."""
    buf = carray(_ffi.stack_buffer(_WORDS, int32, False), _WORDS)
    for i in range(_WORDS):
        buf[i] = value
    return buf[value % _WORDS]


@njit
def _zeroed_sum():
    buf = carray(_ffi.stack_buffer(_WORDS, int32, True), _WORDS)
    return buf.sum()


@njit
def _unfilled(i):
    buf = carray(_ffi.stack_buffer(_WORDS, int32, False), _WORDS)
    buf[i] = i
    return buf[i // 2]


def test_stack_buffer_is_zero_filled_only_when_asked():
    """``zeroed=True``: zeros at every call, whatever the stack held; ``zeroed=False``: no fill of
    the buffer in the compiled code (16 KiB of zeros cost about 1 µs a call of the w8a8 kernel,
    docs/benchmarks.md)."""
    for value in (7, -3):
        _dirty(value)
        assert _zeroed_sum() == 0
    _unfilled(3)
    fills = {name: sum("memset" in line for line in next(iter(fn.inspect_asm().values())).splitlines())
             for name, fn in (("zeroed", _zeroed_sum), ("unfilled", _unfilled))}
    assert fills["zeroed"] >= 1 and fills["unfilled"] == 0, fills
