"""How the numba backend's FFI calls batch under ``jax.vmap``: a ``custom_vmap`` rule each.

``ffi_call``'s own ``vmap_method="broadcast_all"`` puts the batch in front of every operand, so an
unbatched w ``[K, N]`` became ``[B, K, N]``: B copies of w for B small products (at B = 256,
K = N = 1024, a GiB and 60x the time of XLA's one dot). The rules (``backend`` defines them with
the helpers here) see which operands are batched:

- **fold** (w, and what the kernel reads with it, unbatched): the batch is a bigger M. One call
  on ``[B*M, ...]`` rows, its results reshaped back to ``[B, M, ...]``; the folded call goes
  through the rule again, so nested vmaps fold into one call too. (The backward folds dx; its
  per-element dw and db come from XLA, see ``backend._backward_call``.)
- **sequential** (w unbatched, another shared operand batched, such as b): ``lax.map`` over the
  batch, one call per element, w read in place.
- **broadcast** (w batched): ``broadcast_all``, the handlers looping over the batch; what gets
  copied is an unbatched x or b, one element's worth each.

The FFI calls have no derivatives of their own (``backend`` differentiates them through
``kernels.autodiff.with_reference_jvp``, outside this ``custom_vmap``), so ``custom_vmap``, which
supports no reverse-mode AD, is safe here.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap


def call(ffi: Callable, operands: Sequence, rule: Callable) -> list:
    """``ffi(*operands)`` as a list of results, batched under vmap by ``rule``.

    ``rule(axis_size, in_batched, *operands)`` returns ``(results, results_batched)`` (lists),
    with every batched operand's batch moved to axis 0 (``jax.custom_batching.custom_vmap``).
    """
    fn = custom_vmap(lambda *ops: list(ffi(*ops)))
    fn.def_vmap(rule)
    return fn(*operands)


def rows(op, batched: bool, axis_size: int):
    """A row operand ``[M, ...]`` of the batch as ``[B*M, ...]`` (broadcast first if unbatched)."""
    if not batched:
        op = jnp.broadcast_to(op, (axis_size, *op.shape))
    return op.reshape(axis_size * op.shape[1], *op.shape[2:])


def unrows(a, axis_size: int, m: int):
    """``[B*M, ...]`` back to ``[B, M, ...]``."""
    return a.reshape(axis_size, m, *a.shape[1:])


def unfolded(ffi: Callable, again: Callable, weight: int, in_batched, ops):
    """The batchings that do not fold: ``(results, results_batched)``.

    Sequential when w (operand ``weight``) is unbatched, each element through ``again(*ops)``
    (the caller's own function, so an outer vmap meets its rule once more); else
    ``broadcast_all``.
    """
    if not in_batched[weight]:
        def one(mapped):
            it = iter(mapped)
            return again(*[next(it) if b else op for op, b in zip(ops, in_batched)])

        outs = jax.lax.map(one, [op for op, b in zip(ops, in_batched) if b])
    else:
        outs = jax.vmap(lambda *a: list(ffi(*a)), in_axes=[0 if b else None for b in in_batched])(*ops)
    return list(outs), [True] * len(outs)
