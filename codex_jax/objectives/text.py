"""L_text: next-token cross-entropy with z-loss, averaged over the tokens the loss mask keeps.

Training computes it from the hidden states and the output projection, a chunk of positions at a time
(`projected_sums`): the [B, L, V] logits, and a one-hot of that size, never exist; evals that need the logits
themselves use `next_token_sums`.
"""

from __future__ import annotations

import functools
import math

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


def projected_sums(h_BLD: jax.Array, w_DV: jax.Array, targets_BL: jax.Array, loss_mask_BL: jax.Array, *,
                   z_loss: float, chunk: int) -> dict[str, jax.Array]:
  """next_token_sums of the logits h_BLD @ w_DV, and `top` [B, L] (each position's argmax), computed `chunk`
  positions at a time: only [B, chunk, V] logits exist at once, forward or backward.

  The gradient is made in the same pass (the logits are not kept for a backward pass, nor computed again) and
  is that of ce_sum + z_loss * z_sum: it rides on `ce_sum`, while `z_sum` carries none. A loss of the form
  (ce_sum + z_loss * z_sum) / tokens, as loss_from_sums makes with the same z_loss, gets exact gradients.
  """
  B, L, _ = h_BLD.shape
  chunk = math.gcd(L, max(1, min(chunk, L)))
  mask_BL = loss_mask_BL.astype(jnp.float32)
  loss_sum, ce_sum, z_sum, top_BL = _projected(h_BLD, w_DV, targets_BL, jax.lax.stop_gradient(mask_BL),
                                               float(z_loss), chunk)
  return {"ce_sum": loss_sum - jax.lax.stop_gradient(loss_sum - ce_sum), "z_sum": jax.lax.stop_gradient(z_sum),
          "tokens": jnp.sum(mask_BL), "top": top_BL}


def _chunks(x_BL, chunk: int):
  """[B, L, ...] -> [L / chunk, B, chunk, ...]: what lax.scan walks over."""
  B, L = x_BL.shape[:2]
  return jnp.swapaxes(x_BL.reshape(B, L // chunk, chunk, *x_BL.shape[2:]), 0, 1)


def _unchunk(x_NBC):
  N, B, C = x_NBC.shape[:3]
  return jnp.swapaxes(x_NBC, 0, 1).reshape(B, N * C, *x_NBC.shape[3:])


def _chunk_pass(h_BLD, w_DV, targets_BL, mask_BL, z_loss: float, chunk: int, with_grads: bool):
  """One scan over the chunks: the sums, the argmax, and (with_grads) d(ce + z_loss * z)/d(h, w)."""
  V = w_DV.shape[-1]

  def body(carry, xs):
    h_BcD, t_Bc, m_Bc = xs
    logits_BcV = jnp.einsum("BcD,DV->BcV", h_BcD, w_DV).astype(jnp.float32)
    lse_Bc = jax.nn.logsumexp(logits_BcV, axis=-1)
    is_target_BcV = jnp.arange(V) == t_Bc[..., None]  # Compared inside the fusion: no one-hot in memory.
    target_Bc = jnp.sum(jnp.where(is_target_BcV, logits_BcV, 0.0), axis=-1)
    ce, z = jnp.sum((lse_Bc - target_Bc) * m_Bc), jnp.sum(jnp.square(lse_Bc) * m_Bc)
    carry = {**carry, "ce": carry["ce"] + ce, "z": carry["z"] + z}
    out = {"top": jnp.argmax(logits_BcV, axis=-1).astype(jnp.int32)}
    if with_grads:
      p_BcV = jnp.exp(logits_BcV - lse_Bc[..., None])
      dlogits_BcV = (m_Bc * (1.0 + 2.0 * z_loss * lse_Bc))[..., None] * p_BcV - jnp.where(
          is_target_BcV, m_Bc[..., None], 0.0)
      dlogits_BcV = dlogits_BcV.astype(h_BcD.dtype)
      out["dh"] = jnp.einsum("BcV,DV->BcD", dlogits_BcV, w_DV)
      carry["dw"] = carry["dw"] + jnp.einsum("BcD,BcV->DV", h_BcD, dlogits_BcV, preferred_element_type=jnp.float32)
    return carry, out

  carry = {"ce": jnp.zeros((), jnp.float32), "z": jnp.zeros((), jnp.float32)}
  if with_grads:
    carry["dw"] = jnp.zeros(w_DV.shape, jnp.float32)
  carry, out = jax.lax.scan(body, carry, (_chunks(h_BLD, chunk), _chunks(targets_BL, chunk), _chunks(mask_BL, chunk)))
  return carry, {k: _unchunk(v) for k, v in out.items()}


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _projected(h_BLD, w_DV, targets_BL, mask_BL, z_loss: float, chunk: int):
  carry, out = _chunk_pass(h_BLD, w_DV, targets_BL, mask_BL, z_loss, chunk, with_grads=False)
  return carry["ce"] + z_loss * carry["z"], carry["ce"], carry["z"], out["top"]


def _projected_fwd(h_BLD, w_DV, targets_BL, mask_BL, z_loss: float, chunk: int):
  carry, out = _chunk_pass(h_BLD, w_DV, targets_BL, mask_BL, z_loss, chunk, with_grads=True)
  primal = (carry["ce"] + z_loss * carry["z"], carry["ce"], carry["z"], out["top"])
  return primal, (out["dh"], carry["dw"].astype(w_DV.dtype))


def _projected_bwd(z_loss: float, chunk: int, residuals, cotangents):
  dh_BLD, dw_DV = residuals
  g = cotangents[0]  # Only the loss sum carries a gradient (projected_sums stops the others).
  return (g.astype(dh_BLD.dtype) * dh_BLD, g.astype(dw_DV.dtype) * dw_DV, None, None)


_projected.defvjp(_projected_fwd, _projected_bwd)
