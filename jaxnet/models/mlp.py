"""Multi-layer perceptrons: the seed's ``SimpleNet`` and a general ``MLP``.

Both are Flax Linen modules used as pure functions::

    variables = model.init(jax.random.key(0), x)          # {"params": {...}}
    y = model.apply(variables, x, train=True, rngs={"dropout": key})

``apply`` has no side effects; dropout draws only from the key it is given.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxnet.arguments import check_fraction, check_int
from jaxnet.nn import FusedDense


class SimpleNet(nn.Module):
    """The seed's net: ``fc1`` Linear(10, 5), ReLU, ``fc2`` Linear(5, 1).

    ``x: [batch, 10] float`` -> ``[batch, 1]``. Initialised like ``torch.nn.Linear``
    (``U(±1/sqrt(fan_in))`` for weights and biases), reproducibly from the init key.
    """

    backend: str = "xla"

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # no dropout in the seed's net; the argument keeps one calling convention
        # ReLU is fused into fc1, which is exactly Linear followed by ReLU.
        h = FusedDense(5, activation="relu", in_features=10, backend=self.backend, axes=("embed", "mlp"),
                       name="fc1")(x)
        return FusedDense(1, activation="identity", in_features=5, backend=self.backend, axes=("mlp", "embed"),
                          name="fc2")(h)

    def dense_layers(self) -> tuple[tuple[str, str], ...]:
        """``((layer name, activation), ...)`` from input to output: the net as a plain stack of
        dense layers (``jaxnet.train.fused`` trains such stacks in one kernel)."""
        return (("fc1", "relu"), ("fc2", "identity"))


class MLP(nn.Module):
    """A stack of dense layers: ``act`` after every layer but the last, dropout after each ``act``.

    Attributes:
      features: widths of every layer, the last one being the output width, e.g. ``(64, 64, 10)``.
      activation: hidden activation (a name of the fused-dense contract).
      dropout_rate: probability of zeroing a hidden unit when ``train=True``.
      use_bias: whether the dense layers have biases.
      in_features: fixed input width K, checked on every call, or None to take it from the input.
      init_scheme: "torch" or "lecun" (see ``jaxnet.nn.FusedDense``).
      backend: kernel backend for every dense layer.

    Shapes: ``x: [..., K]`` -> ``[..., features[-1]]``. Layers are named ``layers_0``,
    ``layers_1``, ... (the names ``jaxnet.interop`` uses).
    """

    features: Sequence[int]
    activation: str = "relu"
    dropout_rate: float = 0.0
    use_bias: bool = True
    in_features: int | None = None
    init_scheme: str = "torch"
    backend: str = "xla"

    @nn.compact
    def __call__(self, x, train: bool = False):
        if not self.features:
            raise ValueError("MLP needs at least one layer in `features`")
        for i, width in enumerate(self.features):
            check_int(width, f"MLP features[{i}]", minimum=1)
        check_fraction(self.dropout_rate, "MLP dropout_rate", allow_zero=True)
        for i, width in enumerate(self.features):
            last = i == len(self.features) - 1
            x = FusedDense(
                width,
                activation="identity" if last else self.activation,
                use_bias=self.use_bias,
                in_features=self.in_features if i == 0 else None,
                init_scheme=self.init_scheme,
                backend=self.backend,
                # Widths alternate "mlp" and "embed": under tensor parallelism a layer splits its
                # outputs and the next its inputs (one all-reduce per pair).
                axes=(("embed", "mlp") if i % 2 == 0 else ("mlp", "embed")),
                name=f"layers_{i}",
            )(x)
            if not last and self.dropout_rate > 0.0:
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return x

    def dense_layers(self) -> tuple[tuple[str, str], ...] | None:
        """``((layer name, activation), ...)`` from input to output, or None when training is not a
        plain stack of dense layers (dropout draws); see ``SimpleNet.dense_layers``."""
        if self.dropout_rate > 0.0:
            return None
        last = len(self.features) - 1
        return tuple((f"layers_{i}", "identity" if i == last else self.activation) for i in range(len(self.features)))
