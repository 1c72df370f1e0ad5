"""Read-only access to a run's checkpoints: its config and the verified parameters at a step.

Used by everything that reads a finished or running workdir without training it (`codex eval`,
`codex average`, `codex export`, `codex generate`). Parameters are restored onto one device whatever
mesh wrote them (a stacked layer tensor has the same shape under every layout), every tensor checked
against its lineage hash; nothing in the workdir is written.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any

from codex_jax.checkpoint.errors import CheckpointIntegrityError
from codex_jax.checkpoint.manager import Checkpointer
from codex_jax.config import load as config_load
from codex_jax.config.schema import Config
from codex_jax.config.workdir import CONFIG_FILE
from codex_jax.runtime.engine import one_device

# The layout a read-only load uses: one device, no pipeline; everything else as the run had it.
ONE_DEVICE_MESH = {"data": 1, "tensor": 1, "pipeline": 1, "fsdp": False, "sequence_parallel": False,
                   "schedule": "gpipe", "microbatches": 0, "repeats": 1, "auto": False}


@dataclasses.dataclass(frozen=True)
class LoadedStep:
  cfg: Config                # The run's config, re-laid out for one device.
  config: dict[str, Any]     # The run's config as saved in WORKDIR/config.json (its real layout).
  step: int
  params: Any                # The parameter tree, on one device.
  record: dict[str, Any]     # The checkpoint's lineage record.
  target_params: Any = None  # The EMA target encoder's (load_step(with_target=True), when the run has one).


def read_config(workdir: str) -> tuple[Config, dict[str, Any]]:
  """The run's saved config, validated, with its mesh replaced by one device (see ONE_DEVICE_MESH)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no saved config; is {workdir!r} a codex train workdir?")
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointIntegrityError(f"{path}: cannot read the run's config ({e})") from e
  return one_device_config(saved), saved


def one_device_config(config: dict[str, Any]) -> Config:
  """`config` (a plain dict) validated with its mesh replaced by one device (ONE_DEVICE_MESH)."""
  one_device = copy.deepcopy(config)
  one_device["mesh"] = {**one_device.get("mesh", {}), **ONE_DEVICE_MESH}
  return config_load.load(one_device, num_devices=1)


def committed_steps(workdir: str) -> list[int]:
  """The committed checkpoint steps of `workdir`, ascending; [] when it has none (or no checkpoints folder)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def checkpoint_steps(workdir: str) -> list[int]:
  """The committed checkpoint steps of `workdir`, ascending; refuses a workdir without any."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory}: no checkpoints; has `codex train --workdir={workdir}` saved one?")
  steps = committed_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"{directory}: no committed checkpoint")
  return steps


def load_steps(workdir: str, steps: list[int | None], cfg: Config | None = None, *,
               with_target: bool = False) -> list[LoadedStep]:
  """The verified parameters of checkpoints `steps` (None: the latest) of `workdir`, on one device.

  One model target serves every step, and only the parameters are read (Checkpointer.restore_params):
  optimizer moments, and whatever else the train state holds, stay on disk. With `with_target`, a
  multimodal run's EMA target encoder (`target_params`) is read too (the per-objective evals need it).
  """
  if cfg is None:
    cfg, saved = read_config(workdir)
  else:
    saved = read_config(workdir)[1]
  committed = checkpoint_steps(workdir)
  steps = [committed[-1] if step is None else step for step in steps]
  for step in steps:
    if step not in committed:
      raise FileNotFoundError(f"{workdir}/checkpoints/{step}: no such checkpoint; committed steps are {committed}")
  engine = one_device(cfg)
  fields = {"params": engine.abstract_params()}
  if with_target and engine.has_target:
    fields["target_params"] = engine.abstract_target()
  checkpointer = Checkpointer(workdir, cfg.checkpoint)
  loaded = []
  try:
    for step in steps:
      meta = checkpointer.read_meta(step)
      restored = checkpointer.restore_fields(step, fields, meta=meta,
                                             allow_dtype_change=cfg.checkpoint.allow_dtype_change)
      loaded.append(LoadedStep(cfg, saved, step, restored["params"], meta["lineage"], restored.get("target_params")))
  finally:
    checkpointer.close()
  return loaded


def load_step(workdir: str, step: int | None = None, cfg: Config | None = None, *,
              with_target: bool = False) -> LoadedStep:
  """The verified parameters of checkpoint `step` (default: the latest) of `workdir`, on one device."""
  return load_steps(workdir, [step], cfg, with_target=with_target)[0]
