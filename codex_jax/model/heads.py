"""Training-only heads of the non-text objectives (vision, align, world, action), on the trunk's output.

Dimension letters as in layers.py, plus C slots (images, pairs, chunks), E the shared align width,
X the values of one image patch, F the feature width, A action values, T horizon (actions per chunk).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from codex_jax.config.schema import ModelConfig

HEADS = "objectives"  # The params subtree of every head (absent when only text is trained).
TAU_DIM = 32  # Width of the sinusoidal flow-time embedding.


class Linear(nn.Module):
  """x W + b, with logical axis names for the rules table (parallel/rules.py)."""

  features: int
  axes: tuple[str | None, str | None]
  cfg: ModelConfig
  zero_init: bool = False

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    init = nn.initializers.zeros if self.zero_init else nn.initializers.normal(cfg.init_std)
    w = self.param("w", nn.with_logical_partitioning(init, self.axes), (x.shape[-1], self.features),
                   jnp.dtype(cfg.param_dtype))
    b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
                   (self.features,), jnp.dtype(cfg.param_dtype))
    return x.astype(jnp.float32) @ w.astype(jnp.float32) + b.astype(jnp.float32)


class MLP(nn.Module):
  """Two linear layers with a SiLU between: the heads' predictors."""

  hidden: int
  out: int
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    h = jax.nn.silu(Linear(self.hidden, (None, "head_hidden"), self.cfg, name="in")(x))
    return Linear(self.out, ("head_hidden", None), self.cfg, name="out")(h)


def tau_embedding(tau_C: jax.Array, dim: int = TAU_DIM) -> jax.Array:
  """Sinusoidal embedding [C, dim] of flow times in [0, 1] (frequencies 1 .. 1000, as diffusion models)."""
  half = dim // 2
  freq_k = jnp.exp(-math.log(1000.0) * jnp.arange(half, dtype=jnp.float32) / half) * 1000.0
  angle_Ck = tau_C.astype(jnp.float32)[:, None] * freq_k
  return jnp.concatenate([jnp.sin(angle_Ck), jnp.cos(angle_Ck)], axis=-1)


class ObjectiveHeads(nn.Module):
  """One submodule per non-text objective in cfg.objectives; inputs are trunk outputs (float32 out)."""

  cfg: ModelConfig

  def setup(self):
    cfg, D = self.cfg, self.cfg.d_model
    on = set(cfg.objectives)
    if "vision" in on:
      # MAE: what a masked patch position sees instead of its projected values (objectives/slots.py).
      self.mask_embedding = self.param("mask_embedding", nn.with_logical_partitioning(
          nn.initializers.normal(cfg.init_std), ("embed",)), (D,), jnp.dtype(cfg.param_dtype))
      self.pixel_head = Linear(cfg.pixel_dim, ("embed", None), cfg)  # D -> X, per masked patch.
      self.vision_proj = MLP(D, D, cfg)  # Online pooled latent -> the target encoder's space.
    if "align" in on:
      self.align_media = Linear(cfg.align_dim, ("embed", "align"), cfg)
      self.align_text = Linear(cfg.align_dim, ("embed", "align"), cfg)
      # (log logit scale, logit bias): CLIP's scale starts at 1/0.07 (Radford et al. 2021), SigLIP's bias at
      # -10 (Zhai et al. 2023). Named *_bias so that weight decay spares both (optimizer.no_decay).
      init = lambda key, shape, dtype: jnp.asarray([math.log(1 / 0.07), -10.0], dtype)  # noqa: E731
      self.align_logit_bias = self.param("align_logit_bias", nn.with_logical_partitioning(init, (None,)), (2,),
                                         jnp.float32)
    if "world" in on:
      self.action_in = Linear(D, ("features", "embed"), cfg)  # An action position's values -> a_t.
      self.null_action = self.param("null_action_embedding", nn.with_logical_partitioning(
          nn.initializers.normal(cfg.init_std), ("embed",)), (D,), jnp.dtype(cfg.param_dtype))
      self.world_predictor = MLP(2 * D, D, cfg)
    if "action" in on:
      self.flow_head = MLP(2 * D, cfg.action_horizon * cfg.action_dim, cfg)

  def pixels(self, h_CPD):
    """Predicted pixels [C, P, X] of image patches from their trunk outputs."""
    return self.pixel_head(h_CPD)

  def vision_latent(self, pooled_CD):
    return self.vision_proj(pooled_CD)

  def align_latents(self, media_CD, text_CD):
    """(media [C, E], text [C, E], log scale, bias): projected, not yet normalised."""
    return self.align_media(media_CD), self.align_text(text_CD), self.align_logit_bias[0], self.align_logit_bias[1]

  def world_predict(self, z_CD, action_CF, has_action_C, last_CD):
    """Predicted next-chunk latent [C, D]: this chunk's target latent `last_CD` plus a change predicted from
    this chunk's online latent and the action (or the null action)."""
    a_CD = jnp.where(has_action_C[:, None], self.action_in(action_CF), self.null_action.astype(jnp.float32))
    return last_CD + self.world_predictor(jnp.concatenate([z_CD.astype(jnp.float32), a_CD], axis=-1))

  def action_velocity(self, cond_CD, x_CTA, tau_C):
    """Flow velocity [C, T, A] at noisy actions x_tau given the observation latent and tau."""
    C, T, A = x_CTA.shape
    inputs = jnp.concatenate([cond_CD.astype(jnp.float32), x_CTA.reshape(C, T * A), tau_embedding(tau_C)], -1)
    return self.flow_head(inputs).reshape(C, T, A)

  def init_all(self, h_BLD):
    """Touches every head once (Decoder.init_outputs): creates their parameters."""
    cfg, x_CD = self.cfg, h_BLD[0, :2].astype(jnp.float32)
    out = []
    if "vision" in cfg.objectives:
      out += [self.pixels(x_CD[:, None]), self.vision_latent(x_CD), self.mask_embedding]
    if "align" in cfg.objectives:
      out += list(self.align_latents(x_CD, x_CD))
    if "world" in cfg.objectives:
      out.append(self.world_predict(x_CD, jnp.zeros((2, cfg.feature_dim)), jnp.ones((2,), bool), x_CD))
    if "action" in cfg.objectives:
      x_CTA = jnp.zeros((2, cfg.action_horizon, cfg.action_dim))
      out.append(self.action_velocity(x_CD, x_CTA, jnp.zeros((2,))))
    return out
