"""The training state: the engine's parameters plus what updates them, born sharded like them."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from codex_jax.model.transformer import trunk_params
from codex_jax.objectives import balance
from codex_jax.runtime.engine import Engine
from codex_jax.train.guard import Guard, init_guard


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: the number of updates applied.
  params: Any
  opt_state: Any
  rng: jax.Array           # uint32[2] raw key; each step uses fold_in(rng, step).
  guard: Guard             # Skip counters and the recent-loss window: saved so a resumed run decides alike.


@flax.struct.dataclass
class ObjectiveState(TrainState):
  """The state of a multimodal run (train/multimodal_step.py); text-only runs keep TrainState exactly."""

  target_params: Any       # EMA of the trunk's params (TRUNK_PARAMS) when vision or world is on, else {}.
  balance: balance.BalanceState  # The loss-weight tuner's weights, multipliers and norm EMA.


def init_fn(engine: Engine, tx: optax.GradientTransformation, seed: int, spike_window: int):
  """A function of no arguments returning a fresh TrainState (params from `seed`); for a multimodal engine,
  an ObjectiveState with the first phase's tuner: its EMA target starts as a copy of the trunk."""
  def init() -> TrainState:
    params = engine.init_params(seed)
    fields = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                  rng=jax.random.PRNGKey(seed + 1), guard=init_guard(spike_window))
    if engine.spec is None:
      return TrainState(**fields)
    target = trunk_params(params) if engine.has_target else {}
    return ObjectiveState(**fields, target_params=target, balance=balance.init_state(engine.spec.phases[0][1]))
  return init


def state_shardings(engine: Engine, tx: optax.GradientTransformation, abstract_state: TrainState) -> TrainState:
  """NamedShardings for every leaf: params by the rules table, optimizer moments like their params."""
  whole = engine.replicated
  opt_shardings = optax.tree_map_params(
      tx, lambda _, sharding: sharding, abstract_state.opt_state, engine.param_shardings,
      transform_non_params=lambda _: whole)
  fields = dict(step=whole, params=engine.param_shardings, opt_state=opt_shardings, rng=whole,
                guard=jax.tree.map(lambda _: whole, abstract_state.guard))
  if not isinstance(abstract_state, ObjectiveState):
    return TrainState(**fields)
  # The EMA target is sharded like the params it tracks; the tuner's [N] arrays are replicated.
  return ObjectiveState(**fields, target_params=engine.target_shardings,
                        balance=jax.tree.map(lambda _: whole, abstract_state.balance))

