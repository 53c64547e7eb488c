"""A configurable convolutional classifier: conv blocks, then a dense head on ``kernels.fused_dense``.

    model = CNN(num_classes=10, features=(32, 64))     # two blocks of two 3x3 convs each
    variables = model.init(jax.random.key(0), x)      # {"params": ..., "batch_stats": ...}
    logits = model.apply(variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"])

One block is ``convs_per_block`` x (conv -> norm -> activation), then pooling. The blocks' output
is flattened and fed to the head: ``FusedDense`` layers of widths ``head`` (activation, dropout)
and a last ``FusedDense(num_classes)``. Any image size and channel count work: "SAME" convolutions
and ceil-mode pooling keep every spatial size >= 1, and the head's input width is taken from the
first input at ``init``.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from jaxnet.data.images import random_shift
from jaxnet.nn import FusedDense
from kernels import activations

NORMS = ("batch", "layer", "none")
POOLS = ("max", "avg", "none")


class CNN(nn.Module):
    """Conv blocks and a dense head; logits per class.

    Attributes:
      num_classes: C, the number of outputs.
      features: output channels of each block, e.g. ``(32, 64)``.
      convs_per_block: convolutions in each block (all with that block's channel count).
      kernel_size: side of the square convolution kernels.
      norm: "batch" (BatchNorm; its statistics live in the ``batch_stats`` collection),
        "layer" (LayerNorm over H, W, C) or "none".
      activation: after every normalisation and hidden dense layer (a fused-dense activation name).
      pool: 2x2, stride-2 "max" or "avg" pooling at the end of each block, or "none".
      head: widths of the hidden dense layers of the head.
      dropout_rate: dropout before every head layer when ``train=True``.
      augment_shift: when ``train=True``, shift each image by up to this many pixels (a random
        whole-pixel translation; keys from the "dropout" stream, the one ``fit`` supplies).
      backend: kernel backend of the head's dense layers.

    Shapes: ``x: [B, H, W, C]`` (or ``[B, H, W]``, read as one channel) float -> ``[B, num_classes]``.
    """

    num_classes: int
    features: Sequence[int] = (32, 64)
    convs_per_block: int = 2
    kernel_size: int = 3
    norm: str = "batch"
    activation: str = "relu"
    pool: str = "max"
    head: Sequence[int] = (128,)
    dropout_rate: float = 0.0
    augment_shift: int = 0
    backend: str = "xla"

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {NORMS}")
        if self.pool not in POOLS:
            raise ValueError(f"unknown pool {self.pool!r}; choose one of {POOLS}")
        if x.ndim == 3:
            x = x[..., None]  # (B, H, W) -> (B, H, W, 1)
        if x.ndim != 4:
            raise ValueError(f"CNN expects images [B, H, W, C] or [B, H, W], got shape {tuple(x.shape)}")
        act = activations.get(self.activation)
        if train and self.augment_shift > 0:
            x = random_shift(self.make_rng("dropout"), x, self.augment_shift)
        for i, width in enumerate(self.features):
            for j in range(self.convs_per_block):
                # No conv bias when a normalisation follows: its shift makes the bias redundant.
                x = nn.Conv(width, (self.kernel_size, self.kernel_size), padding="SAME",
                            use_bias=self.norm == "none", name=f"block{i}_conv{j}")(x)
                if self.norm == "batch":
                    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"block{i}_norm{j}")(x)
                elif self.norm == "layer":
                    x = nn.LayerNorm(reduction_axes=(-3, -2, -1), name=f"block{i}_norm{j}")(x)
                x = act(x)
            if self.pool != "none":
                pool = nn.max_pool if self.pool == "max" else nn.avg_pool
                # "SAME" padding is ceil mode: a 1-pixel image stays 1 pixel instead of vanishing.
                x = pool(x, (2, 2), strides=(2, 2), padding="SAME")
        x = x.reshape(x.shape[0], -1)  # (B, H' * W' * C')
        for k, width in enumerate(self.head):
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x) if self.dropout_rate > 0 else x
            x = FusedDense(width, activation=self.activation, init_scheme="lecun", backend=self.backend,
                           axes=("embed", "mlp") if k % 2 == 0 else ("mlp", "embed"), name=f"head_{k}")(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x) if self.dropout_rate > 0 else x
        return FusedDense(self.num_classes, activation="identity", init_scheme="lecun", backend=self.backend,
                          axes=("embed" if len(self.head) % 2 == 0 else "mlp", None), name="logits")(x)
