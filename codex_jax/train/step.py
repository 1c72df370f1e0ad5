"""The pure training step: `train_step(state, batch) -> (state, metrics)`, and its jitted form."""

from __future__ import annotations

import functools

import jax
import optax

from codex_jax.model.transformer import Decoder
from codex_jax.objectives.text import next_token_loss
from codex_jax.parallel.mesh import replicated
from codex_jax.parallel.rules import sharding_scope
from codex_jax.train.state import TrainState


def loss_fn(params, batch: dict, *, model: Decoder, z_loss: float, rng: jax.Array | None = None):
  """(loss, aux metrics) of `params` on one batch: the objective every step differentiates."""
  logits_BLV = model.apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"],
                           batch.get("features"), batch.get("modality_ids"),
                           rngs=None if rng is None else {"dropout": rng})
  return next_token_loss(logits_BLV, batch["targets"], batch["loss_mask"], z_loss)


def train_step(state: TrainState, batch: dict, *, model: Decoder, tx: optax.GradientTransformation,
               schedule: optax.Schedule, z_loss: float) -> tuple[TrainState, dict]:
  """One AdamW update on one global batch. Pure: the same inputs give bit-identical outputs."""
  step_rng = jax.random.fold_in(state.rng, state.step)
  objective = functools.partial(loss_fn, batch=batch, model=model, z_loss=z_loss, rng=step_rng)
  (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, **aux, "grad_norm": optax.tree.norm(grads),
             "param_norm": optax.tree.norm(params), "learning_rate": schedule(state.step)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch: dict, *, model: Decoder, z_loss: float) -> dict:
  """Held-out loss of `params` on one batch (sums, so batches combine exactly)."""
  _, aux = loss_fn(params, batch, model=model, z_loss=z_loss)
  return {"ce_sum": aux["ce_loss"] * aux["tokens"], "tokens": aux["tokens"]}


def jit_train_step(model, tx, schedule, z_loss, state_shardings, batch_sharding, mesh, rules):
  """train_step jitted once: explicit in/out shardings, the state donated, logical rules in scope."""
  step = functools.partial(train_step, model=model, tx=tx, schedule=schedule, z_loss=z_loss)

  def ruled_step(state, batch):
    with sharding_scope(mesh, rules):
      return step(state, batch)

  return jax.jit(ruled_step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)


def jit_eval_step(model, z_loss, param_shardings, batch_sharding, mesh, rules):
  def ruled_eval(params, batch):
    with sharding_scope(mesh, rules):
      return eval_step(params, batch, model=model, z_loss=z_loss)

  return jax.jit(ruled_eval, in_shardings=(param_shardings, batch_sharding), out_shardings=replicated(mesh))
