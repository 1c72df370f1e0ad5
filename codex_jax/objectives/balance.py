"""Loss-weight auto-tuner: dual ascent keeps each objective's share of the trunk gradient norm in bounds.

N is the number of objectives, named in `BalanceConfig.objectives`; every [N] array follows that order.

What is balanced. Objective i has an unweighted loss L_i and a trunk gradient g_i = d L_i / d theta, measured
(`trunk_grad_norms`) every `measure_every` steps and smoothed into n_i, an EMA of |g_i|. The caller picks theta;
the multimodal step (train/multimodal_step.py) takes GradNorm's: the last shared block's weights. Its share of the
weighted trunk gradient is

  s_i(w) = w_i n_i / sum_{j present} w_j n_j                 (0 for an objective absent from the batch).

The problem. The model trains on sum_i w_i L_i; the tuner picks the weights, as near the configured w0 as the
share bounds allow. In log-weights u = log w:

  minimise_u  1/2 |u - u0|^2   subject to   log low_i <= log s_i(u) <= log high_i.

Its Lagrangian, with multipliers lam_low, lam_high >= 0 for the lower and upper bounds:

  Lag(u, lam) = 1/2 |u - u0|^2 + sum_i lam_low_i (log low_i - log s_i) + sum_i lam_high_i (log s_i - log high_i).

Primal step (best response to lam). log s_i = u_i + log n_i - log Z with Z = sum_j w_j n_j; holding Z at its
measured value, dLag/du_i = 0 gives u_i = u0_i + lam_low_i - lam_high_i. Shares do not change when every
weight is scaled alike, so that free scale is spent keeping the present weights' sum where it was:

  w_i = c * w0_i * exp(lam_low_i - lam_high_i),   c such that sum_{present} w_i is unchanged.

Dual step (projected gradient ascent on the dual; dLag/dlam is the constraint violation):

  lam_low_i  <- clip(lam_low_i  + eta * (log low_i  - log s_i), 0, max_multiplier)
  lam_high_i <- clip(lam_high_i + eta * (log s_i - log high_i), 0, max_multiplier)

A multiplier grows while its bound is broken and decays back to 0 once it holds with room to spare, so the
tuner is idle when the configured weights already satisfy the bounds. The dual aims at bounds tightened by
`slack`: approached from outside, a share converges onto its target, and the slack keeps it strictly inside
the configured bound despite noise in the measured norms. A low of 0 or a high of 1 is no constraint at all:
its multiplier stays 0 (it is not tightened into a bound of `slack`). The clip keeps exp() finite when bounds cannot hold
(an objective with zero gradient, or present objectives whose highs sum below 1).

An absent objective (present False, or a non-finite norm) keeps its weight, multipliers and EMA, and is left
out of every share; `weighted_loss` drops its loss. mode "fixed" keeps w0 and still reports shares.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp

from codex_jax.config.errors import ConfigError
from codex_jax.config.schema import OBJECTIVES, BalanceSettings
from codex_jax.config.validate import share_problems, weight_problems

_TINY = 1e-12  # Floor for shares and norms inside log(); a zero share reads as a very broken low bound.


@dataclasses.dataclass(frozen=True)
class BalanceConfig(BalanceSettings):
  """One phase's loss weights w0 with the tuner's settings (config/schema.py BalanceSettings)."""

  objectives: tuple[str, ...] = OBJECTIVES
  weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0)  # w0, per objective (>= 0; 0 switches one off).

  def __post_init__(self):
    problems = self.problems()
    if problems:
      raise ConfigError(problems)

  def problems(self) -> list[str]:
    """config.objectives.balance's rules (config/validate.py), keyed "balance.", and this phase's own."""
    out = []
    if len(set(self.objectives)) != len(self.objectives) or not self.objectives:
      out.append(f"balance.objectives={self.objectives!r}: must be non-empty with distinct names")
    out += weight_problems(self.weights, self.objectives, "balance.weights")
    out += share_problems(self, self.objectives, "balance.")
    if out:
      return out
    for i, (name, weight, lo) in enumerate(zip(self.objectives, self.weights, self.low, strict=True)):
      if self.mode == "lagrangian" and weight == 0 and lo > 0:
        out.append(f"balance.low[{i}]={lo}: must be 0, as weight 0 switches {name} off")
    return out


@flax.struct.dataclass
class BalanceState:
  """The tuner's state, a pytree of [N] arrays: lives in the TrainState, so Orbax saves it with the model."""

  weights_N: jax.Array      # float32: w, the weights the loss uses now.
  lam_low_N: jax.Array      # float32 >= 0: multipliers of the lower share bounds.
  lam_high_N: jax.Array     # float32 >= 0: multipliers of the upper share bounds.
  norm_ema_N: jax.Array     # float32: n, EMA of each objective's unweighted trunk gradient norm.
  measured_N: jax.Array     # int32: measurements each objective was present for (0: EMA not started).
  objectives: tuple[str, ...] = flax.struct.field(pytree_node=False)  # Names, in the order of every [N].


