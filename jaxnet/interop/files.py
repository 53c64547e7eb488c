"""Weights files that hold arrays and nothing else: ``.safetensors`` read and written, ``.pt`` read.

Nothing here runs code from a file. A pickle (what ``torch.save`` writes and ``torch.load`` reads
by default) can call any function while it is loaded, so a file from elsewhere can run commands on
this machine. safetensors files are a JSON header (names, dtypes, shapes, byte offsets) followed by
raw bytes: reading one builds arrays only. ``.pt`` files are read with
``torch.load(..., weights_only=True)``, whose unpickler builds only tensors and plain containers;
anything else is refused with ``UnsafeFileError``.

Nested dicts (Flax variables) are stored under dotted names, the PyTorch convention:
``{"params": {"fc1": {"kernel": [10, 5]}}}`` <-> ``{"params.fc1.kernel": [10, 5]}``.
"""
from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxnet.files import atomic_path


class UnsafeFileError(ValueError):
    """A weights file that would run code, or build objects other than arrays, if it were loaded."""


def flatten(tree, *, sep: str = ".") -> dict:
    """Nested mappings to one level of ``sep``-joined names.

    Args:
      tree: nested dicts (Flax variables or params), a bound Flax module (its ``.variables``), or an
        already flat state dict (``{"fc1.weight": ..., ...}``, returned with the same names).

    Returns:
      ``{"params.fc1.kernel": leaf, ...}`` in the tree's order. Empty sub-dicts have no leaf to
      carry their name and are dropped.

    Raises:
      TypeError: a key is not a string. ValueError: two paths give the same name.
    """
    if hasattr(tree, "variables") and not isinstance(tree, Mapping):
        tree = tree.variables
    out = {}

    def visit(node, prefix):
        for key, value in node.items():
            if not isinstance(key, str):
                raise TypeError(f"key {key!r} under {prefix or 'the top level'!r} is a "
                                f"{type(key).__name__}; names must be strings")
            name = f"{prefix}{sep}{key}" if prefix else key
            if isinstance(value, Mapping):
                visit(value, name)
            elif name in out:
                # e.g. {"a.b": x, "a": {"b": y}}: the file could hold only one of them.
                raise ValueError(f"two entries are both named {name!r} once flattened")
            else:
                out[name] = value

    visit(tree, "")
    return out


def unflatten(flat: Mapping, *, sep: str = ".") -> dict:
    """The inverse of ``flatten``: ``{"params.fc1.kernel": a}`` -> ``{"params": {"fc1": {"kernel": a}}}``.

    Raises:
      ValueError: a name is both a leaf and a prefix of another name (``"a"`` and ``"a.b"``).
    """
    out: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(sep)
        node = out
        for i, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{name!r} lies under {sep.join(parents[: i + 1])!r}, which is an array")
        if leaf in node:
            raise ValueError(f"{name!r} is an array and also the prefix of other names")
        node[leaf] = value
    return out


def to_numpy(value, name: str) -> np.ndarray:
    """A NumPy array of a JAX/NumPy array or a ``torch.Tensor``, bit for bit (bfloat16 included).

    Raises:
      TypeError: the value is not numeric (naming ``name``) or its dtype has no NumPy equivalent.
    """
    if hasattr(value, "detach"):  # a torch.Tensor (torch is imported only when one is given)
        t = value.detach().cpu().contiguous()
        if str(t.dtype) == "torch.bfloat16":
            import torch  # importable: value is one of its tensors

            # torch has no NumPy bfloat16; the same 16 bits, viewed as ml_dtypes' bfloat16, are exact.
            return t.view(torch.int16).numpy().view(jnp.bfloat16)
        try:
            return t.numpy()
        except TypeError as e:
            raise TypeError(f"{name!r}: torch dtype {t.dtype} has no NumPy equivalent") from e
    a = np.asarray(value)
    # jnp.issubdtype also knows ml_dtypes' bfloat16 and float8 types, which NumPy calls void.
    if not (a.dtype == np.bool_ or jnp.issubdtype(a.dtype, jnp.number)):
        raise TypeError(f"{name!r} has dtype {a.dtype}; expected numeric arrays")
    return a


