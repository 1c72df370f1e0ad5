"""L_text: next-token cross-entropy with z-loss, averaged over the tokens the loss mask keeps."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_loss(logits_BLV: jax.Array, targets_BL: jax.Array, loss_mask_BL: jax.Array,
                    z_loss: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean CE + z_loss * mean(logsumexp^2) over masked-in tokens; padding contributes nothing.

  Targets never cross a packed segment boundary: the data pipeline pairs inputs and targets within
  each document, so the mask only has to drop padding.
  """
  logits_BLV = logits_BLV.astype(jnp.float32)
  lse_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  ce_BL = lse_BL - target_logit_BL
  mask_BL = loss_mask_BL.astype(jnp.float32)
  tokens = jnp.sum(mask_BL)
  denom = jnp.maximum(tokens, 1.0)
  ce = jnp.sum(ce_BL * mask_BL) / denom
  z = jnp.sum(jnp.square(lse_BL) * mask_BL) / denom
  return ce + z_loss * z, {"ce_loss": ce, "z_loss": z, "tokens": tokens}
