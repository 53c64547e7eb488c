"""``fused_dense`` as Pallas kernels: ``y = act(x @ w + b)`` forward, dx and dW(+db) backward.

One kernel source, two places to run it:

- on a GPU it lowers through Pallas' **Triton** lowering (``jax.experimental.pallas.triton``
  compiler params, chosen explicitly: since JAX 0.10 a bare ``pallas_call`` on GPU goes to Mosaic
  GPU, and JAX 0.11 deprecates the Triton lowering). There is no Mosaic GPU version of these
  kernels yet; asking for one, or running on a JAX without the Triton lowering, raises a
  ``NotImplementedError`` that says so instead of quietly running something else.
- anywhere else it runs the same kernels with ``interpret=True`` (chosen automatically), which
  is how the CPU CI checks the kernel logic.

Shapes that are not multiples of the blocks are zero-padded up to whole blocks before launch and
the result sliced back, so no load is ever out of bounds: zero rows/columns add nothing to the
matmuls, and the padded part of dy is zero, so it adds nothing to dw, db or dx either.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels import activations, reference
from kernels.autodiff import linear_map, with_reference_jvp
from kernels.checks import check_fused_dense_args
from kernels.pallas_gpu import _kernels, blocks
from kernels.pallas_gpu.blocks import GPU_DEFAULT, BlockConfig

LOWERINGS = ("auto", "triton", "mosaic_gpu", "interpret")


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one launch (hashable: it is a jit static / nondiff argument)."""

    config: BlockConfig
    lowering: str  # "triton" or "interpret"


