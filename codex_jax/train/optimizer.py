"""AdamW with global-norm clipping, linear warmup then cosine or warmup-stable-decay, and a weight-decay mask."""

from __future__ import annotations

import jax
import optax

from codex_jax.config.schema import OptimizerConfig


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """0 -> peak linearly over the first `warmup_fraction` of steps, then to peak*min_lr_ratio at the end.

  `decay="cosine"`: a cosine over every step after warmup. `decay="wsd"` (warmup-stable-decay): the peak
  holds, then falls linearly over the last `decay_fraction` of steps; with decay_fraction 0 it never falls,
  the recipe where an average of recent snapshots (checkpoint.average_count) stands in for the anneal.
  """
  warmup_steps = max(1, round(cfg.warmup_fraction * total_steps))
  if cfg.decay == "wsd":
    decay_steps = round(cfg.decay_fraction * total_steps)
    stable_steps = max(0, total_steps - warmup_steps - decay_steps)
    parts = [optax.linear_schedule(0.0, cfg.learning_rate, warmup_steps),
             optax.constant_schedule(cfg.learning_rate)]
    if decay_steps:
      parts.append(optax.linear_schedule(cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio, decay_steps))
    return optax.join_schedules(parts, [warmup_steps, warmup_steps + stable_steps][:len(parts) - 1])
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
