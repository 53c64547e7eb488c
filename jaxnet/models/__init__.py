"""Model families: one module per family."""
from jaxnet.models.cnn import CNN
from jaxnet.models.mlp import MLP, SimpleNet
from jaxnet.models.recsys import NCF, MatrixFactorization, TwoTower
from jaxnet.models.transformer import TransformerClassifier, TransformerConfig, TransformerLM

__all__ = ["CNN", "MLP", "MatrixFactorization", "NCF", "SimpleNet", "TransformerClassifier", "TransformerConfig",
           "TransformerLM", "TwoTower"]
