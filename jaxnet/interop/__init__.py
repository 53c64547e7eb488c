"""Interoperability with other frameworks (PyTorch state dicts)."""
from jaxnet.interop.torch import export_torch_state_dict, load_torch_state_dict

__all__ = ["export_torch_state_dict", "load_torch_state_dict"]