def save_safetensors(path, variables_or_state_dict, *, metadata: dict[str, str] | None = None) -> None:
    """Writes arrays to a ``.safetensors`` file, atomically (a crash leaves any old file whole).

    Args:
      path: the file to write.
      variables_or_state_dict: Flax variables ``{"params": {...}}`` (or params, or a bound model),
        stored under dotted names ``params.fc1.kernel``; or a flat PyTorch-style state dict
        ``{"fc1.weight": [out, in], ...}`` of NumPy/JAX arrays or torch tensors. Dtypes are kept
        (float32, bfloat16, int32, ...).
      metadata: text stored in the header (``{"step": "100"}``): strings to strings.

    Raises:
      TypeError: metadata that is not ``str -> str``, or a value that is not a numeric array.
    """
    path = os.fspath(path)
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError(f"metadata must map strings to strings; got {metadata!r}")
    # asarray(order="C"), not ascontiguousarray, which turns 0-d arrays (a step, a scale) into [1].
    flat = {name: np.asarray(to_numpy(v, name), order="C") for name, v in flatten(variables_or_state_dict).items()}
    with atomic_path(path) as tmp:  # readers see the old file or the new one, never half
        save_file(flat, str(tmp), metadata=metadata)


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _open_safetensors(path: str):
    """``safe_open`` with its errors turned into ones that name the file."""
    with open(path, "rb") as f:  # a missing file or a directory fails here, with the path
        head = f.read(4)
    try:
        return safe_open(path, framework="np")
    except SafetensorError as e:
        hint = ""
        if head.startswith(b"PK") or head[:1] == b"\x80":
            hint = ("; it starts like a PyTorch .pt file or a pickle: read those with load_torch_file, "
                    "which refuses pickled code")
        raise ValueError(f"{path}: not a valid safetensors file (corrupt or truncated?): {e}{hint}") from e


def load_safetensors(path) -> dict[str, np.ndarray]:
    """Reads every array of a ``.safetensors`` file; no torch needed and nothing is executed.

    Args:
      path: a file written by ``save_safetensors`` or by ``safetensors.torch.save_file``.

    Returns:
      ``{name: array}`` with the stored dtypes and shapes (bfloat16 as ``jnp.bfloat16``), names in
      natural order (``layers_2`` before ``layers_10``; the format keeps no order of its own).
      ``unflatten`` gives back nested Flax variables; ``load_torch_state_dict(model, ...)`` takes a
      PyTorch-style result (``fc1.weight``) as it is.

    Raises:
      FileNotFoundError: no such file. ValueError: a corrupt or truncated file, or a header whose
      sizes disagree with the file (checked before any data is read).
    """
    path = os.fspath(path)
    with _open_safetensors(path) as f:
        try:
            return {k: f.get_tensor(k) for k in sorted(f.keys(), key=_natural_key)}
        except (SafetensorError, TypeError) as e:  # TypeError: a dtype NumPy cannot hold
            raise ValueError(f"{path}: cannot read its arrays: {e}") from e


def safetensors_metadata(path) -> dict[str, str]:
    """The text ``metadata`` stored in a ``.safetensors`` header (``{}`` when none)."""
    path = os.fspath(path)
    with _open_safetensors(path) as f:
        return dict(f.metadata() or {})


def _weights_only_reason(message: str) -> str:
    """The line of torch's refusal that says what the file asked for (``Unsupported global: ...``)."""
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. |\n\n|$)", message, re.S)
    return m.group(1).strip() if m else message.splitlines()[0]


def load_torch_file(path) -> dict[str, np.ndarray]:
    """Reads a PyTorch ``.pt``/``.pth`` state dict without running code from it.

    The file is read with ``torch.load(path, map_location="cpu", weights_only=True)``.

    Args:
      path: what ``torch.save(model.state_dict(), path)`` wrote. Nested dicts of tensors are
        flattened to dotted names.

    Returns:
      ``{name: array}`` in the file's order, e.g. ``{"fc1.weight": [out, in], "fc1.bias": [out]}``.

    Raises:
      UnsafeFileError: the pickle asks for anything besides tensors and plain containers (a class,
        a function such as ``os.system``): it was not run. ValueError: a corrupt file, content
        that is not a dict, or an entry that is not a tensor (naming it). FileNotFoundError: no
        such file. ImportError: torch is not installed.
    """
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} needs PyTorch (the 'torch' extra); .safetensors files "
                          "need only load_safetensors") from e
    path = os.fspath(path)
    try:
        with warnings.catch_warnings():
            # torch warns when a plain pickle uses a newer protocol than torch.save's; the
            # weights-only unpickler then reads or refuses it, and that outcome is what we report.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # missing file, a directory, no permission: the message names the path
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise ValueError(f"{path}: not a readable PyTorch file: {e}") from e
        raise UnsafeFileError(
            f"{path}: refused: loading it would execute code or build objects other than tensors "
            f"({_weights_only_reason(str(e))}). Only weights are read (torch.load(weights_only=True)). "
            "Ask for a .safetensors file (load_safetensors), or, if you trust the file, load it "
            "yourself and keep its tensors."
        ) from None  # torch's message suggests weights_only=False, the very thing refused here
    except Exception as e:  # torch raises RuntimeError, EOFError, ... for corrupt or truncated files
        raise ValueError(f"{path}: not a readable PyTorch file (corrupt or truncated?): {e}") from e
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict (a dict of tensors)")
    out = {}
    for name, value in flatten(obj).items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
        out[name] = to_numpy(value, name)
    return out


def read_weights(path) -> dict[str, np.ndarray]:
    """``load_safetensors`` or ``load_torch_file``, chosen by the file's content, not its name."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(9)
    # A safetensors file opens with an 8-byte header length, then the header's JSON '{'.
    return load_safetensors(path) if head[8:9] == b"{" else load_torch_file(path)