def init_state(cfg: BalanceConfig) -> BalanceState:
  n = len(cfg.objectives)
  zeros = jnp.zeros((n,), jnp.float32)
  return BalanceState(weights_N=jnp.asarray(cfg.weights, jnp.float32), lam_low_N=zeros, lam_high_N=zeros,
                      norm_ema_N=zeros, measured_N=jnp.zeros((n,), jnp.int32), objectives=cfg.objectives)


def is_measure_step(step: jax.Array, cfg: BalanceConfig) -> jax.Array:
  """Whether this step measures trunk gradient norms and updates the tuner (a traced bool, for lax.cond)."""
  return step % cfg.measure_every == 0


def shares(weights_N: jax.Array, norms_N: jax.Array, present_N: jax.Array) -> jax.Array:
  """s_i = w_i n_i / sum over present j of w_j n_j; 0 for absent objectives (and all 0 if nothing pulls)."""
  pull_N = jnp.where(present_N, weights_N * norms_N, 0.0)
  total = jnp.sum(pull_N)
  return jnp.where(total > 0, pull_N / jnp.where(total > 0, total, 1.0), 0.0)


def weighted_loss(losses: Mapping[str, jax.Array], present_N: jax.Array, state: BalanceState) -> jax.Array:
  """sum over present i of w_i L_i. Absent losses are selected away (a NaN there never leaks into the value);
  their gradient is zeroed too provided the loss itself is finite (e.g. a masked mean with denominator >= 1)."""
  total = jnp.zeros((), jnp.float32)
  for i, name in enumerate(state.objectives):
    if name in losses:
      weight = jax.lax.stop_gradient(state.weights_N[i])
      total = total + jnp.where(present_N[i], weight * losses[name], 0.0)
  return total


def trunk_grad_norms(losses_fn: Callable[[Any], Mapping[str, jax.Array]], params: Any,
                     trunk_of: Callable[[Any], Any], objectives: tuple[str, ...]) -> jax.Array:
  """[N] |d L_i / d trunk|: one forward pass and one backward pass per objective, so run it only on
  `is_measure_step` steps (every k). `losses_fn(params)` returns the unweighted losses by name; `trunk_of` picks
  the shared subtree from a params-shaped tree (the heads' gradients, never read, are pruned under jit). A name
  missing from the losses gets norm 0: mark it absent.

  The backward passes are unrolled, not one jax.vmap over the cotangents: XLA:CPU in jaxlib 0.10.2 miscompiles
  the vmapped RMSNorm backward at [16, 256, D] rows (its YNN fusion reuses cotangent 0's row sums for the others;
  docs/objectives.md, "A miscompiled vmap"), which gave the tuner wrong norms on one device."""
  def stacked_N(p):
    losses = losses_fn(p)
    return jnp.stack([jnp.asarray(losses.get(name, 0.0), jnp.float32) for name in objectives])

  _, vjp_fn = jax.vjp(stacked_N, params)
  norms = []
  for row_N in jnp.eye(len(objectives), dtype=jnp.float32):
    (grads,) = vjp_fn(row_N)
    norms.append(jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(trunk_of(grads)))))
  return jnp.stack(norms)


