"""Orbax checkpoints of the train state, the Grain iterator and the data record, saved and restored together."""

from __future__ import annotations

import os

import grain
import orbax.checkpoint as ocp

from codex_jax.config.schema import CheckpointConfig


class Checkpointer:
  """One Orbax CheckpointManager (`args=` API, Composite of `state`, `data` and `meta`) under workdir/checkpoints.

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

  def save(self, step: int, state, data_iterator, meta: dict) -> None:
    """Starts saving (async when configured); arrays are copied off device before this returns.

    `meta` is JSON saved beside the arrays: the data record (manifest hash, exclusions, phase) and
    the token accounting, read back by `read_meta` before anything is restored.
    """
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator),
        meta=ocp.args.JsonSave(meta)), force=True)

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore(self, step: int, abstract_state, data_iterator=None):
    """The state at `step`, laid out as `abstract_state`'s shardings; the iterator (if given) is set in place."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self.manager.restore(step, args=ocp.args.Composite(**items)).state

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
