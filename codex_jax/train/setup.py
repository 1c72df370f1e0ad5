"""Everything a step needs, built once from the config: the engine, the optimizer, the state's shardings, the
jitted train step."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from codex_jax.config.schema import Config
from codex_jax.runtime.engine import Engine, build_engine, with_shardings
from codex_jax.telemetry import flops
from codex_jax.train import multimodal_step, optimizer
from codex_jax.train import state as state_lib
from codex_jax.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class Trainer:
  engine: Engine
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  init: Callable[[], state_lib.TrainState]
  abstract_state: state_lib.TrainState
  shardings: state_lib.TrainState
  train_step: Any   # jitted (state, batch) -> (state, metrics), state donated.

  def init_state(self) -> state_lib.TrainState:
    """A fresh state, born sharded: each device only ever holds its own shards."""
    return jax.jit(self.init, out_shardings=self.shardings)()

  def restore_target(self) -> state_lib.TrainState:
    return with_shardings(self.abstract_state, self.shardings)


def build_trainer(cfg: Config, mesh: Mesh, phase_starts: dict[str, int] | None = None) -> Trainer:
  """`phase_starts` (manifest phase -> start step) switches the objectives' weights per phase."""
  engine = build_engine(cfg, mesh, phase_starts)
  schedule = optimizer.learning_rate_schedule(cfg.optimizer, cfg.train.steps)
  tx = optimizer.make_optimizer(cfg.optimizer, cfg.train.steps)
  init = state_lib.init_fn(engine, tx, cfg.train.seed, cfg.train.spike_window)
  abstract_state = jax.eval_shape(init)
  shardings = state_lib.state_shardings(engine, tx, abstract_state)
  common = dict(model=engine.model, tx=tx, schedule=schedule, train=cfg.train, pipeline=engine.pipeline)
  step = (functools.partial(multimodal_step.train_step, spec=engine.spec, **common) if engine.spec
          else functools.partial(step_lib.train_step, **common))
  train_step = engine.jit(step, in_shardings=(shardings, engine.data_sharding),
                          out_shardings=(shardings, engine.replicated), donate_argnums=0)
  return Trainer(engine, tx, schedule, init, abstract_state, shardings, train_step)


def xla_model_flops(cfg: Config, mesh: Mesh, batch) -> float | None:
  """XLA's own count of one step's model FLOPs, to cross-check the analytic 6N + attention formula.

  XLA's cost analysis counts a while-loop body once, so a scanned stack would be undercounted by the
  number of layers (and the cross-entropy's scan over chunks by their number: one chunk here), remat adds recomputation that model FLOPs leave out, and chunked attention skips
  the masked blocks that the PaLM convention counts. So the count is taken from the same step
  unrolled, without remat, with whole attention; lowered but never compiled (the unpartitioned
  program: global FLOPs, no device multiplier). A pipeline's ticks would count its bubble too, so the
  count is of the same model on one device; accumulation's scan too, so the batch is taken as one
  micro-batch. A conditional counts as its costlier branch, so a multimodal step is counted as one that
  measures the tuner's norms (telemetry/flops.py: StepFlops.measuring).
  """
  rows = jax.tree.leaves(batch)[0].shape[0]
  counted = dataclasses.replace(cfg, model=dataclasses.replace(
      cfg.model, scan_layers=False, remat="none", attention_chunks=1, loss_chunk=cfg.data.seq_len),
      mesh=dataclasses.replace(cfg.mesh, data=1, tensor=1, pipeline=1),
      train=dataclasses.replace(cfg.train, global_batch=rows, grad_accum=1))
  one_device = Mesh(np.asarray(mesh.devices).reshape(-1)[:1].reshape(1, 1, 1), mesh.axis_names,
                    axis_types=mesh.axis_types)
  trainer = build_trainer(counted, one_device)
  abstract_batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), batch)
  return flops.xla_flops(trainer.train_step.lower(trainer.restore_target(), abstract_batch))
