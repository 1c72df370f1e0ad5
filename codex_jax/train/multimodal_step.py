"""The multimodal train step: five objectives on one online forward, an EMA target, the loss-weight tuner.

One step: the forward of runtime/multimodal.py (every objective's loss from one online forward, the EMA
target's trunk output beside it); the total is the tuner's weighted sum (objectives/balance.py).
Every `measure_every` steps the tuner measures |dL_i/d theta_last|, each unweighted loss's gradient norm on
the last block's weights (GradNorm's yardstick for the shared trunk: `last_block_grad_norms`, one backward
per objective through the last block and the heads).
Text-only configs never come here (train/step.py's train_step).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from codex_jax.config.schema import OBJECTIVES, TrainConfig
from codex_jax.model import transformer
from codex_jax.model.transformer import Decoder
from codex_jax.objectives import balance
from codex_jax.parallel.pipeline import Pipeline
from codex_jax.runtime import multimodal
from codex_jax.runtime.forward import trunk_fn
from codex_jax.train import accumulate
from codex_jax.train import guard as guard_lib
from codex_jax.train import step as step_lib
from codex_jax.train.state import ObjectiveState


def ema_update(target: dict, params: dict, decay: float) -> dict:
  """target <- decay * target + (1 - decay) * params, over the target's keys (none: {})."""
  return jax.tree.map(lambda t, p: decay * t + (1.0 - decay) * p.astype(t.dtype), target,
                      {k: params[k] for k in target})


def last_block_grad_norms(params, online: dict, losses_of_h, *, model: Decoder,
                          pipeline: Pipeline | None = None) -> jax.Array:
  """[5] |d L_i / d theta_last|, each unweighted loss's gradient norm on the last block's parameters (GradNorm's
  yardstick for the shared trunk), on measure steps only: one more trunk forward, with the last block zeroed,
  gives that block's input (stop-gradient; pipelined like the trunk), then one VJP per objective through the
  last block and the heads. `losses_of_h(h_BLD)` gives the losses by name from the last block's output."""
  cfg = model.cfg
  x_BLD = jax.lax.stop_gradient(trunk_fn(transformer.with_last_block_zeroed(params, cfg.num_layers),
                                                  online, model=model, pipeline=pipeline))
  block = transformer.Block(cfg)
  through_last = lambda p: losses_of_h(  # noqa: E731
      block.apply({"params": p}, x_BLD, online["segment_ids"], online["positions"])[0])
  last = transformer.block_params(params, cfg.num_layers)[-1]  # The other slices are dead code under jit.
  return balance.trunk_grad_norms(through_last, last, lambda g: g, OBJECTIVES)


def _phase(step: jax.Array, spec: multimodal.Spec) -> tuple[jax.Array, jax.Array]:
  """(index of the phase at `step`, whether `step` starts a later phase)."""
  starts = jnp.asarray([start for start, _ in spec.phases])
  return jnp.sum(step >= starts) - 1, jnp.any((step == starts) & (starts > 0))


def _tune(state: ObjectiveState, norms_N, present_N, spec: multimodal.Spec):
  """(balance state, metrics): a dual step on the measured norms on measure steps, else the shares as they are."""
  phase, _ = _phase(state.step, spec)
  cfg0 = spec.phases[0][1]

  def measure(bstate):
    branches = [functools.partial(balance.update, cfg=c) for _, c in spec.phases]
    new, metrics = jax.lax.switch(phase, branches, bstate, norms_N, present_N)
    return new, metrics | {"balance_measured": jnp.ones((), jnp.int32)}

  def skip(bstate):
    share_N = balance.shares(bstate.weights_N, bstate.norm_ema_N, present_N)
    return bstate, balance.metrics(bstate, share_N, cfg0) | {"balance_measured": jnp.zeros((), jnp.int32)}

  return jax.lax.cond(balance.is_measure_step(state.step, cfg0), measure, skip, state.balance)


