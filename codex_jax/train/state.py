"""The training state, born sharded: eval_shape -> logical specs -> mesh shardings -> jit(init)."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from codex_jax.model.transformer import Decoder, trunk_params
from codex_jax.objectives import balance
from codex_jax.parallel.mesh import replicated
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
  """The state of a multimodal run (train/objectives.py); text-only runs keep TrainState exactly."""

  target_params: Any       # EMA of the trunk's params (TRUNK_PARAMS) when vision or world is on, else {}.
  balance: balance.BalanceState  # The loss-weight tuner's weights, multipliers and norm EMA.


def dummy_tokens(batch: int, seq_len: int):
  return np.zeros((batch, seq_len), np.int32)


def _boxed_init(model: Decoder, seed: int, seq_len: int):
  tokens = dummy_tokens(1, seq_len)
  # train_outputs, not __call__: it also creates the training-only MTP params (when model.mtp_depth > 0).
  # init_outputs with objective heads (they exist only then); the text-only init is unchanged.
  method = Decoder.init_outputs if model.cfg.objectives else Decoder.train_outputs
  return model.init(jax.random.PRNGKey(seed), tokens, tokens + 1, tokens, method=method)["params"]


def init_fn(model: Decoder, tx: optax.GradientTransformation, seed: int, seq_len: int, spike_window: int,
            tuner: balance.BalanceConfig | None = None):
  """A function of no arguments returning a fresh TrainState (params from `seed`); with `tuner` (the first
  phase's), an ObjectiveState: its EMA target starts as a copy of the trunk."""
  def init() -> TrainState:
    params = nn.meta.unbox(_boxed_init(model, seed, seq_len))
    fields = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                  rng=jax.random.PRNGKey(seed + 1), guard=init_guard(spike_window))
    if tuner is None:
      return TrainState(**fields)
    # The EMA target encoder (the trunk) only when vision or world needs its latents.
    target = trunk_params(params) if set(model.cfg.objectives) & {"vision", "world"} else {}
    return ObjectiveState(**fields, target_params=target, balance=balance.init_state(tuner))
  return init


def param_logical_specs(model: Decoder, seq_len: int):
  """PartitionSpecs of logical axis names for every parameter, without allocating any."""
  boxed = jax.eval_shape(lambda: _boxed_init(model, 0, seq_len))
  return nn.get_partition_spec(boxed)


def state_shardings(model: Decoder, tx: optax.GradientTransformation, mesh: Mesh, rules,
                    abstract_state: TrainState, seq_len: int) -> TrainState:
  """NamedShardings for every leaf: params by the rules table, optimizer moments like their params."""
  param_specs = param_logical_specs(model, seq_len)
  param_shardings = nn.logical_to_mesh_sharding(param_specs, mesh, rules)
  whole = replicated(mesh)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, sharding: sharding, abstract_state.opt_state, param_shardings,
      transform_non_params=lambda _: whole)
  fields = dict(step=whole, params=param_shardings, opt_state=opt_shardings, rng=whole,
                guard=jax.tree.map(lambda _: whole, abstract_state.guard))
  if not isinstance(abstract_state, ObjectiveState):
    return TrainState(**fields)
  # The EMA target is sharded like the params it tracks; the tuner's [N] arrays are replicated.
  return ObjectiveState(**fields, target_params={k: param_shardings[k] for k in abstract_state.target_params},
                        balance=jax.tree.map(lambda _: whole, abstract_state.balance))


def abstract_with_shardings(abstract_state: TrainState, shardings: TrainState) -> TrainState:
  """ShapeDtypeStructs carrying their shardings: the target a checkpoint restores into."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
