"""The `data` item of a checkpoint: one Grain iterator state per shard of the data stream, whoever feeds it.

Each process writes `shard_<s>-of-<count>.json` for the shards it feeds (data/batches.py:ShardedBatches) and
reads back the ones it feeds now, so a resume with another process count finds every shard's position. A
checkpoint from before shards (grain's `process_<p>-of-<count>.json`, one shard per process) reads the same
way. A plain iterator (the importer, tests, the bench) is shard 0 of 1.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from codex_jax.data.batches import ShardedBatches


def as_shards(iterators) -> tuple[dict[int, Any], int]:
  """(shard index -> iterator, shard count) of a ShardedBatches' iterators or of one plain iterator."""
  if isinstance(iterators, ShardedBatches):
    return iterators.iterators, iterators.count
  return {0: iterators}, 1


def first_state(iterators) -> Any:
  """The state of the lowest shard this process feeds (process 0's is shard 0: the one a record hashes)."""
  shards, _ = as_shards(iterators)
  return shards[min(shards)].get_state()


class DataShardsHandler(ocp.CheckpointHandler):
  """Orbax handler of the `data` item (grain's own writes one file per process, which pins the process count)."""

  def save(self, directory: epath.Path, args: DataShardsSave) -> None:
    shards, count = as_shards(args.iterators)
    for shard, iterator in shards.items():
      (directory / f"shard_{shard}-of-{count}.json").write_text(json.dumps(iterator.get_state(), indent=1))

  def restore(self, directory: epath.Path, args: DataShardsRestore) -> Any:
    shards, count = as_shards(args.iterators)
    for shard, iterator in shards.items():
      path = directory / f"shard_{shard}-of-{count}.json"
      if not path.exists():
        path = directory / f"process_{shard}-of-{count}.json"  # Written by grain's handler before shards.
      if not path.exists():
        raise FileNotFoundError(f"{directory}: no iterator state for data shard {shard} of {count}")
      iterator.set_state(json.loads(path.read_text()))
    return args.iterators

  def metadata(self, directory: epath.Path) -> None:
    return None

  def structure(self, directory: epath.Path) -> None:
    return None

  def finalize(self, directory: epath.Path) -> None:
    pass

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(DataShardsHandler, for_save=True)
@dataclasses.dataclass
class DataShardsSave(ocp.args.CheckpointArgs):
  iterators: Any  # ShardedBatches, or one grain iterator.


@ocp.args.register_with_handler(DataShardsHandler, for_restore=True)
@dataclasses.dataclass
class DataShardsRestore(ocp.args.CheckpointArgs):
  iterators: Any
