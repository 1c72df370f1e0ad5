"""The decoder-only transformer: embedding, a scanned (optionally rematerialised) stack, logits."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from codex_jax.config.schema import MODALITIES, MODALITY_IDS, ModelConfig
from codex_jax.model.heads import HEADS, ObjectiveHeads
from codex_jax.model.layers import Attention, RMSNorm, SwiGLU
from codex_jax.model.mtp import MTP, MultiTokenPrediction

ACT_BLD = ("act_batch", "act_seq", "act_embed")  # The residual stream between blocks.
# Modality ids of a packed row (data/records.py): 0 padding, 1 text, then the non-text modalities.
TEXT_MODALITY_ID, NUM_MODALITY_IDS = MODALITY_IDS["text"], len(MODALITIES) + 1  # Row 0: padding.

# The parameters of the EMA target encoder (the trunk as far as the last block; train/state.py).
TRUNK_PARAMS = ("embedding", "feature_in", "modality_embedding", "layers")


def trunk_params(params: dict) -> dict:
  """The trunk's parameters: embeddings and the block stack (scanned `layers`, or `layers_i` unrolled)."""
  return {k: v for k, v in params.items() if k in TRUNK_PARAMS or k.startswith("layers_")}


def inference_params(params: dict) -> dict:
  """The parameters generation and export need: no MTP modules or objective heads (training only)."""
  return {k: v for k, v in params.items() if k not in (MTP, HEADS)}


def block_params(params: dict, num_layers: int) -> list[dict]:
  """Each block's parameters, from the scanned stack (`layers`, a leading layer axis) or the unrolled `layers_i`."""
  if "layers" in params:
    return [jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(num_layers)]
  return [params[f"layers_{i}"] for i in range(num_layers)]


def stack_blocks(blocks: list[dict], stack=jnp.stack) -> dict:
  """Per-block parameters as the scanned stack's `layers` (a leading layer axis); np.stack keeps them on the host."""
  return jax.tree.map(lambda *xs: stack(xs), *blocks)


def with_last_block_zeroed(params: dict, num_layers: int) -> dict:
  """`params` with the last block's weights all 0. A pre-norm residual block without biases then adds exactly 0
  (its attention and MLP output projections are 0), so the trunk's output is that block's input, computed the
  way the trunk is (scanned, unrolled or pipelined)."""
  if "layers" in params:
    return {**params, "layers": jax.tree.map(lambda x: x.at[-1].set(0), params["layers"])}
  key = f"layers_{num_layers - 1}"
  return {**params, key: jax.tree.map(jnp.zeros_like, params[key])}


