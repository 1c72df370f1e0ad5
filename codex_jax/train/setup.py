"""Everything a step needs, built once from the config: model, optimizer, shardings, jitted steps."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from codex_jax.config.schema import Config
from codex_jax.model.transformer import Decoder
from codex_jax.parallel.mesh import batch_sharding
from codex_jax.parallel.pipeline import LAYERS, Pipeline, Schedule
from codex_jax.parallel.rules import logical_axis_rules
from codex_jax.telemetry import flops
from codex_jax.train import objectives as objectives_lib
from codex_jax.train import optimizer
from codex_jax.train import state as state_lib
from codex_jax.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class Trainer:
  model: Decoder
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  init: Callable[[], state_lib.TrainState]
  abstract_state: state_lib.TrainState
  shardings: state_lib.TrainState
  data_sharding: NamedSharding
  train_step: Any   # jitted (state, batch) -> (state, metrics), state donated.
  eval_step: Any    # jitted (params, batch) -> {ce_sum, tokens}.
  pipeline: Pipeline | None = None  # The layer stack's schedule over `pipeline`, when that axis is > 1.
  objectives: Any = None  # train/objectives.py's Spec when a non-text objective is on (state: ObjectiveState).
  objective_outputs: Any = None  # jitted (params, target_params, batch, rng) -> per-objective outputs (evals).

  def init_state(self) -> state_lib.TrainState:
    """A fresh state, born sharded: each device only ever holds its own shards."""
    return jax.jit(self.init, out_shardings=self.shardings)()

  def restore_target(self) -> state_lib.TrainState:
    return state_lib.abstract_with_shardings(self.abstract_state, self.shardings)


def build_trainer(cfg: Config, mesh: Mesh, phase_starts: dict[str, int] | None = None) -> Trainer:
  """`phase_starts` (manifest phase -> start step) switches the objectives' weights per phase."""
  rules = logical_axis_rules(cfg.mesh.fsdp, cfg.mesh.sequence_parallel)
  seq_len, total_steps = cfg.data.seq_len, cfg.train.steps
  model = Decoder(cfg.model)
  pipeline = build_pipeline(cfg, mesh, model)
  schedule = optimizer.learning_rate_schedule(cfg.optimizer, total_steps)
  tx = optimizer.make_optimizer(cfg.optimizer, total_steps)
  spec = objectives_lib.spec_of(cfg, phase_starts) if cfg.objectives.multimodal else None
  init = state_lib.init_fn(model, tx, cfg.train.seed, seq_len, cfg.train.spike_window,
                           tuner=spec.phases[0][1] if spec else None)
  abstract_state = jax.eval_shape(init)
  shardings = state_lib.state_shardings(model, tx, mesh, rules, abstract_state, seq_len)
  data_sharding = batch_sharding(mesh)
  step = spec and functools.partial(objectives_lib.train_step, model=model, tx=tx, schedule=schedule,
                                    train=cfg.train, spec=spec, pipeline=pipeline)
  train_step = step_lib.jit_train_step(model, tx, schedule, cfg.train, shardings, data_sharding, mesh,
                                       rules, pipeline, step=step)
  outputs = spec and objectives_lib.jit_objective_outputs(model, spec, shardings, data_sharding, mesh, rules,
                                                          pipeline)
  eval_step = step_lib.jit_eval_step(model, cfg.train.z_loss, shardings.params, data_sharding, mesh, rules,
                                     pipeline)
  return Trainer(model, tx, schedule, init, abstract_state, shardings, data_sharding, train_step, eval_step,
                 pipeline, spec, outputs)


def build_pipeline(cfg: Config, mesh: Mesh, model: Decoder) -> Pipeline | None:
  """The layer stack's pipeline over the mesh's `pipeline` axis; None when that axis has one device."""
  stages = mesh.shape["pipeline"]
  if stages == 1:
    return None
  schedule = Schedule.of(cfg.mesh, stages)
  stack_specs = state_lib.param_logical_specs(model, cfg.data.seq_len)[LAYERS]
  return Pipeline(model, schedule, stack_specs)


def xla_model_flops(cfg: Config, mesh: Mesh, batch) -> float | None:
  """XLA's own count of one step's model FLOPs, to cross-check the analytic 6N + attention formula.

  XLA's cost analysis counts a while-loop body once, so a scanned stack would be undercounted by the
  number of layers, remat adds recomputation that model FLOPs leave out, and chunked attention skips
  the masked blocks that the PaLM convention counts. So the count is taken from the same step
  unrolled, without remat, with whole attention; lowered but never compiled (the unpartitioned
  program: global FLOPs, no device multiplier). A pipeline's ticks would count its bubble too, so the
  count is of the same model on one device; accumulation's scan too, so the batch is taken as one
  micro-batch. A conditional counts as its costlier branch, so a multimodal step is counted as one that
  measures the tuner's norms (telemetry/flops.py: StepFlops.measuring).
  """
  rows = jax.tree.leaves(batch)[0].shape[0]
  counted = dataclasses.replace(cfg, model=dataclasses.replace(
      cfg.model, scan_layers=False, remat="none", attention_chunks=1),
      mesh=dataclasses.replace(cfg.mesh, data=1, tensor=1, pipeline=1),
      train=dataclasses.replace(cfg.train, global_batch=rows, grad_accum=1))
  one_device = Mesh(np.asarray(mesh.devices).reshape(-1)[:1].reshape(1, 1, 1), mesh.axis_names,
                    axis_types=mesh.axis_types)
  trainer = build_trainer(counted, one_device)
  abstract_batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), batch)
  return flops.xla_flops(trainer.train_step.lower(trainer.restore_target(), abstract_batch))
