"""Masked means and the two-view InfoNCE shared by the objectives: absent slots contribute exactly nothing."""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = -1e9  # Logit of an invalid column: exp() underflows to 0, no inf - inf.


def masked_mean(values_C: jax.Array, valid_C: jax.Array) -> jax.Array:
  """sum(values * valid) / max(sum(valid), 1): 0 with zero gradient when nothing is valid."""
  valid_C = valid_C.astype(jnp.float32)
  return jnp.sum(jnp.where(valid_C > 0, values_C, 0.0) * valid_C) / jnp.maximum(jnp.sum(valid_C), 1.0)


def l2_normalise(x_CE: jax.Array, eps: float = 1e-6) -> jax.Array:
  x_CE = x_CE.astype(jnp.float32)
  return x_CE * jax.lax.rsqrt(jnp.sum(x_CE * x_CE, axis=-1, keepdims=True) + eps)


def info_nce(logits_CC: jax.Array, valid_C: jax.Array) -> jax.Array:
  """Mean over valid rows i of -log softmax_j(logits[i, j])[i], columns restricted to valid j."""
  logits_CC = jnp.where(valid_C[None, :], logits_CC, NEG)
  log_p_CC = jax.nn.log_softmax(logits_CC, axis=-1)
  return masked_mean(-jnp.diagonal(log_p_CC), valid_C)


def layer_norm(x_CD: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Parameter-free layer norm over the last axis (the world model's targets, as I-JEPA / V-JEPA)."""
  x_CD = x_CD.astype(jnp.float32)
  mean = jnp.mean(x_CD, axis=-1, keepdims=True)
  var = jnp.var(x_CD, axis=-1, keepdims=True)
  return (x_CD - mean) * jax.lax.rsqrt(var + eps)