def train_step(state: ObjectiveState, batch: dict, *, model: Decoder, tx: optax.GradientTransformation,
               schedule: optax.Schedule, train: TrainConfig, spec: multimodal.Spec,
               pipeline: Pipeline | None = None) -> tuple[ObjectiveState, dict]:
  """One guarded AdamW update on the tuner's weighted sum of the objectives; then the EMA target and tuner.

  The batch's k = rows / train.micro_batch micro-batches (train/accumulate.py) each run their own layout,
  EMA-target and online forwards and, on measure steps, their own trunk-gradient-norm measurement; the
  gradients and norms are averaged (a norm over the micro-batches where its objective is present), the
  present flags OR-ed, and the update takes one tuner step, one optimizer step and one EMA-target step.
  """
  step_rng = jax.random.fold_in(state.rng, state.step)
  phase, starts_phase = _phase(state.step, spec)
  w0_PN = jnp.asarray([c.weights for _, c in spec.phases], jnp.float32)
  bstate = jax.tree.map(  # A new phase: its configured weights under the multipliers and norm EMA it inherits.
      lambda new, old: jnp.where(starts_phase, new, old),
      state.balance.replace(weights_N=balance.phase_weights(w0_PN[phase], state.balance)), state.balance)
  lam, k = step_lib.mtp_weight(train, state.step), accumulate.count(batch, train.micro_batch)
  measuring = balance.is_measure_step(state.step, spec.phases[0][1])

  def micro(mb: dict, index):
    rng = accumulate.micro_key(step_rng, index, k)
    slots, online, h_target = multimodal.prepare(state.params, state.target_params, mb, rng, model=model, spec=spec,
                                    pipeline=pipeline)

    def objective(params):
      h_BLD = trunk_fn(params, online, model=model, pipeline=pipeline, rng=rng)
      losses, present_N, metrics, _ = multimodal.losses_from_trunk(params, h_BLD, h_target, mb, online, slots, rng,
                                                        model=model, spec=spec, mtp_weight=lam)
      return balance.weighted_loss(losses, present_N, bstate), (metrics, present_N)

    (loss, (aux, present_N)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    losses_of_h = lambda h: multimodal.losses_from_trunk(  # noqa: E731
        state.params, h, h_target, mb, online, slots, rng, model=model, spec=spec, mtp_weight=lam)[0]
    measure = functools.partial(last_block_grad_norms, online=online, losses_of_h=losses_of_h, model=model,
                                pipeline=pipeline)
    norms_N = jax.lax.cond(measuring, measure, lambda p: jnp.zeros((len(OBJECTIVES),), jnp.float32), state.params)
    aux = {name: v for name, v in aux.items() if not name.startswith("present_")}  # From the OR-ed flags below.
    return loss, aux, grads, jnp.where(present_N, norms_N, 0.0), present_N.astype(jnp.int32)

  loss, aux, grads, norms_N, present_count_N = accumulate.accumulate(micro, batch, k)
  present_N = present_count_N > 0
  if k > 1:  # The mean over the micro-batches where each objective is present.
    norms_N = norms_N * k / jnp.maximum(present_count_N, 1)
  aux |= {f"present_{name}": present_N[i].astype(jnp.int32) for i, name in enumerate(OBJECTIVES)}
  new_balance, balance_metrics = _tune(state.replace(balance=bstate), norms_N, present_N, spec)
  # A new phase's weights rescale the total loss (e.g. 0.6 -> 10 when tuned weights reset to w0): the guard's
  # window of past totals would read it as a spike and skip every step, so the window restarts with the phase.
  restarted = state.guard.replace(losses_W=jnp.zeros_like(state.guard.losses_W), count=jnp.zeros_like(state.guard.count),
                                  next=jnp.zeros_like(state.guard.next))
  state = state.replace(guard=jax.tree.map(lambda new, old: jnp.where(starts_phase, new, old), restarted, state.guard))
  new_state, metrics, bad = step_lib.apply_update(state, loss, aux, grads, tx=tx, schedule=schedule, train=train)
  target = ema_update(state.target_params, new_state.params, spec.objectives.world.ema_decay)
  target, new_balance = guard_lib.keep_if_bad(bad, (state.target_params, bstate), (target, new_balance))
  return new_state.replace(target_params=target, balance=new_balance), metrics | balance_metrics

