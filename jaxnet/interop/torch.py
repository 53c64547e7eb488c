"""PyTorch ``state_dict`` import and export for stacks of dense layers (SimpleNet, MLP).

PyTorch's ``nn.Linear`` stores ``weight: [out, in]`` and computes ``x @ weight.T + bias``; jaxnet's
``FusedDense`` stores ``kernel: [in, out]`` and computes ``x @ kernel + bias``. So weights are
transposed on the way in and on the way out; biases are copied as they are.

Which torch module fills which jaxnet layer (a torch "linear module" is a prefix ``p`` with a 2-D
``p.weight`` and maybe ``p.bias``; jaxnet's layers are taken in call order, ``layers_2`` before
``layers_10``):

1. ``prefixes=[...]``, when given, names the torch module of every layer in order.
2. By name: layer ``fc1`` takes module ``fc1``, ``layers_0`` takes ``layers.0`` (a ``ModuleList``
   called ``layers``: dots read as underscores). The shape must then agree.
3. By shape: every other layer takes the one unpaired weight of its shape ``[out, in]``. When
   several layers need the same shape, the weights of that shape must be numbered modules whose
   names differ only in their numbers (``0``, ``2``, ``4`` of an ``nn.Sequential``; ``blocks.3.0``):
   they go in number order, the call order of ``Sequential`` and ``ModuleList``. Anything else
   (``inp`` and ``out`` of one shape) is ambiguous and refused: registration order is not call
   order, so it is never used.

The model's input width is what makes layer 0's shape: every distinct input width among the 2-D
weights is tried and exactly one must pair every layer. Entries left over (LayerNorm, BatchNorm
and Conv parameters and buffers, unpaired weights, a bias the layer has no use for), non-finite
weights and repeated prefixes are refused with their list (``strict=False``: a ``UserWarning``).
torch itself is not imported: tensors are read with ``.detach().cpu().numpy()``. A path to a
``.safetensors`` or ``.pt`` file is read with ``jaxnet.interop.files``, which never runs code.
"""
from __future__ import annotations

import os
import re
import warnings

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


def _f32(a: np.ndarray) -> np.ndarray:
    """``a`` as float32, as it is loaded: values past float32's range become inf (then reported)."""
    with np.errstate(over="ignore"):
        return a.astype(np.float32)


def _short(items, limit: int = 80) -> str:
    """``items`` joined with commas, cut to about ``limit`` characters."""
    text = ", ".join(items)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(items)} in all)"


def _refuse(problem: str, items: list[str], strict: bool, stacklevel: int = 3) -> None:
    """Raises ValueError listing ``items`` (strict), or warns with the same list (at the caller's caller)."""
    if not items:
        return
    if strict:
        raise ValueError(f"{problem}: {_short(items)} (strict=False: warn instead)")
    warnings.warn(f"{problem}: {_short(items)}", UserWarning, stacklevel=stacklevel)


def _as_prefixes(prefixes, strict: bool) -> list[str]:
    """``prefixes`` as a list of non-empty strings; repeated ones refused (strict) or warned about."""
    if isinstance(prefixes, str):
        raise TypeError(f"prefixes must be a list of module names, not the string {prefixes[:80]!r}")
    prefixes = list(prefixes)
    if not all(isinstance(p, str) and p for p in prefixes):
        raise TypeError(f"prefixes must be non-empty strings; got {_short([repr(p) for p in prefixes])}")
    repeated = sorted({p for p in prefixes if prefixes.count(p) > 1})
    _refuse("repeated prefixes (two layers, one set of weights)", repeated, strict, stacklevel=4)
    return prefixes


def _linear_modules(state_dict) -> list[str]:
    """Prefixes ``p`` with a 2-D ``p.weight``, in the state dict's order."""
    return [k[: -len(".weight")] for k, v in state_dict.items() if k.endswith(".weight") and len(np.shape(v)) == 2]


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


def _numbered(prefixes: list[str]) -> list[str] | None:
    """``prefixes`` in number order if their names differ only in numbers (``0``, ``2``), else None."""
    stems = {tuple(re.split(r"\d+", p)) for p in prefixes}
    return sorted(prefixes, key=_natural_key) if len(stems) == 1 else None


