"""L_world: predict the next video chunk's latent from this chunk's and the action between them.

The predictor sees z_t (online pooled trunk output of chunk t) and a_t (the embedded action, or the
learned null action for action-free video); its target is the layer-normed, stop-gradient pooled latent
of chunk t+1 under the EMA target encoder. It predicts the change from chunk t's target latent (the
head adds it, model/heads.py): consecutive chunks' pooled latents are nearly equal (measured on the
default corpus: copy-last MSE ~0.002 against a target variance ~0.8), so a residual starts at the
copy-last baseline and spends its capacity on what the action and the motion change. The target variance (mean over dims of the variance across
valid transitions) is logged so collapse shows; the copy-last baseline is the error of predicting the
target latent of chunk t+1 by that of chunk t. Letters: C transition slots, D model width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from codex_jax.objectives.masked import layer_norm, masked_mean


def loss(pred_CD: jax.Array, target_next_CD: jax.Array, valid_C: jax.Array) -> jax.Array:
  """Masked mean over transitions of the MSE (mean over D) against the layer-normed target."""
  target_CD = jax.lax.stop_gradient(layer_norm(target_next_CD))
  return masked_mean(jnp.mean(jnp.square(pred_CD.astype(jnp.float32) - target_CD), axis=-1), valid_C)


def target_variance(target_next_CD: jax.Array, valid_C: jax.Array) -> jax.Array:
  target_CD = layer_norm(target_next_CD)
  w_C1 = valid_C.astype(jnp.float32)[:, None]
  n = jnp.maximum(jnp.sum(w_C1), 1.0)
  mean_D = jnp.sum(target_CD * w_C1, axis=0) / n
  return jnp.mean(jnp.sum(jnp.square(target_CD - mean_D) * w_C1, axis=0) / n)


def copy_last_mse(target_this_CD: jax.Array, target_next_CD: jax.Array, valid_C: jax.Array) -> jax.Array:
  err_C = jnp.mean(jnp.square(layer_norm(target_this_CD) - layer_norm(target_next_CD)), axis=-1)
  return masked_mean(err_C, valid_C)