# What the backward pass may keep instead of recomputing, per `model.remat`.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
  """Pre-norm residual block: x + attention(norm(x)), then x + mlp(norm(x))."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BLD, segment_ids_BL, positions_BL, cache=None):
    x_BLD = nn.with_logical_constraint(x_BLD, ACT_BLD)
    h_BLD = Attention(self.cfg, name="attention")(RMSNorm(self.cfg, name="attention_norm")(x_BLD),
                                                   segment_ids_BL, positions_BL, cache=cache)
    if cache is not None:  # Decoding (model/decode.py): the attention also returns the updated KV cache.
      h_BLD, cache = h_BLD
    x_BLD = nn.with_logical_constraint(x_BLD + h_BLD, ACT_BLD)
    h_BLD = SwiGLU(self.cfg, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x_BLD))
    x_BLD = nn.with_logical_constraint(x_BLD + h_BLD, ACT_BLD)
    return x_BLD, cache  # (carry, per-layer output) as nn.scan expects; the cache is None unless decoding.


def _block_class(cfg: ModelConfig, scanned: bool | None = None):
  if cfg.remat == "none":
    return Block
  # prevent_cse is only needed outside scan, where XLA could otherwise merge the recomputation away.
  scanned = cfg.scan_layers if scanned is None else scanned
  return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not scanned)


class Decoder(nn.Module):
  """Token ids (and non-text features) in, next-token logits out (float32). `segment_ids` 0 marks padding."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("vocab", "embed")),
        (cfg.vocab_size, cfg.d_model), jnp.dtype(cfg.param_dtype))
    block = _block_class(cfg)
    if cfg.scan_layers:
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      self.layers = stack(cfg, name="layers")
    else:
      self.blocks = [block(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
    if cfg.feature_dim:
      # Non-text positions: a linear patch embedding of their values plus a learned modality vector.
      self.feature_in = self.param(
          "feature_in", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("features", "embed")),
          (cfg.feature_dim, cfg.d_model), jnp.dtype(cfg.param_dtype))
      self.modality_embedding = self.param(
          "modality_embedding", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                             ("modalities", "embed")),
          (NUM_MODALITY_IDS, cfg.d_model), jnp.dtype(cfg.param_dtype))
    self.final_norm = RMSNorm(cfg, name="final_norm")
    if cfg.objectives:  # A submodule: its params (the MAE mask embedding among them) exist only for training.
      self.heads = ObjectiveHeads(cfg, name=HEADS)
    if cfg.mtp_depth:
      self.mtp = MultiTokenPrediction(cfg, _block_class(cfg, scanned=False), name=MTP)
    if not cfg.tie_embeddings:
      self.unembed = self.param(
          "unembed", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("embed", "vocab")),
          (cfg.d_model, cfg.vocab_size), jnp.dtype(cfg.param_dtype))

  def embed(self, tokens_BL, features_BLF=None, modality_ids_BL=None, masked_BL=None):
    """Token embeddings at text positions; projected features + modality vectors elsewhere; the mask
    embedding where `masked_BL` (MAE) is set."""
    dt = self.cfg.compute_dtype
    x_BLD = jnp.take(self.embedding, tokens_BL, axis=0).astype(dt)
    if self.cfg.feature_dim and features_BLF is not None:
      media_BLD = (jnp.einsum("BLF,FD->BLD", features_BLF.astype(dt), self.feature_in.astype(dt))
                   + jnp.take(self.modality_embedding, modality_ids_BL, axis=0).astype(dt))
      is_media_BL = modality_ids_BL > TEXT_MODALITY_ID
      x_BLD = jnp.where(is_media_BL[..., None], media_BLD, x_BLD)
    if masked_BL is not None:
      x_BLD = jnp.where(masked_BL[..., None], self.heads.mask_embedding.astype(dt), x_BLD)
    return nn.with_logical_constraint(x_BLD, ACT_BLD)

  def trunk(self, tokens_BL, segment_ids_BL, positions_BL, features_BLF=None, modality_ids_BL=None,
            masked_BL=None):
    """The last block's output [B, L, D] (before the final norm)."""
    x_BLD = self.embed(tokens_BL, features_BLF, modality_ids_BL, masked_BL)
    if self.cfg.scan_layers:
      x_BLD, _ = self.layers(x_BLD, segment_ids_BL, positions_BL)
    else:
      for block in self.blocks:
        x_BLD, _ = block(x_BLD, segment_ids_BL, positions_BL)
    return x_BLD

  def hidden(self, tokens_BL, segment_ids_BL, positions_BL, features_BLF=None, modality_ids_BL=None):
    """The final-norm hidden states [B, L, D] (before the output projection)."""
    return self.final_norm(self.trunk(tokens_BL, segment_ids_BL, positions_BL, features_BLF, modality_ids_BL))

  def output_weights(self):
    """The output projection [D, V] in the compute dtype (the embedding, transposed, when tied)."""
    dt = self.cfg.compute_dtype
    return (self.embedding.T if self.cfg.tie_embeddings else self.unembed).astype(dt)

  def logits(self, x_BLD):
    logits_BLV = jnp.einsum("BLD,DV->BLV", x_BLD, self.output_weights())
    logits_BLV = nn.with_logical_constraint(logits_BLV, ("act_batch", "act_length", "act_vocab"))
    return logits_BLV.astype(jnp.float32)

  def head(self, x_BLD):
    """Logits from the last block's output: final norm, then the output projection."""
    return self.logits(self.final_norm(x_BLD))

  def mtp_hidden(self, x_BLD, tokens_BL, segment_ids_BL, positions_BL) -> list[jax.Array]:
    """The normed output [B, L, D] of each MTP depth from the last block's output `x_BLD` (model/mtp.py); [] when
    off."""
    if not self.cfg.mtp_depth:
      return []
    return self.mtp(x_BLD, self.embed, tokens_BL, segment_ids_BL, positions_BL)

  def mtp_logits(self, x_BLD, tokens_BL, segment_ids_BL, positions_BL) -> list[jax.Array]:
    """Logits of each MTP depth from the last block's output `x_BLD`; [] when off."""
    return [self.logits(h_BLD) for h_BLD in self.mtp_hidden(x_BLD, tokens_BL, segment_ids_BL, positions_BL)]

  def train_hidden(self, x_BLD, tokens_BL, segment_ids_BL, positions_BL):
    """What the training loss projects (objectives/mtp.py:head_sums): the final-norm hidden states, each MTP
    depth's, and the output projection; the logits themselves are made a chunk at a time there."""
    return (self.final_norm(x_BLD), self.mtp_hidden(x_BLD, tokens_BL, segment_ids_BL, positions_BL),
            self.output_weights())

  def train_outputs(self, tokens_BL, segment_ids_BL, positions_BL, features_BLF=None, modality_ids_BL=None):
    """(next-token logits, [logits of each MTP depth]): what training needs, and what init creates."""
    x_BLD = self.trunk(tokens_BL, segment_ids_BL, positions_BL, features_BLF, modality_ids_BL)
    return self.head(x_BLD), self.mtp_logits(x_BLD, tokens_BL, segment_ids_BL, positions_BL)

  def init_outputs(self, tokens_BL, segment_ids_BL, positions_BL):
    """train_outputs and every objective head: what init runs, so that all training params exist."""
    x_BLD = self.trunk(tokens_BL, segment_ids_BL, positions_BL)
    out = (self.head(x_BLD), self.mtp_logits(x_BLD, tokens_BL, segment_ids_BL, positions_BL))
    return out + (self.heads.init_all(x_BLD),) if self.cfg.objectives else out

  def __call__(self, tokens_BL, segment_ids_BL, positions_BL, features_BLF=None, modality_ids_BL=None):
    """Next-token logits: inference needs only these (and `inference_params`)."""
    return self.logits(self.hidden(tokens_BL, segment_ids_BL, positions_BL, features_BLF, modality_ids_BL))
