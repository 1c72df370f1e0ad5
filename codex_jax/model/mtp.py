"""Multi-token prediction modules (DeepSeek-V3 section 2.2): training-only heads, dropped from exports.

Depth k (1..D) at position t combines the previous depth's hidden state h^{k-1}_t (h^0: the main
stack's last block output) with the embedding of token t+k, both RMS-normalised: concatenate,
project [2D -> D], one transformer block; its output, normalised, goes through the main model's
(shared) output projection to predict token t+k+1. Dimension letters as in layers.py; T the two
halves of the concatenation.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from codex_jax.config.schema import ModelConfig
from codex_jax.model.layers import RMSNorm

MTP = "mtp"  # The params subtree of every MTP module (absent when model.mtp_depth is 0).


def shift_left(x_BL: jax.Array, k: int, fill=0) -> jax.Array:
  """x_BL[:, t + k] at position t; `fill` past the end of the row."""
  if k == 0:
    return x_BL
  pad = jnp.full((x_BL.shape[0], k, *x_BL.shape[2:]), fill, x_BL.dtype)
  return jnp.concatenate([x_BL[:, k:], pad], axis=1)


class Depth(nn.Module):
  """One MTP module: [norm(h); norm(embedding)] -> projection -> block -> (h^k, normed h^k)."""

  cfg: ModelConfig
  block: type  # transformer.Block, or its rematerialised form (passed in: this module sits below it).

  @nn.compact
  def __call__(self, h_BLD, e_BLD, segment_ids_BL, positions_BL):
    cfg = self.cfg
    dt = cfg.compute_dtype
    w_TDE = self.param("proj", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                            (None, "embed", None)),
                       (2, cfg.d_model, cfg.d_model), jnp.dtype(cfg.param_dtype))
    both_BLTD = jnp.stack([RMSNorm(cfg, name="hidden_norm")(h_BLD), RMSNorm(cfg, name="embed_norm")(e_BLD)],
                          axis=2)
    x_BLD = jnp.einsum("BLTD,TDE->BLE", both_BLTD, w_TDE.astype(dt))
    x_BLD, _ = self.block(cfg, name="block")(x_BLD, segment_ids_BL, positions_BL)
    return x_BLD, RMSNorm(cfg, name="output_norm")(x_BLD)


class MultiTokenPrediction(nn.Module):
  """The D sequential depths; the embedding and the output projection come from the Decoder."""

  cfg: ModelConfig
  block: type

  def setup(self):
    self.depths = [Depth(self.cfg, self.block) for _ in range(self.cfg.mtp_depth)]

  def __call__(self, h_BLD, embed, tokens_BL, segment_ids_BL, positions_BL) -> list[jax.Array]:
    """The normed output [B, L, D] of each depth k = 1..D (depth k at t predicts token t + k + 1, through the
    Decoder's output projection).

    `embed(tokens_BL)` is the Decoder's shared embedding.
    Positions whose token t + k lies past the row see token 0; their targets are masked out
    (objectives/mtp.py), and attention stays within packed segments as in the main stack.
    """
    out = []
    for k, depth in enumerate(self.depths, start=1):
      h_BLD, normed_BLD = depth(h_BLD, embed(shift_left(tokens_BL, k)), segment_ids_BL, positions_BL)
      out.append(normed_BLD)
    return out


def inference_params(params: dict) -> dict:
  """The parameters generation and export need: everything but the training-only MTP modules."""
  return {k: v for k, v in params.items() if k != MTP}