@functools.cache
def _triton_module():
    """``jax.experimental.pallas.triton``, or None where this JAX has dropped it.

    A DeprecationWarning raised by the import itself (JAX 0.11 deprecates the Triton lowering) is
    re-issued once as a warning of this module rather than escaping as an error: the lowering still
    works there, and docs/gpu.md says which lowering runs.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)
        try:
            from jax.experimental.pallas import triton
        except ImportError:
            return None
    for w in caught:
        if issubclass(w.category, DeprecationWarning):
            warnings.warn(f"kernels.pallas_gpu uses the Pallas Triton lowering, which JAX {jax.__version__} "
                          f"deprecates: {w.message}", FutureWarning, stacklevel=3)
            break
    return triton


def _has_triton_lowering() -> bool:
    return _triton_module() is not None


def resolve_lowering(lowering: str = "auto") -> str:
    """The lowering a call will use: "interpret" off-GPU, "triton" on a GPU.

    Raises:
      ValueError: for an unknown name.
      NotImplementedError: for "mosaic_gpu" (not written yet), or "triton" on a JAX without it.
    """
    if lowering not in LOWERINGS:
        raise ValueError(f"unknown Pallas lowering {lowering!r}; choose one of {LOWERINGS}")
    if lowering == "auto":
        lowering = "triton" if jax.default_backend() == "gpu" else "interpret"
    if lowering == "mosaic_gpu":
        raise NotImplementedError(
            "kernels.pallas_gpu has no Mosaic GPU lowering yet: its kernels are written for the Pallas "
            "Triton lowering (deprecated in JAX 0.11). Use lowering='triton' while this JAX has it, or "
            "backend='xla'."
        )
    if lowering == "triton":
        if jax.default_backend() != "gpu":
            raise NotImplementedError(
                f"the Pallas Triton lowering needs a GPU; this process runs on {jax.default_backend()!r} "
                "(use lowering='interpret' or 'auto')"
            )
        if not _has_triton_lowering():
            raise NotImplementedError(
                f"JAX {jax.__version__} has no Pallas Triton lowering (jax.experimental.pallas.triton) and "
                "kernels.pallas_gpu has no Mosaic GPU version yet; use backend='xla' on this JAX"
            )
    return lowering


def _fit(block: int, dim: int, floor: int) -> int:
    """Shrinks a block to the smallest power of two covering ``dim`` (not below ``floor``)."""
    return max(floor, min(block, 1 << max(0, (max(dim, 1) - 1).bit_length())))


def fit_config(config: BlockConfig, m: int, n: int, k: int, lowering: str) -> BlockConfig:
    """Adapts ``config`` to an (m, n, k) problem: blocks no larger than needed; on a GPU, powers
    of two >= 16 (``tl.dot``'s minimum)."""
    floor = 1 if lowering == "interpret" else 16
    if lowering != "interpret":
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(config, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}={v}: GPU blocks must be powers of two >= 16")
    return config.replace(block_m=_fit(config.block_m, m, floor), block_n=_fit(config.block_n, n, floor),
                          block_k=_fit(config.block_k, k, floor))


def _round_up(v: int, multiple: int) -> int:
    return -(-v // multiple) * multiple


def _compute_dtype(x, w, b):
    """Mixed input dtypes compute in their promotion, as jnp.matmul (the reference) does."""
    return jnp.result_type(x.dtype, w.dtype, *(() if b is None else (b.dtype,)))


def _acc_dtype(dtype):
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _compiler_params(plan: _Plan, stage_bytes: int):
    if plan.lowering == "interpret":
        return None
    return _triton_module().CompilerParams(num_warps=plan.config.num_warps,
                                           num_stages=blocks.pipeline_stages(plan.config.num_stages, stage_bytes))


def _tile_bytes(*tiles) -> int:
    """Bytes of the (rows, cols, dtype) tiles one trip of a kernel's reduction loop loads."""
    return sum(r * c * jnp.dtype(dt).itemsize for r, c, dt in tiles)


def _call(kernel, *, grid, in_specs, out_specs, out_shape, plan: _Plan, name: str, stage_bytes: int):
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        interpret=plan.lowering == "interpret", compiler_params=_compiler_params(plan, stage_bytes), name=name,
    )


TRACE_COUNT = {"forward": 0}  # incremented at trace time; tests assert no retrace per call


def _forward(x, w, b, activation: str, plan: _Plan, save_residual: bool):
    """x: [Mp, Kp], w: [Kp, Np], b: [Np] (padded) -> (y [Mp, Np], act'(z) [Mp, Np] float32 or None)."""
    TRACE_COUNT["forward"] += 1
    cfg = plan.config
    (mp, kp), np_ = x.shape, w.shape[1]
    nm, nn = mp // cfg.block_m, np_ // cfg.block_n
    tile = functools.partial(_kernels.grouped_tile, n_rows=nm, n_cols=nn, group=cfg.group_m)
    save_grad = save_residual and activation != "identity"  # identity's derivative is 1
    acc_dtype = _acc_dtype(x.dtype)
    out_block = pl.BlockSpec((cfg.block_m, cfg.block_n), lambda p: tile(p))
    out_shape = [jax.ShapeDtypeStruct((mp, np_), x.dtype)]
    if save_grad:
        out_shape.append(jax.ShapeDtypeStruct((mp, np_), acc_dtype))
    kernel = functools.partial(_kernels.forward_kernel, activation_name=activation, block_k=cfg.block_k,
                               acc_dtype=acc_dtype, save_grad=save_grad)
    outs = _call(
        kernel, grid=(nm * nn,),
        in_specs=[pl.BlockSpec((cfg.block_m, kp), lambda p: (tile(p)[0], 0)),
                  pl.BlockSpec((kp, cfg.block_n), lambda p: (0, tile(p)[1])),
                  pl.BlockSpec((cfg.block_n,), lambda p: (tile(p)[1],))],
        out_specs=[out_block] * len(out_shape), out_shape=out_shape, plan=plan, name="fused_dense_fwd",
        stage_bytes=_tile_bytes((cfg.block_m, cfg.block_k, x.dtype), (cfg.block_k, cfg.block_n, w.dtype)),
    )(x, w, b)
    return outs[0], (outs[1] if save_grad else None)


def _backward_dx(dy, d, w, plan: _Plan):
    """dy, d = act'(z): [Mp, Np] (d None for identity), w: [Kp, Np] -> dx [Mp, Kp]."""
    cfg = plan.config
    mp, np_ = dy.shape
    kp = w.shape[0]
    nm, nk = mp // cfg.block_m, kp // cfg.block_k
    tile = functools.partial(_kernels.grouped_tile, n_rows=nm, n_cols=nk, group=cfg.group_m)
    row_panel = pl.BlockSpec((cfg.block_m, np_), lambda p: (tile(p)[0], 0))
    kernel = functools.partial(_kernels.dx_kernel, block_n=cfg.block_n, acc_dtype=_acc_dtype(w.dtype))
    if d is None:
        args, in_specs = (dy, w), [row_panel]
        body = lambda dy_ref, w_ref, dx_ref: kernel(dy_ref, None, w_ref, dx_ref)  # noqa: E731
    else:
        args, in_specs, body = (dy, d, w), [row_panel, row_panel], kernel
    return _call(
        body, grid=(nm * nk,),
        in_specs=in_specs + [pl.BlockSpec((cfg.block_k, np_), lambda p: (tile(p)[1], 0))],
        out_specs=pl.BlockSpec((cfg.block_m, cfg.block_k), lambda p: tile(p)),
        out_shape=jax.ShapeDtypeStruct((mp, kp), w.dtype), plan=plan, name="fused_dense_dx",
        stage_bytes=_tile_bytes(*((cfg.block_m, cfg.block_n, a.dtype) for a in args[:-1]),
                                (cfg.block_k, cfg.block_n, w.dtype)),
    )(*args)


def _backward_dw(x, dy, d, plan: _Plan):
    """x: [Mp, Kp], dy, d = act'(z): [Mp, Np] (d None for identity) -> (dw [Kp, Np], db [Np])."""
    cfg = plan.config
    mp, kp = x.shape
    np_ = dy.shape[1]
    nk, nn = kp // cfg.block_k, np_ // cfg.block_n
    tile = functools.partial(_kernels.grouped_tile, n_rows=nk, n_cols=nn, group=cfg.group_m)
    col_panel = pl.BlockSpec((mp, cfg.block_n), lambda p: (0, tile(p)[1]))
    kernel = functools.partial(_kernels.dw_kernel, block_m=cfg.block_m, acc_dtype=_acc_dtype(x.dtype))
    if d is None:
        args, in_specs = (x, dy), [col_panel]
        body = lambda x_ref, dy_ref, dw_ref, db_ref: kernel(x_ref, dy_ref, None, dw_ref, db_ref)  # noqa: E731
    else:
        args, in_specs, body = (x, dy, d), [col_panel, col_panel], kernel
    dw, db_rows = _call(
        body, grid=(nk * nn,),
        in_specs=[pl.BlockSpec((mp, cfg.block_k), lambda p: (0, tile(p)[0]))] + in_specs,
        out_specs=[pl.BlockSpec((cfg.block_k, cfg.block_n), lambda p: tile(p)),
                   # one row of db partials per K-tile; all rows are equal (see dw_kernel)
                   pl.BlockSpec((None, cfg.block_n), lambda p: tile(p))],
        out_shape=[jax.ShapeDtypeStruct((kp, np_), x.dtype), jax.ShapeDtypeStruct((nk, np_), x.dtype)],
        plan=plan, name="fused_dense_dw",
        stage_bytes=_tile_bytes((cfg.block_m, cfg.block_k, x.dtype),
                                *((cfg.block_m, cfg.block_n, a.dtype) for a in args[1:])),
    )(*args)
    return dw, db_rows[0]


def _forward_reference(activation: str, plan: _Plan, save: bool, x, w, b):
    """``_forward`` in ``jnp``: its derivatives."""
    del plan
    act = activations.get(activation)
    z = jnp.matmul(x, w, preferred_element_type=_acc_dtype(x.dtype), precision=jax.lax.Precision.HIGHEST) + b
    return act.fn(z).astype(x.dtype), (act.grad(z) if save and activation != "identity" else None)


_forward_d = with_reference_jvp(lambda activation, plan, save, x, w, b: _forward(x, w, b, activation, plan, save),
                                _forward_reference, nondiff_argnums=(0, 1, 2))


def _backward(plan: _Plan, x, w, *rest):
    """The fused backward: ``rest = ([d,] dy)``, d = act'(z) (absent for identity) -> ``[dx, dw, db]``."""
    d, dy = (None, rest[0]) if len(rest) == 1 else rest
    return [_backward_dx(dy, d, w, plan), *_backward_dw(x, dy, d, plan)]


def _backward_reference(plan: _Plan, x, w, *rest):
    """``_backward`` in ``jnp``: its derivatives (second order)."""
    del plan
    d, dy = (None, rest[0]) if len(rest) == 1 else rest
    g = dy.astype(_acc_dtype(x.dtype)) * (1 if d is None else d)
    hi = jax.lax.Precision.HIGHEST
    return [jnp.matmul(g, w.T, precision=hi).astype(w.dtype), jnp.matmul(x.T, g, precision=hi).astype(x.dtype),
            g.sum(0).astype(x.dtype)]


_backward_d = with_reference_jvp(_backward, _backward_reference, nondiff_argnums=(0,))


def _tangent(x, w, *rest):
    """The forward-mode tangent ``act'(z) * (dx @ w + x @ dw + db)`` in ``jnp``; ``rest = ([d,] dx, dw, db)``."""
    d, (dx, dw, db) = (None, rest) if len(rest) == 3 else (rest[0], rest[1:])
    acc, hi = _acc_dtype(x.dtype), jax.lax.Precision.HIGHEST
    dz = (jnp.matmul(dx, w, preferred_element_type=acc, precision=hi)
          + jnp.matmul(x, dw, preferred_element_type=acc, precision=hi) + db)
    return [(dz if d is None else d * dz).astype(x.dtype)]


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _fused_padded(activation, plan, x, w, b):
    return _forward(x, w, b, activation, plan, save_residual=False)[0]


@_fused_padded.defjvp
def _fused_padded_jvp(activation, plan, primals, tangents):
    """Tangent in ``jnp`` (forward mode); its transpose is the fused backward (reverse mode)."""
    x, w, b = primals
    y, d = _forward_d(activation, plan, True, x, w, b)
    res = [x, w] + ([] if d is None else [d])
    return y, linear_map(_tangent, functools.partial(_backward_d, plan), res, tangents, [jax.typeof(y)])[0]


@functools.partial(jax.jit, static_argnames=("activation", "plan"))
def _fused_nd(x, w, b, *, activation: str, plan: _Plan):
    lead, k = x.shape[:-1], x.shape[-1]
    n = w.shape[1]
    m = math.prod(lead)
    if m == 0 or n == 0 or k == 0:
        # Nothing to launch (an empty grid or an empty reduction): the reference is exact here.
        return reference.fused_dense(x, w, b, activation=activation)
    cdt = _compute_dtype(x, w, b)
    cfg = plan.config
    mp, np_, kp = _round_up(m, cfg.block_m), _round_up(n, cfg.block_n), _round_up(k, cfg.block_k)
    x2 = jnp.pad(x.reshape(m, k).astype(cdt), ((0, mp - m), (0, kp - k)))
    w2 = jnp.pad(w.astype(cdt), ((0, kp - k), (0, np_ - n)))
    b2 = jnp.zeros((np_,), cdt) if b is None else jnp.pad(b.astype(cdt), (0, np_ - n))
    y = _fused_padded(activation, plan, x2, w2, b2)[:m, :n]
    return y.reshape(*lead, n).astype(x.dtype)


def fused_dense(x, w, b=None, *, activation: str = "relu", config: BlockConfig | None = None,
                lowering: str = "auto"):
    """``y = act(x @ w + b)`` with the Pallas kernels; differentiable in x, w, b in both modes.

    Reverse mode runs the backward kernels; forward mode computes the tangent in ``jnp`` and
    second derivatives differentiate the reference's arithmetic (``kernels.autodiff``).

    Args:
      x: ``[..., K]`` float16/bfloat16/float32 (float64 in interpret mode only).
      w: ``[K, N]``; b: ``[N]`` or None. Mixed dtypes compute in their promoted dtype.
      activation: a name from ``kernels.activations.ACTIVATIONS``.
      config: tile sizes; None takes the autotuned choice for this shape if one is cached (see
        ``kernels.pallas_gpu.autotune``), else the default for the lowering.
      lowering: "auto" (Triton on GPU, interpret elsewhere), "triton", "interpret" or
        "mosaic_gpu" (not implemented: raises).

    Returns:
      ``[..., N]`` in x's dtype; the matmuls accumulate in float32 (float64 for float64).
    """
    check_fused_dense_args(x, w, b, activation)
    lowering = resolve_lowering(lowering)
    if lowering != "interpret" and any(a is not None and jnp.dtype(a.dtype) == jnp.float64 for a in (x, w, b)):
        raise TypeError("fused_dense(backend='pallas'): float64 runs only in interpret mode "
                        "(lowering='interpret'); the GPU kernels take float16, bfloat16 and float32")
    m, k, n = math.prod(x.shape[:-1]), x.shape[-1], w.shape[1]
    if config is None:
        config = blocks.cached_config(m, n, k, _compute_dtype(x, w, b), activation, lowering)
    plan = _Plan(fit_config(config, m, n, k, lowering), lowering)
    return _fused_nd(x, w, b, activation=activation, plan=plan)


# The GPU that lower_for_gpu targets where this process has none: JAX >= 0.11 reads the compute
# capability from an abstract device (0.10 assumed sm_90 itself). The lent GPU machine is an H200.
ABSTRACT_GPU = "NVIDIA H200"


def lower_for_gpu(x, w, b=None, *, activation: str = "relu", config: BlockConfig | None = None,
                  grad: bool = True, device_kind: str = ABSTRACT_GPU):
    """Lowers the forward (and, with ``grad``, the backward) for CUDA through the Triton lowering,
    on any machine: the check, without a GPU, that every primitive in the kernels has a Pallas
    Triton lowering rule and the block specs are accepted. Compiling the Triton IR to PTX happens
    only on a GPU.

    Args:
      x, w, b: arrays or ``jax.ShapeDtypeStruct``s (b may be None).
      device_kind: the GPU to lower for when this process has none (a ``jax.Device.device_kind``
        such as "NVIDIA H100"), given to JAX as an abstract device; on a GPU, the GPU itself.

    Returns:
      The ``jax.stages.Lowered`` program; its text holds one ``__gpu$xla.gpu.triton`` custom call
      per kernel launch.
    """
    m, k, n = math.prod(x.shape[:-1]), x.shape[-1], w.shape[1]
    plan = _Plan(fit_config(config or GPU_DEFAULT, m, n, k, "triton"), "triton")

    def f(x, w, b):
        if not grad:
            return _fused_nd(x, w, b, activation=activation, plan=plan)
        y, vjp = jax.vjp(lambda x, w, b: _fused_nd(x, w, b, activation=activation, plan=plan), x, w, b)
        return y, vjp(y)

    if jax.default_backend() == "gpu":
        return jax.jit(f).trace(x, w, b).lower(lowering_platforms=("cuda",))
    # Traced under the abstract mesh too: lowering takes the mesh the trace recorded.
    target = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=target)):
        return jax.jit(f).trace(x, w, b).lower(lowering_platforms=("cuda",))
