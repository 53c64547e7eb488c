"""Layers that route their arithmetic through ``kernels`` (so any backend can run a whole model)."""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

import kernels
from jaxnet.arguments import check_int


_NAMING = contextvars.ContextVar("jaxnet_logical_axes", default=False)


@contextlib.contextmanager
def logical_axes():
    """Inside this context, parameters made through ``named_init`` come boxed with their logical
    axis names (Flax ``nn.LogicallyPartitioned``), so that ``jax.eval_shape(model.init, ...)``
    shows every parameter's names (``jaxnet.parallel.logical_specs``). Outside it, ``model.init``
    returns plain arrays, as always."""
    token = _NAMING.set(True)
    try:
        yield
    finally:
        _NAMING.reset(token)


def named_init(init: Callable, names: Sequence[str | None]) -> Callable:
    """``init`` whose parameter carries the logical axis ``names`` (one per dimension, e.g.
    ``("embed", "mlp")``) inside ``logical_axes()``. A model is sharded by naming its axes this
    way: ``jaxnet.parallel`` maps names to mesh axes by strategy (``"mlp" -> "model"`` for tensor
    parallelism); unnamed parameters are replicated."""
    boxed = nn.with_logical_partitioning(init, tuple(names))

    def init_fn(*args, **kwargs):
        return boxed(*args, **kwargs) if _NAMING.get() else init(*args, **kwargs)

    return init_fn


def _active_layout():
    """``jaxnet.parallel.active_layout()``, without importing it for models that never shard."""
    import sys

    parallel = sys.modules.get("jaxnet.parallel")
    return None if parallel is None else parallel.active_layout()


def fan_in_uniform(fan_in: int) -> Callable:
    """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``: PyTorch's ``nn.Linear`` rule for weights and biases."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _layer_input(layer, x) -> tuple[str, int]:
    """Checks a dense layer's ``features``/``in_features`` and ``x: [..., K]``; returns (name, K)."""
    name = layer.name or type(layer).__name__
    check_int(layer.features, f"{name}: features", minimum=1)
    check_int(layer.in_features, f"{name}: in_features", minimum=1, allow_none=True)
    k = x.shape[-1]
    if layer.in_features is not None and k != layer.in_features:
        raise ValueError(f"{name}: expected inputs with {layer.in_features} features [..., {layer.in_features}], "
                         f"got shape {tuple(x.shape)}")
    return name, k


