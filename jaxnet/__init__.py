"""jaxnet: a readable JAX research library (Flax models, Optax training, fused kernels)."""
__version__ = "0.1.0"
