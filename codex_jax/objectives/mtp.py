"""L_MTP (DeepSeek-V3): (lambda / D) * sum_k CE_k of the multi-token-prediction depths, masked per segment.

Depth k at position t predicts token t + k + 1 = targets[t + k]. That target is trained only when
every step between is: loss_mask[t + j] = 1 for j = 0..k (each says "the next token is a real text
token of the same record"), and segment_ids agree at t and t + k, so no prediction crosses a packed
segment boundary, padding or a non-text position. Sums add across microbatches, as in text.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from codex_jax.model.mtp import shift_left
from codex_jax.model.transformer import Decoder
from codex_jax.objectives import text


def depth_mask(loss_mask_BL: jax.Array, segment_ids_BL: jax.Array, k: int) -> jax.Array:
  """[B, L] float: 1 where depth k's target (token t + k + 1) is valid (see module doc)."""
  mask_BL = loss_mask_BL.astype(jnp.float32)
  for j in range(1, k + 1):
    mask_BL = mask_BL * shift_left(loss_mask_BL.astype(jnp.float32), j)
  same_BL = (segment_ids_BL == shift_left(segment_ids_BL, k)) & (segment_ids_BL > 0)
  return mask_BL * same_BL.astype(jnp.float32)


def mtp_sums(mtp_logits: list[jax.Array], logits_BLV: jax.Array, batch: dict) -> dict[str, jax.Array]:
  """Per depth k: `mtp_ce_sum_k`, `mtp_tokens_k`, and `mtp_accept_k`, the valid positions where depth k's
  top-1 equals the main model's top-1 at t + k (its own guess of token t + k + 1): what greedy
  self-speculative decoding would accept."""
  sums = {}
  main_top_BL = jnp.argmax(jax.lax.stop_gradient(logits_BLV), axis=-1)
  for k, logits_k_BLV in enumerate(mtp_logits, start=1):
    mask_BL = depth_mask(batch["loss_mask"], batch["segment_ids"], k)
    s = text.next_token_sums(logits_k_BLV, shift_left(batch["targets"], k), mask_BL)
    agree_BL = jnp.argmax(jax.lax.stop_gradient(logits_k_BLV), axis=-1) == shift_left(main_top_BL, k)
    sums |= {f"mtp_ce_sum_{k}": s["ce_sum"], f"mtp_tokens_{k}": s["tokens"],
             f"mtp_accept_{k}": jnp.sum(agree_BL.astype(jnp.float32) * mask_BL)}
  return sums


def head_sums(model: Decoder, params, x_BLD: jax.Array, batch: dict, z_loss: float) -> dict[str, jax.Array]:
  """The loss sums of one batch from the last block's output `x_BLD`: next-token (text.py) and each MTP depth's,
  as mtp_sums makes them, with the logits made model.loss_chunk positions at a time (text.projected_sums; its
  gradient is that of ce_sum + z_loss * z_sum, so `z_loss` must be the loss's)."""
  h_BLD, mtp_h, w_DV = model.apply({"params": params}, x_BLD, batch["inputs"], batch["segment_ids"],
                                   batch["positions"], method=Decoder.train_hidden)
  chunk = model.cfg.loss_chunk
  main = text.projected_sums(h_BLD, w_DV, batch["targets"], batch["loss_mask"], z_loss=z_loss, chunk=chunk)
  sums = {k: v for k, v in main.items() if k != "top"}
  for k, h_k_BLD in enumerate(mtp_h, start=1):
    mask_BL = depth_mask(batch["loss_mask"], batch["segment_ids"], k)
    s = text.projected_sums(h_k_BLD, w_DV, shift_left(batch["targets"], k), mask_BL, z_loss=0.0, chunk=chunk)
    agree_BL = s["top"] == shift_left(main["top"], k)
    sums |= {f"mtp_ce_sum_{k}": s["ce_sum"], f"mtp_tokens_{k}": s["tokens"],
             f"mtp_accept_{k}": jnp.sum(agree_BL.astype(jnp.float32) * mask_BL)}
  return sums


def mtp_tokens(batch: dict, depth: int) -> dict[str, jax.Array]:
  """`mtp_tokens_k` of a whole batch: the denominators a per-microbatch loss needs up front."""
  return {f"mtp_tokens_{k}": jnp.sum(depth_mask(batch["loss_mask"], batch["segment_ids"], k))
          for k in range(1, depth + 1)}


def loss_from_sums(sums: dict[str, jax.Array], z_loss: float, depth: int,
                   weight: jax.Array | float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The next-token loss (text.py) + (weight / depth) * sum_k mean CE_k, and the metrics.

  `mtp_loss` is the mean of the depths' CE, `mtp_acceptance` depth 1's acceptance rate; with depth > 1
  each depth's also appears as `mtp_loss_k` / `mtp_acceptance_k`.
  """
  loss, aux = text.loss_from_sums(sums, z_loss)
  if not depth:
    return loss, aux
  ce, accept = [], []
  for k in range(1, depth + 1):
    denom = jnp.maximum(sums[f"mtp_tokens_{k}"], 1.0)
    ce.append(sums[f"mtp_ce_sum_{k}"] / denom)
    accept.append(sums[f"mtp_accept_{k}"] / denom)
  aux = {**aux, "mtp_loss": sum(ce) / depth, "mtp_acceptance": accept[0], "mtp_weight": jnp.asarray(weight)}
  if depth > 1:
    aux |= {f"mtp_loss_{k}": c for k, c in enumerate(ce, start=1)}
    aux |= {f"mtp_acceptance_{k}": a for k, a in enumerate(accept, start=1)}
  return loss + weight / depth * sum(ce), aux


def weight_at(step: jax.Array, initial: float, final: float, switch_step: int) -> jax.Array:
  """lambda at `step`: `initial` before `switch_step`, `final` from it on (DeepSeek-V3's 0.3 -> 0.1)."""
  return jnp.where(step < switch_step, initial, final).astype(jnp.float32)


def heldout_metrics(sums: dict[str, float]) -> dict[str, float]:
  """`mtp_loss_k` and `mtp_acceptance_k` of each depth from accumulated (host) sums; {} without MTP."""
  out = {}
  k = 1
  while f"mtp_tokens_{k}" in sums:
    tokens = sums[f"mtp_tokens_{k}"]
    out[f"mtp_loss_{k}"] = sums[f"mtp_ce_sum_{k}"] / tokens if tokens else float("nan")
    out[f"mtp_acceptance_{k}"] = sums[f"mtp_accept_{k}"] / tokens if tokens else float("nan")
    k += 1
  return out