class FusedDense(nn.Module):
    """``y = act(x @ kernel + bias)`` through ``kernels.fused_dense``.

    Attributes:
      features: N, the number of outputs.
      activation: an activation name of the fused-dense contract ("identity" for a plain Linear).
      use_bias: whether to add a bias.
      backend: "xla" (``kernels.xla``: XLA ops with a mixed-precision backward), "numba", "pallas"
        or "auto"; every name is what ``jaxnet verify --backend NAME`` checks.
      in_features: K when the layer has a fixed input width (checked at init and apply), else
        taken from the first input.
      init_scheme: "torch" (``U(±1/sqrt(K))`` for kernel and bias, as ``torch.nn.Linear``) or "lecun"
        (LeCun normal kernel, zero bias, Flax's default).
      param_dtype: dtype of the parameters.
      axes: logical names of the kernel's (K, N) dimensions, e.g. ``("embed", "mlp")``; the bias
        takes N's (see ``named_init``).

    Shapes: ``x: [..., K]`` -> ``[..., N]`` in x's dtype. Parameters: ``kernel: [K, N]``,
    ``bias: [N]`` — the transpose of PyTorch's ``Linear.weight: [N, K]``.
    """

    features: int
    activation: str = "identity"
    use_bias: bool = True
    backend: str = "xla"
    in_features: int | None = None
    init_scheme: str = "torch"
    param_dtype: jnp.dtype = jnp.float32
    axes: tuple[str | None, str | None] = (None, None)

    @nn.compact
    def __call__(self, x):
        name, k = _layer_input(self, x)
        if self.has_variable("params", "w_q"):  # a tree from jaxnet.compress.quantize
            raise ValueError(f"{name}: its params are quantised (w_q, scale); run the model with "
                             "jaxnet.compress.apply_quantized")
        if self.has_variable("params", "kernel"):
            # Applying: read the parameters directly. (``self.param`` would re-trace the
            # initialiser under eval_shape on every trace just to compare shapes; we compare here.)
            kernel = self.get_variable("params", "kernel")
            bias = self.get_variable("params", "bias") if self.use_bias else None
            if kernel.shape != (k, self.features):
                raise ValueError(
                    f"{self.name or type(self).__name__}: inputs have K={k} features (x.shape={tuple(x.shape)}) "
                    f"and the layer has N={self.features} outputs, but its kernel has shape {tuple(kernel.shape)} "
                    f"(expected K={kernel.shape[0]})"
                )
        else:
            if self.init_scheme == "torch":
                kernel_init = bias_init = fan_in_uniform(k)
            elif self.init_scheme == "lecun":
                kernel_init, bias_init = nn.initializers.lecun_normal(), nn.initializers.zeros
            else:
                raise ValueError(f"unknown init_scheme {self.init_scheme!r}; choose 'torch' or 'lecun'")
            kernel = self.param("kernel", named_init(kernel_init, self.axes), (k, self.features), self.param_dtype)
            bias = (self.param("bias", named_init(bias_init, self.axes[1:]), (self.features,), self.param_dtype)
                    if self.use_bias else None)
        # Parameters follow the input's dtype so bf16 activations stay bf16 end to end.
        kernel = kernel.astype(x.dtype)
        bias = None if bias is None else bias.astype(x.dtype)
        layout = _active_layout()
        if layout is not None and self.backend == "xla":  # fsdp: the whole weight where it is used
            from jaxnet.parallel import batch_split, gathered

            x = batch_split(x, layout)
            kernel = gathered(kernel, self.axes, layout)
            bias = None if bias is None else gathered(bias, self.axes[1:], layout)
        elif layout is not None:  # a custom kernel inside a sharded step: each device runs it on its block
            from jaxnet.parallel import sharded_dense

            return sharded_dense(x, kernel, bias, axes=self.axes, activation=self.activation, backend=self.backend,
                                 layout=layout)
        return kernels.fused_dense(x, kernel, bias, activation=self.activation, backend=self.backend)


class QuantizedDense(nn.Module):
    """Inference from int8 weights: ``y = act(x @ (w_q * scale) + bias)`` through
    ``kernels.quantized_dense``; with ``act_quant="int8"`` each row of x is quantised to int8 first
    (w8a8). Parameters come from ``jaxnet.compress.quantize``; ``init`` makes zeros (w_q, bias) and
    ones (scale) of the right shapes, to be replaced.

    Attributes:
      features: N, the number of outputs.
      activation: an activation name of the fused-dense contract ("identity" for a plain Linear).
      use_bias: whether the layer has a bias.
      act_quant: None (weight-only) or "int8" (dynamic per-row activation scales).
      backend: a ``kernels.quantized_dense`` backend ("auto": the fastest here).
      in_features: K when the layer has a fixed input width (checked), else taken from the input.

    Shapes: ``x: [..., K]`` float -> ``[..., N]``. Parameters: ``w_q: int8 [K, N]``,
    ``scale: float32 [N]``, ``bias: [N]``.
    """

    features: int
    activation: str = "identity"
    use_bias: bool = True
    act_quant: str | None = None
    backend: str = "auto"
    in_features: int | None = None

    @nn.compact
    def __call__(self, x):
        name, k = _layer_input(self, x)
        if self.has_variable("params", "w_q"):  # read directly, as FusedDense does (no init re-trace)
            w_q, scale = self.get_variable("params", "w_q"), self.get_variable("params", "scale")
            bias = self.get_variable("params", "bias") if self.use_bias else None
            if tuple(w_q.shape) != (k, self.features):
                raise ValueError(f"{name}: inputs have K={k} features (x.shape={tuple(x.shape)}) and the layer "
                                 f"N={self.features} outputs, but w_q has shape {tuple(w_q.shape)}")
        else:
            w_q = self.param("w_q", nn.initializers.zeros, (k, self.features), jnp.int8)
            scale = self.param("scale", nn.initializers.ones, (self.features,), jnp.float32)
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32) if self.use_bias else None
        return kernels.quantized_dense(x, w_q, scale, bias, activation=self.activation, act_quant=self.act_quant,
                                       backend=self.backend)
