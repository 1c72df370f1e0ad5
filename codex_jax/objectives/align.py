"""L_align: contrastive loss between pooled media (image/video) and caption latents of paired examples.

`clip`: symmetric InfoNCE with a learned temperature (Radford et al. 2021); `siglip`: the pairwise sigmoid
loss with learned scale t and bias b (Zhai et al. 2023), summed over each row and averaged over pairs.
The [C, C] similarity spans the global batch: under jit with the batch sharded over `data`, XLA gathers
the other shards' latents for it, so negatives come from every data-parallel replica.
Letters: C pair slots, E the shared embedding width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from codex_jax.objectives.masked import info_nce, l2_normalise, masked_mean

MAX_LOG_SCALE = 4.6052  # log(100): CLIP's clamp on the learned logit scale.


def similarity(media_CE: jax.Array, text_CE: jax.Array) -> jax.Array:
  """Cosine similarities [C, C]: media rows, text columns."""
  return l2_normalise(media_CE) @ l2_normalise(text_CE).T


def clip_loss(media_CE, text_CE, valid_C, log_scale) -> jax.Array:
  logits_CC = jnp.exp(jnp.minimum(log_scale, MAX_LOG_SCALE)) * similarity(media_CE, text_CE)
  return 0.5 * (info_nce(logits_CC, valid_C) + info_nce(logits_CC.T, valid_C))


def siglip_loss(media_CE, text_CE, valid_C, log_scale, bias) -> jax.Array:
  logits_CC = jnp.exp(log_scale) * similarity(media_CE, text_CE) + bias
  labels_CC = 2.0 * jnp.eye(logits_CC.shape[0]) - 1.0
  pair_CC = valid_C[:, None] & valid_C[None, :]
  nll_CC = jnp.where(pair_CC, -jax.nn.log_sigmoid(labels_CC * logits_CC), 0.0)
  return masked_mean(jnp.sum(nll_CC, axis=-1), valid_C)


def loss(kind: str, media_CE, text_CE, valid_C, log_scale, bias) -> jax.Array:
  if kind == "clip":
    return clip_loss(media_CE, text_CE, valid_C, log_scale)
  return siglip_loss(media_CE, text_CE, valid_C, log_scale, bias)

