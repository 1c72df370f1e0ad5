"""Orbax checkpoints of the train state and the Grain iterator, saved and restored together."""

from __future__ import annotations

import os

import grain
import orbax.checkpoint as ocp

from codex_jax.config.schema import CheckpointConfig


class Checkpointer:
  """One Orbax CheckpointManager (`args=` API, Composite of `state` and `data`) under workdir/checkpoints.

  Orbax writes each step to a temporary directory and renames it on commit, so a step interrupted
  mid-save is never listed; `latest_step` only sees committed steps.
  """

  def __init__(self, workdir: str, cfg: CheckpointConfig):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.max_to_keep, enable_async_checkpointing=cfg.async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iterator) -> None:
    """Starts saving (async when configured); arrays are copied off device before this returns."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)),
        force=True)

  def restore(self, step: int, abstract_state, data_iterator):
    """The state at `step`, laid out as `abstract_state`'s shardings; the iterator is set in place."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored.state

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
