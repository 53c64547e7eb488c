"""Saving and loading a quantised variables tree: one ``.safetensors`` file, checked on the way in.

The file holds every array under its dotted name (``params.layers_0.w_q`` int8, ``...scale``
float32, ``batch_stats...``; ``jaxnet.interop.save_safetensors``), and its header's metadata holds
the format name and the SHA-256 of each array's bytes: safetensors checks the header's sizes but
not the data, so a flipped byte would otherwise load silently. Nothing in the file is executed.
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from jaxnet.compress.quantize import check_quantized
from jaxnet.data.checks import snippet
from jaxnet.interop.files import flatten, load_safetensors, safetensors_metadata, save_safetensors, to_numpy, unflatten
from jaxnet.train.checkpoint import array_hash

FORMAT = "jaxnet.compress.quantized/1"


def save_quantized(path, qvariables) -> None:
    """Writes ``qvariables`` (from ``quantize``) to the ``.safetensors`` file ``path``, atomically.

    Raises:
      TypeError / ValueError: not a well-formed quantised tree (``check_quantized``).
    """
    check_quantized(qvariables)
    flat = {name: to_numpy(value, name) for name, value in flatten(qvariables).items()}
    hashes = {name: array_hash(a) for name, a in flat.items()}
    save_safetensors(path, flat, metadata={"format": FORMAT, "sha256": json.dumps(hashes)})


def load_quantized(path, like=None) -> dict:
    """Reads a tree written by ``save_quantized``, strictly.

    Args:
      path: the ``.safetensors`` file.
      like: optional tree the file must match exactly: the same names, shapes and dtypes (e.g.
        ``quantize(model.init(...))`` of the model it will run in).

    Returns:
      The quantised variables (JAX arrays), bit for bit as saved.

    Raises:
      FileNotFoundError: no such file. ValueError, naming the file: not a safetensors file, not one
      written by ``save_quantized``, an array whose bytes differ from the hash saved with it, names
      missing or extra against the hashes or against ``like``, a shape or dtype other than
      ``like``'s, or a malformed quantised layer.
    """
    path = os.fspath(path)
    meta = safetensors_metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a quantised tree written by save_quantized "
                         f"(format {snippet(meta.get('format'))}, expected {FORMAT!r})")
    try:
        hashes = json.loads(meta["sha256"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: damaged header: no readable array hashes ({e})") from None
    flat = load_safetensors(path)
    _same_names(path, "the hashes saved with it", set(hashes), set(flat))
    damaged = [name for name, a in flat.items() if array_hash(a) != hashes[name]]
    if damaged:
        raise ValueError(f"{path}: the bytes of {len(damaged)} array(s) differ from their saved hash "
                         f"(corrupted file?): {snippet(damaged)}")
    if like is not None:
        expected = {name: (tuple(np.shape(v)), np.dtype(v.dtype)) for name, v in flatten(like).items()}
        _same_names(path, "like", set(expected), set(flat))
        wrong = [f"{name}: {a.dtype}{list(a.shape)} (like: {expected[name][1]}{list(expected[name][0])})"
                 for name, a in flat.items() if (a.shape, a.dtype) != expected[name]]
        if wrong:
            raise ValueError(f"{path}: {len(wrong)} array(s) differ from like: {snippet(wrong, 160)}")
    tree = unflatten({name: jnp.asarray(a) for name, a in flat.items()})
    check_quantized(tree, where=path)
    return tree


def _same_names(path: str, what: str, expected: set, found: set) -> None:
    missing, extra = sorted(expected - found), sorted(found - expected)
    if missing or extra:
        raise ValueError(f"{path}: arrays differ from {what}: missing {snippet(missing)}, unexpected {snippet(extra)}")
