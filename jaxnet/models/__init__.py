"""Model families: one module per family."""
from jaxnet.models.mlp import MLP, SimpleNet

__all__ = ["MLP", "SimpleNet"]
