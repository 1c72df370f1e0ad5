"""L_text: next-token cross-entropy with z-loss, averaged over the tokens the loss mask keeps."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_sums(logits_BLV: jax.Array, targets_BL: jax.Array, loss_mask_BL: jax.Array) -> dict[str, jax.Array]:
  """Sums over masked-in tokens of CE and logsumexp^2, and the token count: they add across microbatches.

  Vocab-parallel: with the vocab dimension sharded over `tensor`, logsumexp and the target logit are
  reductions over that axis (partial per shard, then one all-reduce of [B, L] values), so the full
  logits never sit on one device. The target logit is picked by a one-hot product rather than a
  gather, which would need the whole vocab row.
  """
  logits_BLV = logits_BLV.astype(jnp.float32)
  lse_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  is_target_BLV = jax.nn.one_hot(targets_BL, logits_BLV.shape[-1], dtype=jnp.bool_)
  target_logit_BL = jnp.sum(jnp.where(is_target_BLV, logits_BLV, 0.0), axis=-1)
  mask_BL = loss_mask_BL.astype(jnp.float32)
  return {"ce_sum": jnp.sum((lse_BL - target_logit_BL) * mask_BL),
          "z_sum": jnp.sum(jnp.square(lse_BL) * mask_BL), "tokens": jnp.sum(mask_BL)}


def loss_from_sums(sums: dict[str, jax.Array], z_loss: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean CE + z_loss * mean(logsumexp^2), and the metrics, from (possibly accumulated) sums.

  `tokens` is reported as an integer: a count, which gradient accumulation sums over micro-batches
  (train/accumulate.py) where it averages the float metrics.
  """
  denom = jnp.maximum(sums["tokens"], 1.0)
  ce, z = sums["ce_sum"] / denom, sums["z_sum"] / denom
  return ce + z_loss * z, {"ce_loss": ce, "z_loss": z, "tokens": jnp.asarray(sums["tokens"]).astype(jnp.int32)}


def next_token_loss(logits_BLV: jax.Array, targets_BL: jax.Array, loss_mask_BL: jax.Array,
                    z_loss: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean CE + z_loss * mean(logsumexp^2) over masked-in tokens; padding contributes nothing.

  Targets never cross a packed segment boundary: the data pipeline pairs inputs and targets within
  each document, so the mask only has to drop padding.
  """
  return loss_from_sums(next_token_sums(logits_BLV, targets_BL, loss_mask_BL), z_loss)