def _pair(want: dict, modules: list[str], shape_of: dict, src: str) -> list[tuple[str, str]]:
    """``[(layer, torch prefix)]`` by name, then by shape (the rule in the module docstring).

    ``want``: layer name -> the torch weight shape it needs, ``(out, in)``, in call order.
    """
    by_name = {p.replace(".", "_"): p for p in modules}
    pairs = {name: by_name[name] for name in want if name in by_name}
    free = [p for p in modules if p not in pairs.values()]
    rest = [name for name in want if name not in pairs]
    for shape in dict.fromkeys(want[name] for name in rest):  # each shape once, in layer order
        layers = [name for name in rest if want[name] == shape]
        fits = [p for p in free if shape_of[p] == shape]
        if len(fits) < len(layers):
            unpaired = [f"'{p}.weight' {shape_of[p]}" for p in free]
            raise ValueError(
                f"layer {layers[len(fits)]!r} needs a weight of shape {shape} (PyTorch [out, in]; kernel "
                f"{shape[::-1]}); {src} has {len(fits)} unpaired of that shape for {len(layers)} layer(s) "
                f"needing it. Unpaired 2-D weights: {_short(unpaired) or 'none'}"
            )
        ordered = fits if len(fits) == 1 else (_numbered(fits) if len(fits) == len(layers) else None)
        if ordered is None:
            raise ValueError(
                f"ambiguous: layers {_short(layers)} need weights of shape {shape} and {src} has "
                f"{_short(fits)}: names cannot order or choose them; pass prefixes=[torch module per layer]"
            )
        pairs.update(zip(layers, ordered))
    return [(name, pairs[name]) for name in want]


def _take(pairs, expected, state_dict, src: str) -> dict:
    """The jaxnet params of ``pairs``; raises ValueError on a shape or a missing bias."""
    params = {}
    for name, prefix in pairs:
        w = _to_numpy(state_dict[f"{prefix}.weight"], f"{prefix}.weight", src)
        want = tuple(expected[name]["kernel"])
        if w.T.shape != want:
            raise ValueError(
                f"layer {name!r}: {src}[{prefix + '.weight'!r}] has shape {w.shape} (PyTorch [out, in]); "
                f"the model expects kernel {want} ([in, out]), i.e. weight {want[::-1]}"
            )
        layer = {"kernel": jnp.asarray(_f32(w.T))}
        if "bias" in expected[name]:
            if f"{prefix}.bias" not in state_dict:
                raise ValueError(f"layer {name!r} has a bias but {src} has no {prefix + '.bias'!r}")
            b = _to_numpy(state_dict[f"{prefix}.bias"], f"{prefix}.bias", src)
            if b.shape != tuple(expected[name]["bias"]):
                raise ValueError(f"layer {name!r}: {src}[{prefix + '.bias'!r}] has shape {b.shape}, expected "
                                 f"{tuple(expected[name]['bias'])}")
            layer["bias"] = jnp.asarray(_f32(b))
        params[name] = layer
    return params


