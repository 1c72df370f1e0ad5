"""L_vision: MAE on masked image patches (per-patch normalised pixels) + a two-view image InfoNCE.

View 1 is the online pooled latent of the masked image (projected), view 2 the EMA target encoder's
pooled latent of the same clean image; the other masked images of the batch are the negatives.
Letters: C image slots, P patches per image, X values per patch, D model width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from codex_jax.objectives.masked import info_nce, l2_normalise, layer_norm, masked_mean


def normalised_pixels(patches_CPX: jax.Array) -> jax.Array:
  """Each patch minus its mean over its values, over its std (MAE's norm_pix_loss target): a parameter-free
  layer norm over the patch's values."""
  return layer_norm(patches_CPX)


def mae_loss(pred_CPX: jax.Array, patches_CPX: jax.Array, masked_CP: jax.Array) -> jax.Array:
  """Mean over masked patches of the mean squared error against the normalised pixels."""
  err_CP = jnp.mean(jnp.square(pred_CPX.astype(jnp.float32) - normalised_pixels(patches_CPX)), axis=-1)
  return masked_mean(err_CP.reshape(-1), masked_CP.reshape(-1))


def two_view_loss(online_CD: jax.Array, target_CD: jax.Array, valid_C: jax.Array, temperature: float) -> jax.Array:
  """InfoNCE of online (masked) against target (clean) views, cosine similarity over a temperature."""
  logits_CC = l2_normalise(online_CD) @ l2_normalise(jax.lax.stop_gradient(target_CD)).T / temperature
  return info_nce(logits_CC, valid_C)
