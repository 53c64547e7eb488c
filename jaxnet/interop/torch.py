"""PyTorch ``state_dict`` import and export for stacks of dense layers (SimpleNet, MLP).

PyTorch's ``nn.Linear`` stores ``weight: [out, in]`` and computes ``x @ weight.T + bias``; jaxnet's
``FusedDense`` stores ``kernel: [in, out]`` and computes ``x @ kernel + bias``. So weights are
transposed on the way in and on the way out; biases are copied as they are.

Layers are paired by name when every jaxnet layer name has a ``<name>.weight`` in the state dict
(``SimpleNet``'s ``fc1``/``fc2`` and the seed's PyTorch net), otherwise in order: the state dict's
2-D ``*.weight`` entries in their (registration) order against jaxnet's layers in order
(``layers_0, layers_1, ..., layers_10``), e.g. an ``nn.Sequential`` of ``Linear`` and activations.
torch itself is not imported: tensors are read with ``.detach().cpu().numpy()``. A path to a
``.safetensors`` or ``.pt`` file is read with ``jaxnet.interop.files``, which never runs code.
"""
from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet.interop.files import read_weights, to_numpy


def _to_numpy(t, key: str, src: str) -> np.ndarray:
    a = to_numpy(t, key)
    # jnp.issubdtype, unlike np.issubdtype, counts bfloat16 as floating.
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"{src}[{key!r}] has dtype {a.dtype}; expected floating point")
    return a


def _linear_weight_keys(state_dict) -> list[str]:
    """The state dict's 2-D ``*.weight`` keys in their (registration) order."""
    return [k for k, v in state_dict.items() if k.endswith(".weight") and len(np.shape(v)) == 2]


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _dense_layers(params) -> list[str]:
    """Names of the dense layers (sub-dicts holding a ``kernel``) in natural order."""
    names = [name for name, sub in params.items() if isinstance(sub, dict) and "kernel" in sub]
    others = [name for name in params if name not in names]
    if others:
        raise ValueError(f"only stacks of dense layers are supported; found other parameters {others}")
    return sorted(names, key=_natural_key)


def _expected_params(model, in_features: int):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, in_features), jnp.float32)))
    return jax.tree.map(lambda s: s.shape, dict(shapes["params"]))


def _pair_layers(layer_names: list[str], state_dict, src: str) -> list[tuple[str, str]]:
    """``[(jaxnet layer name, torch key prefix)]``."""
    if all(f"{name}.weight" in state_dict for name in layer_names):
        return [(name, name) for name in layer_names]
    prefixes = [k[: -len(".weight")] for k in _linear_weight_keys(state_dict)]
    if len(prefixes) != len(layer_names):
        raise ValueError(
            f"the model has {len(layer_names)} dense layers {layer_names} but {src} has "
            f"{len(prefixes)} 2-D weights {[p + '.weight' for p in prefixes]}"
        )
    return list(zip(layer_names, prefixes))


def load_torch_state_dict(model, state_dict):
    """Starts a jaxnet model from a PyTorch model's weights.

    Args:
      model: a jaxnet dense stack (``SimpleNet``, ``MLP``), unbound.
      state_dict: ``torch_model.state_dict()`` (tensors), a mapping of NumPy arrays (what
        ``load_safetensors`` returns), or the path of a ``.safetensors`` or ``.pt`` file holding
        one (read without running code; see ``load_torch_file``).

    Returns:
      The model bound to the imported variables: call it as ``net(x)``; ``net.variables`` is the
      ``{"params": ...}`` pytree for ``model.apply`` or ``TrainState.create(params=...)``.

    Raises:
      ValueError: layer counts or shapes disagree (naming the layer, the key and both shapes; and
        the file, when given a path); see ``load_safetensors``/``load_torch_file`` for file errors.
      TypeError: a weight that is not floating point.
    """
    src = "state_dict"
    if isinstance(state_dict, (str, os.PathLike)):
        src, state_dict = os.fspath(state_dict), read_weights(state_dict)
    weight_keys = _linear_weight_keys(state_dict)
    if not weight_keys:
        raise ValueError(f"{src} has no 2-D '*.weight' entry; keys: {list(state_dict)}")
    first_w = weight_keys[0]
    expected = _expected_params(model, _to_numpy(state_dict[first_w], first_w, src).shape[1])
    layer_names = _dense_layers(expected)
    params = {}
    for name, prefix in _pair_layers(layer_names, state_dict, src):
        w = _to_numpy(state_dict[f"{prefix}.weight"], f"{prefix}.weight", src)
        want = expected[name]["kernel"]
        if w.T.shape != tuple(want):
            raise ValueError(
                f"layer {name!r}: {src}[{prefix + '.weight'!r}] has shape {w.shape} "
                f"(PyTorch [out, in]); the model expects kernel {tuple(want)} ([in, out]), i.e. weight "
                f"{tuple(want)[::-1]}"
            )
        layer = {"kernel": jnp.asarray(w.T.astype(np.float32))}
        if "bias" in expected[name]:
            if f"{prefix}.bias" not in state_dict:
                raise ValueError(f"layer {name!r} has a bias but {src} has no {prefix + '.bias'!r}")
            b = _to_numpy(state_dict[f"{prefix}.bias"], f"{prefix}.bias", src)
            if b.shape != tuple(expected[name]["bias"]):
                raise ValueError(f"layer {name!r}: {src}[{prefix + '.bias'!r}] has shape {b.shape}, expected "
                                 f"{tuple(expected[name]['bias'])}")
            layer["bias"] = jnp.asarray(b.astype(np.float32))
        params[name] = layer
    return model.bind({"params": params})


def export_torch_state_dict(variables, *, prefixes: list[str] | None = None, as_torch: bool = True):
    """The reverse of ``load_torch_state_dict``: a state dict a PyTorch model can ``load_state_dict``.

    Args:
      variables: ``{"params": ...}`` (or the params themselves, or a bound model) of a dense stack.
      prefixes: PyTorch module names for the layers in order, e.g. ``["0", "2", "4"]`` for an
        ``nn.Sequential(Linear, ReLU, Linear, ReLU, Linear)``; default: jaxnet's layer names.
      as_torch: return ``torch.Tensor`` values (imports torch) instead of NumPy arrays.

    Returns:
      ``{"<prefix>.weight": [out, in], "<prefix>.bias": [out]}`` in layer order.
    """
    if hasattr(variables, "variables") and not isinstance(variables, dict):
        variables = variables.variables
    params = variables.get("params", variables)
    names = _dense_layers(params)
    prefixes = names if prefixes is None else list(prefixes)
    if len(prefixes) != len(names):
        raise ValueError(f"{len(prefixes)} prefixes {prefixes} for {len(names)} layers {names}")
    out = {}
    for name, prefix in zip(names, prefixes):
        out[f"{prefix}.weight"] = np.array(params[name]["kernel"]).T.copy()
        if "bias" in params[name]:
            out[f"{prefix}.bias"] = np.array(params[name]["bias"]).copy()
    if as_torch:
        import torch

        out = {k: torch.from_numpy(v) for k, v in out.items()}
    return out