def load_torch_state_dict(model, state_dict, *, prefixes: list[str] | None = None, strict: bool = True):
    """Starts a jaxnet model from a PyTorch model's weights.

    Layers are paired by name, then by shape, never by registration order alone (the rule is in
    this module's docstring); what cannot be paired for certain is refused.

    Args:
      model: a jaxnet dense stack (``SimpleNet``, ``MLP``), unbound.
      state_dict: ``torch_model.state_dict()`` (tensors), a mapping of NumPy arrays (what
        ``load_safetensors`` returns), or the path of a ``.safetensors`` or ``.pt`` file holding
        one (read without running code; see ``load_torch_file``).
      prefixes: the torch module name of every layer in call order (``["inp", "out"]``), for
        models whose names and shapes do not say it.
      strict: refuse entries that would be ignored, non-finite weights and repeated prefixes.
        False loads anyway and warns (``UserWarning``) with the list.

    Returns:
      The model bound to the imported variables: call it as ``net(x)``; ``net.variables`` is the
      ``{"params": ...}`` pytree for ``model.apply`` or ``TrainState.create(params=...)``.

    Raises:
      ValueError: layer counts or shapes disagree (naming the layer, the key and both shapes; and
        the file, when given a path), an ambiguous pairing, or (strict) leftover entries,
        non-finite weights or repeated prefixes; see ``load_safetensors``/``load_torch_file`` for
        file errors.
      TypeError: a weight that is not floating point; prefixes that are not strings.
    """
    src = "state_dict"
    if isinstance(state_dict, (str, os.PathLike)):
        src, state_dict = os.fspath(state_dict), read_weights(state_dict)
    modules = _linear_modules(state_dict)
    if not modules:
        raise ValueError(f"{src} has no 2-D '*.weight' entry; keys: {_short(list(state_dict))}")
    shape_of = {p: tuple(np.shape(state_dict[f"{p}.weight"])) for p in modules}
    widths = list(dict.fromkeys(shape[1] for shape in shape_of.values()))  # candidate input widths
    if prefixes is not None:
        prefixes = _as_prefixes(prefixes, strict)
        missing = [p for p in prefixes if p not in shape_of]
        if missing:
            raise ValueError(f"prefixes {_short(missing)} have no 2-D '<prefix>.weight' in {src}")
        widths = [shape_of[prefixes[0]][1]] if prefixes else widths  # the first layer's input width
    fits, failures, rejected = [], [], []
    for in_features in widths:
        try:
            expected = _expected_params(model, in_features)
        except (ValueError, TypeError) as e:  # the model fixes its input width, and this is not it
            rejected.append(e)
            continue
        layer_names = _dense_layers(expected)
        if prefixes is not None and len(prefixes) != len(layer_names):
            raise ValueError(f"{len(prefixes)} prefixes {_short(prefixes)} for {len(layer_names)} layers "
                             f"{_short(layer_names)}")
        if prefixes is None and len(modules) < len(layer_names):
            raise ValueError(f"the model has {len(layer_names)} dense layers {_short(layer_names)} but {src} has "
                             f"{len(modules)} 2-D weights {_short([p + '.weight' for p in modules])}")
        want = {name: tuple(expected[name]["kernel"])[::-1] for name in layer_names}
        try:
            pairs = list(zip(layer_names, prefixes)) if prefixes is not None else _pair(want, modules, shape_of, src)
            fits.append((in_features, pairs, _take(pairs, expected, state_dict, src)))
        except ValueError as e:
            failures.append(e)
    if not fits and not failures:
        raise ValueError(f"the model takes none of the input widths {widths} of {src}'s 2-D weights: "
                         f"{str(rejected[0])[:200]}") from rejected[0]
    if not fits:
        raise failures[0]  # the first width tried is the first weight's: usually the input layer
    if len(fits) > 1:
        raise ValueError(f"ambiguous: {src} pairs with the model for input widths {[f[0] for f in fits]}; "
                         "pass prefixes=[torch module per layer]")
    _, pairs, params = fits[0]
    used = []  # the keys loaded, in layer order
    for name, p in pairs:
        used += [f"{p}.weight"] + ([f"{p}.bias"] if "bias" in params[name] else [])
    _refuse(f"{src} has entries the model has no place for", [k for k in state_dict if k not in used], strict)
    bad = []
    for key in dict.fromkeys(used):
        a = _f32(_to_numpy(state_dict[key], key, src))
        if not np.isfinite(a).all():
            bad.append(f"{key} at {tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])}")
    _refuse(f"{src} has non-finite weights (NaN/Inf; first index)", bad, strict)
    return model.bind({"params": params})


def export_torch_state_dict(variables, *, prefixes: list[str] | None = None, as_torch: bool = True,
                            strict: bool = True):
    """The reverse of ``load_torch_state_dict``: a state dict a PyTorch model can ``load_state_dict``.

    Args:
      variables: ``{"params": ...}`` (or the params themselves, or a bound model) of a dense stack.
      prefixes: PyTorch module names for the layers in order, e.g. ``["0", "2", "4"]`` for an
        ``nn.Sequential(Linear, ReLU, Linear, ReLU, Linear)``; default: jaxnet's layer names.
      as_torch: return ``torch.Tensor`` values (imports torch) instead of NumPy arrays.
      strict: refuse repeated prefixes (a later layer would overwrite an earlier one); False warns
        (``UserWarning``) and keeps the later layer.

    Returns:
      ``{"<prefix>.weight": [out, in], "<prefix>.bias": [out]}`` in layer order.

    Raises:
      ValueError: as many prefixes as layers are needed; (strict) repeated prefixes.
      TypeError: a prefix that is not a non-empty string.
    """
    if hasattr(variables, "variables") and not isinstance(variables, dict):
        variables = variables.variables
    params = variables.get("params", variables)
    names = _dense_layers(params)
    prefixes = names if prefixes is None else _as_prefixes(prefixes, strict)
    if len(prefixes) != len(names):
        raise ValueError(f"{len(prefixes)} prefixes {_short(prefixes)} for {len(names)} layers {_short(names)}")
    out = {}
    for name, prefix in zip(names, prefixes):
        out[f"{prefix}.weight"] = np.array(params[name]["kernel"]).T.copy()
        if "bias" in params[name]:
            out[f"{prefix}.bias"] = np.array(params[name]["bias"]).copy()
    if as_torch:
        import torch

        out = {k: torch.from_numpy(v) for k, v in out.items()}
    return out
