"""Cheaper models: post-training int8 quantisation of dense layers (``quantize``, run by
``apply_quantized``; guide: docs/compression.md)."""
from jaxnet.compress.apply import apply_quantized, quantized
from jaxnet.compress.quantize import (
    QuantRule,
    as_rule,
    bytes_before_after,
    check_quantized,
    dense_layers,
    quantize,
    quantize_weight,
)
from jaxnet.compress.store import load_quantized, save_quantized

__all__ = [
    "QuantRule",
    "apply_quantized",
    "as_rule",
    "bytes_before_after",
    "check_quantized",
    "dense_layers",
    "load_quantized",
    "quantize",
    "quantize_weight",
    "quantized",
    "save_quantized",
]
