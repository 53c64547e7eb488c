"""Post-training int8 quantisation of a trained model's dense layers.

``quantize_weight(w)`` turns one ``[K, N]`` float kernel into int8 values and one float32 scale per
output column (symmetric: ``w ~ w_q * scale``). ``quantize(variables, rules)`` does it for every
dense layer of a Flax variables tree whose module path a rule's regex matches (Qwix's rule format)
and returns a tree that ``jaxnet.compress.apply_quantized`` runs through the unchanged model.

A dense layer is a params node ``{"kernel": [K, N], "bias": [N]?}`` (what ``FusedDense`` and
``flax.linen.Dense`` hold). Convolutions (4-D kernels), embeddings, norms and every other
collection stay float32. A quantised layer's node becomes::

    {"w_q": int8 [K, N], "scale": float32 [N], "bias": [N] (unchanged, if the layer has one),
     "act_int8": bool []  (w8a8 only: its presence, a static key, selects per-row int8 activations)}
"""
from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet.data.checks import snippet

QMAX = 127  # symmetric int8: [-127, 127], so that -w quantises to -w_q (no lone -128)
ACT_MARKER = "act_int8"
QUANTIZED_KEYS = frozenset({"w_q", "scale", "bias", ACT_MARKER})


def quantize_weight(w, *, per_tensor: bool = False) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 quantisation of a dense kernel, one scale per output column.

    ``scale[n] = max_k |w[k, n]| / 127`` (with ``per_tensor``: the whole kernel's max, repeated N
    times) and ``w_q = clip(round(w / scale), -127, 127)``, to the nearest integer. Every element is
    then within half a step of its dequantised value: ``|w - w_q * scale| <= scale / 2``. A column
    whose scale would be 0 (all zeros) or below float32's smallest normal number gets scale 1.0: its
    ``w_q`` is 0, which is exact (or off by less than 1e-35), and nothing divides by zero.

    XLA divides by a broadcast or constant divisor as a product with its reciprocal, so ``scale``
    and ``w / scale`` are each within about 1 ulp of the exact quotient: the bound above holds up
    to ``127 * eps`` of a step, and a weight that close to a half step may round either way.

    Args:
      w: ``[K, N]`` floating-point kernel (float32, bfloat16, float16 or float64), finite.
      per_tensor: one scale for the whole kernel instead of one per output column.

    Returns:
      ``(w_q: int8 [K, N], scale: float32 [N])``.

    Raises:
      TypeError: ``w`` is not a floating-point array. ValueError: ``w`` is not 2-D with K, N >= 1,
      or holds NaN/Inf (naming the columns, when ``w`` is concrete).
    """
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"quantize_weight: w must be a floating-point [K, N] kernel, got dtype {w.dtype}")
    if w.ndim != 2 or 0 in w.shape:
        raise ValueError(f"quantize_weight: w must be a [K, N] kernel with K, N >= 1, got shape {tuple(w.shape)}")
    w_q, scale, absmax = _quantize(w, per_tensor=bool(per_tensor))
    _check_finite(absmax, w.shape)
    return w_q, scale


@functools.partial(jax.jit, static_argnames="per_tensor")
def _quantize(w, *, per_tensor: bool):
    """``(w_q, scale, absmax)``: one compiled program per kernel shape, not one per operation."""
    w = w.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(w), axis=0)  # (N,)
    if per_tensor:
        absmax = jnp.full_like(absmax, jnp.max(absmax))
    scale = absmax / QMAX
    # XLA on the CPU flushes subnormal numbers to zero: a scale below the smallest normal float
    # would divide by zero.
    scale = jnp.where(scale >= jnp.finfo(jnp.float32).tiny, scale, 1.0)
    w_q = jnp.clip(jnp.round(w / scale), -QMAX, QMAX).astype(jnp.int8)
    return w_q, scale, absmax


def _check_finite(absmax, shape) -> None:
    """ValueError naming the columns whose max is NaN/Inf (skipped under a trace)."""
    try:
        host = np.asarray(absmax)
    except jax.errors.TracerArrayConversionError:
        return
    bad = np.flatnonzero(~np.isfinite(host))
    if bad.size:
        raise ValueError(f"quantize_weight: w {tuple(shape)} holds NaN/Inf in {bad.size} column(s), "
                         f"first {snippet(bad[:8].tolist())}")


# --- rules ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantRule:
    """Which dense layers to quantise and how; the fields Qwix's ``QuantizationRule`` shares mean
    what they mean there (``qwix.QuantizationRule`` objects are accepted as they are).

    Attributes:
      module_path: regex matched with ``re.fullmatch`` against the layer's module path, its names
        joined by "/" (``"layers_0"``, ``"trunk/block0/attn/qkv"``, ``"head_.*"``). The first rule
        that matches a layer decides it.
      weight_qtype: ``"int8"`` (or ``jnp.int8``) to quantise the kernel; None leaves the layer
        float (an exclusion rule, as in Qwix).
      act_qtype: None (weight-only) or ``"int8"`` (w8a8: each row of the layer's input is
        quantised to int8 with its own scale, computed at run time).
      per_tensor: one weight scale for the whole kernel instead of one per output channel
        (jaxnet's own field; Qwix has none).
    """

    module_path: str = ".*"
    weight_qtype: Any = None
    act_qtype: Any = None
    per_tensor: bool = False


def _qtype(value, field: str) -> str | None:
    """``"int8"`` for any spelling of int8, None for None; ValueError otherwise."""
    if value is None:
        return None
    try:
        ok = np.dtype(value) == np.int8
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{field} must be 'int8' or None (int8 is the one type jaxnet runs), got {snippet(value)}")
    return "int8"


def as_rule(rule) -> QuantRule:
    """A ``QuantRule`` from a ``QuantRule`` or a ``qwix.QuantizationRule``.

    Raises:
      TypeError: anything else. ValueError: a Qwix setting jaxnet does not run (``op_names``,
      ``tile_size``, static activation scales, a calibration other than absmax), a qtype other than
      int8, activations quantised without weights, or a ``module_path`` that is not a regex.
    """
    if isinstance(rule, QuantRule):
        out = rule
    elif hasattr(rule, "module_path") and hasattr(rule, "weight_qtype"):  # qwix.QuantizationRule
        allowed = {"op_names": ((),), "tile_size": (None,), "act_static_scale": (None, False),
                   "weight_calibration_method": ("absmax",), "act_calibration_method": (None, "absmax")}
        for field, ok in allowed.items():
            value = getattr(rule, field, ok[0])
            if (tuple(value) if field == "op_names" else value) not in ok:
                raise ValueError(f"rule {snippet(rule.module_path)}: {field}={snippet(value)} is not supported by "
                                 "jaxnet.compress (dense layers, per-channel absmax, dynamic activations)")
        out = QuantRule(module_path=rule.module_path, weight_qtype=rule.weight_qtype, act_qtype=rule.act_qtype)
    else:
        raise TypeError(f"a rule must be a jaxnet.compress.QuantRule or a qwix.QuantizationRule, got {snippet(rule)}")
    if not isinstance(out.module_path, str):
        raise TypeError(f"module_path must be a regex string, got {snippet(out.module_path)}")
    try:
        re.compile(out.module_path)
    except re.error as e:
        raise ValueError(f"module_path {snippet(out.module_path)} is not a regex: {e}") from None
    weight, act = _qtype(out.weight_qtype, "weight_qtype"), _qtype(out.act_qtype, "act_qtype")
    if act is not None and weight is None:
        raise ValueError(f"rule {snippet(out.module_path)}: act_qtype needs weight_qtype='int8' (w8a8); "
                         "int8 activations with float weights are not a mode")
    return dataclasses.replace(out, weight_qtype=weight, act_qtype=act)


# --- trees ------------------------------------------------------------------------------------------


def dense_layers(params: Mapping, prefix: tuple[str, ...] = ()) -> dict[str, Mapping]:
    """``{"trunk/block0/mlp/fc": node, ...}``: every dense layer of a params tree (a node holding a
    2-D ``kernel`` and at most a ``bias`` besides), by module path, in the tree's order."""
    out = {}
    for key, node in params.items():
        if not isinstance(node, Mapping):
            continue
        path = (*prefix, str(key))
        kernel = node.get("kernel")
        if kernel is not None and getattr(kernel, "ndim", None) == 2 and set(node) <= {"kernel", "bias"}:
            out["/".join(path)] = node
        else:
            out.update(dense_layers(node, path))
    return out


def _params(variables, name: str) -> Mapping:
    if not isinstance(variables, Mapping) or not isinstance(variables.get("params"), Mapping):
        raise TypeError(f"{name} must be Flax variables {{'params': {{...}}, ...}}, got {snippet(variables)}")
    return variables["params"]


def _replace_at(tree: Mapping, path: Sequence[str], node) -> dict:
    """A copy of nested dicts ``tree`` with the node at ``path`` replaced."""
    out = dict(tree)
    out[path[0]] = node if len(path) == 1 else _replace_at(tree[path[0]], path[1:], node)
    return out


def quantize(variables, rules: Sequence = (QuantRule(weight_qtype="int8"),)) -> dict:
    """Quantises the dense layers of a trained model's variables, chosen by ``rules``.

    Args:
      variables: Flax variables ``{"params": {...}, ...}`` (other collections, such as
        ``batch_stats``, are kept as they are).
      rules: ``QuantRule`` or ``qwix.QuantizationRule`` objects in order of precedence. The
        default quantises every dense layer's weights (weight-only int8, per channel);
        ``[QuantRule(weight_qtype="int8", act_qtype="int8")]`` is w8a8 everywhere, and
        ``[QuantRule(module_path="logits", weight_qtype=None), QuantRule(weight_qtype="int8")]``
        keeps a layer float.

    Returns:
      A new variables tree whose quantised layers hold ``w_q``, ``scale``, ``bias`` (and
      ``act_int8`` for w8a8), see the module docstring.

    Raises:
      TypeError / ValueError: not a variables tree, a bad rule (``as_rule``), no dense layer at
      all, or a rule that matches no dense layer (a typo would otherwise quantise nothing silently).
    """
    params = _params(variables, "variables")
    if isinstance(rules, (QuantRule, str)) or not isinstance(rules, Sequence):
        raise TypeError(f"rules must be a sequence of rules, got {snippet(rules)}")
    rules = [as_rule(r) for r in rules]
    layers = dense_layers(params)
    if not layers:
        raise ValueError("quantize: variables['params'] holds no dense layer (a 2-D 'kernel')")
    used = [False] * len(rules)
    new_params = params
    for path, node in layers.items():
        i = next((i for i, r in enumerate(rules) if re.fullmatch(r.module_path, path)), None)
        if i is None:
            continue
        used[i] = True
        rule = rules[i]
        if rule.weight_qtype is None:
            continue
        w_q, scale = quantize_weight(node["kernel"], per_tensor=rule.per_tensor)
        q = {"w_q": w_q, "scale": scale}
        if "bias" in node:
            q["bias"] = node["bias"]
        if rule.act_qtype is not None:
            q[ACT_MARKER] = jnp.asarray(True)
        new_params = _replace_at(new_params, path.split("/"), q)
    unused = [r.module_path for r, u in zip(rules, used) if not u]
    if unused:
        raise ValueError(f"quantize: rule(s) {snippet(unused)} match no dense layer; "
                         f"the dense layers are {snippet(list(layers))}")
    return {**variables, "params": new_params}


def quantized_layers(params: Mapping, prefix: tuple[str, ...] = ()) -> dict[str, Mapping]:
    """``{module path: node}`` of every quantised layer (a node holding ``w_q``) of a params tree."""
    out = {}
    for key, node in params.items():
        if isinstance(node, Mapping):
            path = (*prefix, str(key))
            out.update({"/".join(path): node} if "w_q" in node else quantized_layers(node, path))
    return out


def check_quantized(variables, where: str = "qvariables") -> None:
    """Checks every quantised layer of a tree: the keys, ``w_q`` int8 ``[K, N]``, ``scale`` float32
    ``[N]`` finite and > 0, ``bias`` ``[N]``. ``where`` names the tree (or file) in the errors.

    Raises:
      TypeError: a wrong dtype. ValueError: no quantised layer, a wrong key or shape, a bad scale.
    """
    layers = quantized_layers(_params(variables, where))
    if not layers:
        raise ValueError(f"{where}: no quantised layer (a params node with 'w_q'); make one with quantize()")
    for path, node in layers.items():
        name = f"{where}: layer {path!r}"
        extra = set(node) - QUANTIZED_KEYS
        if extra or "scale" not in node:
            raise ValueError(f"{name} has keys {sorted(node)}; expected w_q, scale and optionally bias, {ACT_MARKER}")
        w_q, scale = node["w_q"], node["scale"]
        if w_q.dtype != jnp.int8 or scale.dtype != jnp.float32:
            raise TypeError(f"{name}: w_q must be int8 and scale float32, got {w_q.dtype} and {scale.dtype}")
        if w_q.ndim != 2 or scale.shape != w_q.shape[1:]:
            raise ValueError(f"{name}: w_q {tuple(w_q.shape)} must be [K, N] and scale [N], "
                             f"got scale {tuple(scale.shape)}")
        if "bias" in node and node["bias"].shape != scale.shape:
            raise ValueError(f"{name}: bias {tuple(node['bias'].shape)} must be [N] = {tuple(scale.shape)}")
        try:
            s = np.asarray(scale)
        except jax.errors.TracerArrayConversionError:
            continue
        if not (np.isfinite(s).all() and (s > 0).all()):
            raise ValueError(f"{name}: scale must be finite and > 0, got {snippet(s.tolist())}")


def tree_bytes(tree) -> int:
    """Bytes of every array in a pytree (shape times item size)."""
    return sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def bytes_before_after(variables, qvariables) -> tuple[int, int]:
    """``(bytes of variables, bytes of qvariables)``: every array of both trees, other collections
    included. Each quantised ``[K, N]`` layer goes from ``4KN + 4N`` bytes (float32 kernel and bias)
    to ``KN + 8N`` (int8 kernel, float32 scale and bias), plus 1 byte for a w8a8 marker."""
    return tree_bytes(variables), tree_bytes(qvariables)
