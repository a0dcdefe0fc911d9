"""jaxtune: instruction fine-tuning of decoder-only language models in JAX/Flax."""

__version__ = "0.1.0"
