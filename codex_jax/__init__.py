"""codex-jax: JAX/TPU-first pretraining of multimodal base models."""

__version__ = "0.1.0"