def _weights_from_multipliers(state: BalanceState, lam_low_N, lam_high_N, present_N, cfg: BalanceConfig):
  """w_i = c w0_i exp(lam_low_i - lam_high_i) for present i, c keeping their sum; absent weights unchanged."""
  raw_N = jnp.asarray(cfg.weights, jnp.float32) * jnp.exp(lam_low_N - lam_high_N)
  old_sum = jnp.sum(jnp.where(present_N, state.weights_N, 0.0))
  raw_sum = jnp.sum(jnp.where(present_N, raw_N, 0.0))
  scaled_N = raw_N * old_sum / jnp.where(raw_sum > 0, raw_sum, 1.0)
  return jnp.where(present_N, scaled_N, state.weights_N)


def phase_weights(w0_N: jax.Array, state: BalanceState) -> jax.Array:
  """The weights a new phase opens with: its configured w0 under the multipliers so far, w0 * exp(lam_low -
  lam_high) scaled to w0's sum. The multipliers hold what the bounds needed against the measured norms, which
  a phase switch does not change: restarting them from 0 would re-open every bound the tuner had closed
  (measured: text's share fell from 0.25 to 0.04 for the 40 steps the dual took to recover)."""
  raw_N = w0_N * jnp.exp(state.lam_low_N - state.lam_high_N)
  return raw_N * jnp.sum(w0_N) / jnp.maximum(jnp.sum(raw_N), _TINY)


def update(state: BalanceState, grad_norms_N: jax.Array, present_N: jax.Array,
           cfg: BalanceConfig) -> tuple[BalanceState, dict[str, jax.Array]]:
  """One measurement: EMA the norms, take the shares at the current weights, then (lagrangian mode) one dual
  step and the primal weights it implies. Pure and jittable, with `cfg` static. The metrics report the shares
  the weights in use produced, and the weights and multipliers after the step."""
  present_N = present_N & jnp.isfinite(grad_norms_N)
  norms_N = jnp.where(present_N, grad_norms_N, 0.0).astype(jnp.float32)
  smoothed_N = cfg.ema_decay * state.norm_ema_N + (1 - cfg.ema_decay) * norms_N
  ema_N = jnp.where(present_N, jnp.where(state.measured_N > 0, smoothed_N, norms_N), state.norm_ema_N)
  share_N = shares(state.weights_N, ema_N, present_N)
  new = state.replace(norm_ema_N=ema_N, measured_N=state.measured_N + present_N.astype(jnp.int32))
  if cfg.mode == "lagrangian":
    log_share_N = jnp.log(jnp.maximum(share_N, _TINY))
    # A bound of 0 (low) or 1 (high) is no bound: it is not tightened by the slack into one (a low of 0 aimed
    # at `slack` would chase a share of 1% for an objective whose trunk gradient is 1e-5 of the others').
    low, high = jnp.asarray(cfg.low), jnp.asarray(cfg.high)
    low_N = jnp.where(low > 0, jnp.log(jnp.maximum(low + cfg.slack, _TINY)), -jnp.inf)
    high_N = jnp.where(high < 1, jnp.log(jnp.maximum(high - cfg.slack, _TINY)), jnp.inf)
    step = lambda lam_N, violation_N: jnp.where(
        present_N, jnp.clip(lam_N + cfg.dual_lr * violation_N, 0.0, cfg.max_multiplier), lam_N)
    lam_low_N = step(state.lam_low_N, low_N - log_share_N)
    lam_high_N = step(state.lam_high_N, log_share_N - high_N)
    new = new.replace(lam_low_N=lam_low_N, lam_high_N=lam_high_N,
                      weights_N=_weights_from_multipliers(state, lam_low_N, lam_high_N, present_N, cfg))
  return new, metrics(new, share_N, cfg)


def metrics(state: BalanceState, share_N: jax.Array, cfg: BalanceConfig) -> dict[str, jax.Array]:
  """Scalars per objective, for the metrics log."""
  out = {}
  for i, name in enumerate(cfg.objectives):
    out |= {f"balance_weight_{name}": state.weights_N[i], f"balance_share_{name}": share_N[i],
            f"balance_lam_low_{name}": state.lam_low_N[i], f"balance_lam_high_{name}": state.lam_high_N[i],
            f"balance_trunk_grad_norm_{name}": state.norm_ema_N[i]}
  return out
