"""Running a quantised variables tree through the unchanged model.

Inside ``quantized()``, every ``jaxnet.nn.FusedDense`` whose params hold ``w_q`` runs as a
``jaxnet.nn.QuantizedDense`` on those params (``kernels.quantized_dense``): a Flax method
interceptor swaps the layer's arithmetic, so the model's own code, names and other layers
(convolutions, norms, attention, embeddings: float32) are untouched. Layers still holding a float
``kernel`` run as before, so a tree quantised in part runs too.

    qvariables = quantize(variables)                        # jaxnet.compress.quantize
    logits = apply_quantized(model, qvariables, x)          # = model.apply(...) inside quantized()
"""
from __future__ import annotations

import contextlib

import flax.linen as nn

from jaxnet.compress.quantize import ACT_MARKER, check_quantized
from jaxnet.nn import FusedDense, QuantizedDense


def _module_path(module: nn.Module) -> str:
    return "/".join(map(str, module.scope.path)) if module.scope is not None else type(module).__name__


@contextlib.contextmanager
def quantized(*, backend: str = "auto"):
    """Inside this context, ``FusedDense`` layers with quantised params run through
    ``QuantizedDense`` (w8a8 where the params hold ``act_int8``) on ``backend``, a
    ``kernels.quantized_dense`` backend name.

    Raises (when the model runs): ValueError if a layer other than ``FusedDense`` (e.g.
    ``flax.linen.Dense``) holds quantised params: exclude it with a rule of ``weight_qtype=None``.
    """

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (context.method_name != "__call__" or isinstance(module, QuantizedDense)
                or not module.has_variable("params", "w_q")):
            return next_fun(*args, **kwargs)
        if not isinstance(module, FusedDense):
            raise ValueError(f"layer {_module_path(module)!r} is a {type(module).__name__} with quantised weights; "
                             "only jaxnet.nn.FusedDense layers run quantised: keep it float with "
                             "QuantRule(module_path=..., weight_qtype=None)")
        params = dict(module.variables["params"])
        act_quant = "int8" if params.pop(ACT_MARKER, None) is not None else None
        layer = QuantizedDense(module.features, activation=module.activation, use_bias=module.use_bias,
                               act_quant=act_quant, backend=backend, in_features=module.in_features,
                               name=module.name)
        return layer.apply({"params": params}, *args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


def apply_quantized(model: nn.Module, qvariables, *args, backend: str = "auto", **kwargs):
    """``model.apply(qvariables, *args, **kwargs)`` with its quantised dense layers run in int8.

    Args:
      model: the float model's Flax module, as it was trained (``MLP``, ``CNN``, ``TransformerLM``...).
      qvariables: ``quantize(variables, ...)`` or ``load_quantized(path)``.
      *args, **kwargs: what ``model.apply`` takes after the variables (inputs, ``method=``, ...).
      backend: the ``kernels.quantized_dense`` backend of every quantised layer.

    Returns:
      What ``model.apply`` returns.

    Raises:
      TypeError / ValueError: a tree with no quantised layer or a malformed one (``check_quantized``),
      or a quantised layer that is not a ``FusedDense``.
    """
    check_quantized(qvariables)
    with quantized(backend=backend):
        return model.apply(qvariables, *args, **kwargs)
