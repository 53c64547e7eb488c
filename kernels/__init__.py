"""Fused dense kernels, ``y = act(x @ w + b)``, each backend beside the reference it is checked against.

Public names: ``fused_dense``, ``available_backends``, ``reference.fused_dense``.
"""
from kernels import activations, reference
from kernels.dispatch import available_backends, fused_dense, models_batched, register_backend
from kernels.quantized import quantized_dense  # int8 weights (and activations): kernels/quantized.py

# Backend modules register themselves with kernels.dispatch when imported (add them below).
import kernels.xla  # noqa: E402,F401  ("xla": XLA ops, the models' default; checked against kernels.reference)
import kernels.numba_cpu  # noqa: E402,F401  ("numba": CPU kernels through the XLA FFI)
import kernels.pallas_gpu  # noqa: E402,F401  ("pallas": Pallas kernels, Triton lowering on GPU, interpret on CPU)

__all__ = ["activations", "available_backends", "fused_dense", "models_batched", "quantized_dense", "reference",
           "register_backend"]
