"""How many micro-batches the update at a step accumulates: a linear ramp, capped at the critical batch.

GPT-3 and Megatron warm the batch up: early in training the gradient noise scale B_simple (train/
noise_scale.py) is small, so a large batch spends tokens that a small one would have used as well
(McCandlish et al. 2018: steps and tokens trade off around B_simple). Shapes stay static: an update is
k micro-batches of train.micro_batch rows, accumulated inside the step (train/accumulate.py), and the loop
compiles one step per distinct k. k grows linearly from train.batch_ramp_start at update 0 to
train.grad_accum at update train.batch_ramp_steps; with train.batch_ramp_noise_cap it is also at most
max(1, B_simple // micro-batch rows), from the probe's moving averages as they stand before the update.
"""

from __future__ import annotations

import math

from codex_jax.config.schema import TrainConfig


def linear(train: TrainConfig, step: int) -> int:
  """k of the linear ramp at update `step` (0-based): batch_ramp_start .. grad_accum, then grad_accum."""
  start, end, steps = train.batch_ramp_start, train.grad_accum, train.batch_ramp_steps
  if steps == 0 or step >= steps:
    return end
  return start + (end - start) * step // steps


def noise_cap(b_simple: float | None, micro_rows: int) -> int | None:
  """The most micro-batches whose rows stay within B_simple sequences (at least 1); None without an
  estimate (before the first measurement, or B_simple unbounded or undefined)."""
  if b_simple is None or not math.isfinite(b_simple):
    return None
  return max(1, math.floor(b_simple / micro_rows))


def micro_batches(train: TrainConfig, step: int, b_simple: float | None = None) -> int:
  """k for update `step`: the linear ramp, capped by B_simple when train.batch_ramp_noise_cap is on."""
  k = linear(train, step)
  cap = noise_cap(b_simple, train.micro_batch) if train.batch_ramp_noise_cap else None
  return k if cap is None else min(k, cap)
