"""Checkpoint averaging: which steps are snapshots, the parameter mean of N checkpoints, and its record.

Snapshots are checkpoints every `checkpoint.average_every` steps in the last `average_count` of them before
each eval step and the last step, so an average is ready wherever the run is evaluated. The average of
checkpoints s_1 < ... < s_N is sum_i w_i * params_i / sum_i w_i in float32, cast back to each tensor's
dtype; w_i = 1, or ema_decay**(N - i) (the newest weighs most). `codex average` writes it as
WORKDIR/averaged/<step>/ (params only) with a lineage record of kind "average" whose `parents` are the
averaged checkpoints' lineage hashes (docs/checkpoints.md "Hash format").
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from codex_jax.checkpoint import lineage
from codex_jax.checkpoint.errors import CheckpointIntegrityError
from codex_jax.checkpoint.files import HashedCommit
from codex_jax.checkpoint.load import LoadedStep, checkpoint_steps, load_steps
from codex_jax.checkpoint.manager import AVERAGED_DIR, meta_hash, roots, state_leaf_hashes
from codex_jax.config.schema import CheckpointConfig


def enabled(cfg: CheckpointConfig) -> bool:
  return (cfg.average_every > 0 or cfg.average_every_seconds > 0) and cfg.average_count > 1


class SnapshotClock:
  """Wall-clock spacing (checkpoint.average_every_seconds): a snapshot is due once that many seconds have
  passed since the last save of any kind. `now` is injectable for tests."""

  def __init__(self, cfg: CheckpointConfig, now=time.monotonic):
    self.seconds, self.now = cfg.average_every_seconds, now
    self.last = now()

  def due(self) -> bool:
    return self.seconds > 0 and self.now() - self.last >= self.seconds

  def saved(self) -> None:
    self.last = self.now()


def is_snapshot(step: int, total_steps: int, eval_every: int, cfg: CheckpointConfig) -> bool:
  """Whether `step` is one of the `average_count` snapshots, `average_every` apart, ending at an eval step."""
  if not enabled(cfg) or not cfg.average_every:
    return False
  k, window = cfg.average_every, (cfg.average_count - 1) * cfg.average_every
  ends = [e for e in range(-(-step // eval_every) * eval_every, step + window + 1, eval_every) if e <= total_steps]
  if step <= total_steps <= step + window:
    ends.append(total_steps)
  return any((end - step) % k == 0 for end in ends)


def window(step: int, cfg: CheckpointConfig, saved: list[int] = ()) -> list[int]:
  """The snapshot steps an average at `step` takes, oldest first ([] when the run is too young).

  Spaced by steps: `step` and the average_count - 1 snapshots before it. Spaced by seconds: `step` and the
  newest average_count - 1 of the `saved` checkpoint steps before it.
  """
  if cfg.average_every_seconds > 0:
    before = sorted(s for s in saved if 0 < s < step)[-(cfg.average_count - 1):]
    return [*before, step] if len(before) == cfg.average_count - 1 else []
  steps = [step - i * cfg.average_every for i in range(cfg.average_count)][::-1]
  return steps if steps[0] > 0 else []


def weights(count: int, ema_decay: float) -> list[float]:
  """Per checkpoint, oldest first."""
  return [1.0] * count if not ema_decay else [ema_decay ** (count - 1 - i) for i in range(count)]


def average_trees(trees: list[Any], w: list[float]) -> Any:
  """sum_i w_i * tree_i / sum_i w_i, leaf by leaf in float32, each leaf cast back to its dtype."""
  if len(trees) != len(w) or not trees:
    raise ValueError(f"average of {len(trees)} trees with {len(w)} weights")
  total = float(sum(w))

  def mean(*leaves):
    acc = sum(jnp.asarray(x, jnp.float32) * jnp.float32(wi) if wi != 1.0 else jnp.asarray(x, jnp.float32)
              for x, wi in zip(leaves, w, strict=True))
    return (acc / jnp.float32(total)).astype(leaves[0].dtype)

  return jax.tree.map(mean, *trees)


_average_trees = jax.jit(average_trees, static_argnums=1)


def mean_params(trees: list[Any], cfg: CheckpointConfig) -> Any:
  """The mean of parameter trees (oldest first) weighted per checkpoint.ema_decay, jitted once."""
  return _average_trees(trees, tuple(weights(len(trees), cfg.ema_decay)))


def choose_steps(workdir: str, count: int, step: int | None = None) -> list[int]:
  """The `count` newest committed checkpoints up to `step` (default: the latest), oldest first."""
  if count < 1:
    raise ValueError(f"--average={count}: expected at least 1 checkpoint to average")
  steps = checkpoint_steps(workdir)
  end = steps[-1] if step is None else step
  if end not in steps:
    raise FileNotFoundError(f"{workdir}/checkpoints/{end}: no such checkpoint; committed steps are {steps}")
  chosen = [s for s in steps if s <= end][-count:]
  if len(chosen) < count:
    raise FileNotFoundError(f"{workdir}/checkpoints: averaging {count} checkpoints up to step {end} needs {count}, "
                            f"only {chosen} are committed (set checkpoint.average_every so snapshots are kept)")
  return chosen


def load_average(workdir: str, count: int, step: int | None = None) -> LoadedStep:
  """The weighted mean of the `count` newest checkpoints up to `step`, on one device, with its lineage record.

  The record (kind "average") is sealed but not written; `write_average` writes it with the parameters.
  """
  chosen = choose_steps(workdir, count, step)
  loaded = load_steps(workdir, chosen)  # One model target; parameters only.
  cfg = loaded[-1].cfg
  w = weights(count, cfg.checkpoint.ema_decay)
  params = mean_params([x.params for x in loaded], cfg.checkpoint) if count > 1 else loaded[-1].params
  leaves = state_leaf_hashes({"params": params})
  meta = {"averaged_steps": chosen, "weights": w}
  parents = [x.record["lineage_hash"] for x in loaded]
  record = lineage.seal({"version": lineage.RECORD_VERSION, "kind": "average", "step": chosen[-1], **roots(leaves),
                         "meta_hash": meta_hash(meta), "code_version": lineage.code_version(),
                         "config_hash": loaded[-1].record.get("config_hash"), "steps": chosen, "weights": w,
                         "parents": parents, "parent": parents[-1]})
  return dataclasses.replace(loaded[-1], params=params, record=record)


def write_average(workdir: str, loaded: LoadedStep, scores: dict | None = None) -> dict[str, Any]:
  """Writes `load_average`'s result as WORKDIR/averaged/<step>/ (Orbax: `state` = {"params"}, `meta`), its record
  (with the score vector under "eval" when given) appended to lineage.jsonl."""
  chosen = loaded.record["steps"]
  directory = os.path.join(os.path.abspath(workdir), AVERAGED_DIR)
  if os.path.exists(os.path.join(directory, str(chosen[-1]))):
    raise CheckpointIntegrityError(f"{directory}/{chosen[-1]} already exists: an average is never overwritten")
  record = loaded.record
  if scores is not None:
    record = lineage.seal({**{k: v for k, v in record.items() if k != "lineage_hash"}, "eval": scores})
  leaves = state_leaf_hashes({"params": loaded.params})
  meta = {"averaged_steps": chosen, "weights": record["weights"], "leaves": leaves, "lineage": record}
  options = ocp.CheckpointManagerOptions(create=True, temporary_path_class=HashedCommit)
  manager = ocp.CheckpointManager(directory, options=options,
                                  item_handlers={"state": ocp.StandardCheckpointHandler(use_ocdbt=False),
                                                 "meta": ocp.JsonCheckpointHandler()})
  try:
    manager.save(chosen[-1], args=ocp.args.Composite(state=ocp.args.StandardSave({"params": loaded.params}),
                                                     meta=ocp.args.JsonSave(meta)),
                 custom_metadata={"lineage": record}, force=True)
    manager.wait_until_finished()
  finally:
    manager.close()
  step_dir = os.path.join(directory, str(chosen[-1]))
  if jax.process_index() == 0:
    lineage.append_log(workdir, record)
  return {"path": step_dir, "steps": chosen, "weights": record["weights"], "lineage_hash": record["lineage_hash"],
          "parents": record["parents"], "content_root": record["content_root"]}

