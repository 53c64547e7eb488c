"""jaxnet: a readable JAX research library (Flax models, Optax training, fused kernels).

Subpackages load on first use (``jaxnet.models.MLP`` works after ``import jaxnet``, and ``import
jaxnet`` alone imports no JAX): every module in ``SUBPACKAGES``.
"""
import importlib

__version__ = "0.1.0"

SUBPACKAGES = ("arguments", "baselines", "cli", "compress", "data", "explain", "files", "interop", "launch", "losses",
               "metrics", "models", "nn", "optim", "parallel", "plan", "profiling", "random_bits", "regularizers",
               "runtime", "seed", "seed_torch", "studies", "testing", "train")


def __getattr__(name: str):
    if name in SUBPACKAGES:
        return importlib.import_module(f"jaxnet.{name}")
    raise AttributeError(f"module 'jaxnet' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *SUBPACKAGES])
