"""The model on a mesh: parameters' and batches' shardings, the pipeline, and one jit that puts the rules in scope.

Everything that runs the model without updating it (evals, checkpoint reads, generation, the importer) builds
an Engine; train/setup.py builds its Trainer on one. Parameters are born sharded: eval_shape -> logical specs
-> mesh shardings -> jit(init).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from codex_jax.config.schema import Config
from codex_jax.model.transformer import Decoder, trunk_params
from codex_jax.parallel.mesh import batch_sharding, one_device_mesh, replicated
from codex_jax.parallel.pipeline import LAYERS, Pipeline, Schedule
from codex_jax.parallel.rules import logical_axis_rules, sharding_scope
from codex_jax.runtime import multimodal


@dataclasses.dataclass(frozen=True)
class Engine:
  cfg: Config
  model: Decoder
  mesh: Mesh
  rules: tuple
  param_shapes: Any             # ShapeDtypeStructs of the parameter tree (traced once, never allocated).
  param_shardings: Any           # NamedShardings of the parameter tree, by the rules table.
  data_sharding: NamedSharding   # A batch's rows over `data`.
  pipeline: Pipeline | None      # The layer stack's schedule over `pipeline`, when that axis is > 1.
  spec: multimodal.Spec | None   # The objectives' static spec when a non-text objective is on.

  @property
  def replicated(self) -> NamedSharding:
    return replicated(self.mesh)

  def jit(self, fn: Callable, in_shardings, out_shardings=None, donate_argnums=()):
    """`fn` jitted with explicit shardings (outputs replicated by default), traced with the logical rules in scope."""
    def ruled(*args):
      with sharding_scope(self.mesh, self.rules):
        return fn(*args)

    return jax.jit(ruled, in_shardings=in_shardings,
                   out_shardings=self.replicated if out_shardings is None else out_shardings,
                   donate_argnums=donate_argnums)

  def init_params(self, seed: int):
    """Fresh parameters from `seed` (unsharded; under jit with out_shardings they are born sharded)."""
    return nn.meta.unbox(_boxed_init(self.model, seed, self.cfg.data.seq_len))

  def abstract_params(self):
    """ShapeDtypeStructs of the parameters, carrying their shardings: what a checkpoint restores into."""
    return with_shardings(self.param_shapes, self.param_shardings)

  @property
  def has_target(self) -> bool:
    """Whether the run keeps an EMA target encoder (the trunk), which vision and world read."""
    return self.spec is not None and self.spec.needs_target

  @property
  def target_shardings(self) -> dict:
    return trunk_params(self.param_shardings) if self.has_target else {}

  def abstract_target(self) -> dict:
    """The EMA target's ShapeDtypeStructs with their shardings ({} when the run has none)."""
    return trunk_params(self.abstract_params()) if self.has_target else {}


def build_engine(cfg: Config, mesh: Mesh, phase_starts: dict[str, int] | None = None) -> Engine:
  """`phase_starts` (manifest phase -> start step) switches the objectives' weights per phase."""
  rules = logical_axis_rules(cfg.mesh.fsdp, cfg.mesh.sequence_parallel)
  model = Decoder(cfg.model)
  # One trace of the init gives the parameters' shapes and their logical axis names.
  boxed = jax.eval_shape(lambda: _boxed_init(model, 0, cfg.data.seq_len))
  specs = nn.get_partition_spec(boxed)
  spec = multimodal.spec_of(cfg, phase_starts) if cfg.objectives.multimodal else None
  return Engine(cfg, model, mesh, rules, nn.meta.unbox(boxed), nn.logical_to_mesh_sharding(specs, mesh, rules),
                batch_sharding(mesh), _pipeline(cfg, mesh, model, specs), spec)


def one_device(cfg: Config) -> Engine:
  """The engine of a one-device config (checkpoint/load.py's), on this process's first device."""
  return build_engine(cfg, one_device_mesh(cfg.mesh))


def _pipeline(cfg: Config, mesh: Mesh, model: Decoder, specs) -> Pipeline | None:
  stages = mesh.shape["pipeline"]
  if stages == 1:
    return None
  return Pipeline(model, Schedule.of(cfg.mesh, stages), specs[LAYERS])


def _boxed_init(model: Decoder, seed: int, seq_len: int):
  tokens = np.zeros((1, seq_len), np.int32)
  # train_outputs, not __call__: it also creates the training-only MTP params (when model.mtp_depth > 0).
  # init_outputs with objective heads (they exist only then); the text-only init is unchanged.
  method = Decoder.init_outputs if model.cfg.objectives else Decoder.train_outputs
  return model.init(jax.random.PRNGKey(seed), tokens, tokens + 1, tokens, method=method)["params"]


def with_shardings(abstract, shardings):
  """ShapeDtypeStructs carrying their shardings: the target a checkpoint restores into."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
