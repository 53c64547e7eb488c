"""Interoperability with other frameworks: PyTorch state dicts, and weights files that run no code
(``.safetensors`` read and written, ``.pt`` read with ``torch.load(weights_only=True)``)."""
from jaxnet.interop.files import (
    UnsafeFileError,
    flatten,
    load_safetensors,
    load_torch_file,
    safetensors_metadata,
    save_safetensors,
    unflatten,
)
from jaxnet.interop.torch import export_torch_state_dict, load_torch_state_dict

__all__ = [
    "UnsafeFileError",
    "export_torch_state_dict",
    "flatten",
    "load_safetensors",
    "load_torch_file",
    "load_torch_state_dict",
    "safetensors_metadata",
    "save_safetensors",
    "unflatten",
]
