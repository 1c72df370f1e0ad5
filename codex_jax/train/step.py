"""The pure text training step: `train_step(state, batch) -> (state, metrics)`, and the guarded update every
step (text and multimodal) ends with. train/setup.py jits it on the run's engine."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from codex_jax.config.schema import TrainConfig
from codex_jax.model.transformer import Decoder
from codex_jax.objectives import mtp as mtp_objective
from codex_jax.parallel.pipeline import Pipeline
from codex_jax.runtime.forward import batch_sums
from codex_jax.train import accumulate
from codex_jax.train import guard as guard_lib
from codex_jax.train.state import TrainState


def loss_fn(params, batch: dict, *, model: Decoder, z_loss: float, rng: jax.Array | None = None,
            pipeline: Pipeline | None = None, mtp_weight: jax.Array | float = 0.0):
  """(loss, aux metrics) of `params` on one batch: the objective every step differentiates.

  With MTP the loss adds (mtp_weight / mtp_depth) * sum_k CE_k; the next-token part is unchanged.
  """
  sums = batch_sums(params, batch, model=model, rng=rng, pipeline=pipeline, z_loss=z_loss)
  return mtp_objective.loss_from_sums(sums, z_loss, model.cfg.mtp_depth, mtp_weight)


def value_and_grad(params, batch: dict, *, model: Decoder, z_loss: float, rng: jax.Array | None = None,
                   pipeline: Pipeline | None = None, mtp_weight: jax.Array | float = 0.0):
  """((loss, aux), grads): by autodiff, or interleaved by hand under the 1F1B-memory schedule."""
  if pipeline is not None and pipeline.schedule.kind == "1f1b":
    return pipeline.value_and_grad(params, batch, z_loss, mtp_weight)
  objective = functools.partial(loss_fn, batch=batch, model=model, z_loss=z_loss, rng=rng, pipeline=pipeline,
                                mtp_weight=mtp_weight)
  return jax.value_and_grad(objective, has_aux=True)(params)


def mtp_weight(train: TrainConfig, step: jax.Array) -> jax.Array:
  """lambda at `step`: train.mtp_weight, then train.mtp_weight_final from the switch on."""
  switch_step = round(train.mtp_weight_switch * train.steps)
  return mtp_objective.weight_at(step, train.mtp_weight, train.mtp_weight_final, switch_step)


def train_step(state: TrainState, batch: dict, *, model: Decoder, tx: optax.GradientTransformation,
               schedule: optax.Schedule, train: TrainConfig,
               pipeline: Pipeline | None = None) -> tuple[TrainState, dict]:
  """One AdamW update on one batch, or none if the step is bad (see guard.py).

  The batch holds k = rows / train.micro_batch micro-batches (static, from its shape: one compile per k);
  their gradients are averaged (train/accumulate.py), micro-batch m drawing fold_in(step key, m) when
  k > 1. Pure: the same inputs give bit-identical outputs, and a step that is not skipped is
  bit-identical to the unguarded update.
  """
  step_rng = jax.random.fold_in(state.rng, state.step)
  lam, k = mtp_weight(train, state.step), accumulate.count(batch, train.micro_batch)

  def micro(mb: dict, index):
    rng = accumulate.micro_key(step_rng, index, k)
    (loss, aux), grads = value_and_grad(state.params, mb, model=model, z_loss=train.z_loss, rng=rng,
                                        pipeline=pipeline, mtp_weight=lam)
    return loss, aux, grads

  loss, aux, grads = accumulate.accumulate(micro, batch, k)
  state, metrics, _ = apply_update(state, loss, aux, grads, tx=tx, schedule=schedule, train=train)
  return state, metrics


def apply_update(state: TrainState, loss: jax.Array, aux: dict, grads, *, tx: optax.GradientTransformation,
                 schedule: optax.Schedule, train: TrainConfig) -> tuple[TrainState, dict, jax.Array]:
  """The guarded AdamW update of `grads` (or none, if the step is bad): (state, metrics, bad)."""
  grad_norm = optax.tree.norm(grads)
  updates, candidate_opt_state = tx.update(grads, state.opt_state, state.params)
  update_ratio = optax.tree.norm(updates) / jnp.maximum(optax.tree.norm(state.params), 1e-30)
  bad, threshold = guard_lib.is_bad(state.guard, loss, grad_norm, update_ratio, train)
  candidate_params = optax.apply_updates(state.params, updates)
  # A bad step leaves params and optimizer state bit-identical (its candidates may hold NaN).
  params, opt_state = guard_lib.keep_if_bad(bad, (state.params, state.opt_state),
                                            (candidate_params, candidate_opt_state))
  guard = guard_lib.update_guard(state.guard, loss, bad)
  # The step counts batches, not updates: a skipped step has still consumed its batch, so `step` keeps
  # the data stream, fold_in(rng, step) and checkpoint numbering aligned with a run that skipped
  # nothing. The optimizer's own count (Adam bias correction, the schedule inside tx) lives in
  # opt_state and so counts applied updates only: after k skips the learning rate runs k steps
  # behind, and the one reported here is the one tx actually applied.
  metrics = {"loss": loss, **aux, "grad_norm": grad_norm, "update_ratio": update_ratio,
             "param_norm": optax.tree.norm(params),
             "learning_rate": schedule(state.step - state.guard.skipped),
             "skipped": bad.astype(jnp.int32), "skipped_total": guard.skipped,
             "consecutive_bad": guard.consecutive_bad, "spike_threshold": threshold}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, guard=guard), metrics, bad

