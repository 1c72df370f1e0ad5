"""AdamW with global-norm clipping, linear warmup then cosine decay, and a weight-decay mask."""

from __future__ import annotations

import jax
import optax

from codex_jax.config.schema import OptimizerConfig


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """0 -> peak linearly over the first `warmup_fraction` of steps, then cosine to peak*min_lr_ratio."""
  warmup_steps = max(1, round(cfg.warmup_fraction * total_steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=cfg.learning_rate * cfg.min_lr_ratio)


def decay_mask(params, no_decay: tuple[str, ...]):
  """True for parameters that take weight decay: every path without a `no_decay` substring."""
  def takes_decay(path, _):
    name = "/".join(str(getattr(key, "key", key)) for key in path).lower()
    return not any(word in name for word in no_decay)
  return jax.tree_util.tree_map_with_path(takes_decay, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm),
      optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, mask=lambda p: decay_mask(p, cfg.no_decay)),
  )
