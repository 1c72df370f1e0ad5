"""Orbax checkpoints of the train state, the Grain iterators and the data record, hashed and chained.

Each step directory holds `state` (one zarr folder per tensor: no OCDBT, so a damaged file names its
tensor), `data` (each data shard's Grain iterator, checkpoint/data_shards.py), `meta` (JSON: the data record,
token accounting and the hash of every tensor), the lineage record in Orbax's step metadata, and `files.json` (every other file's sha256,
checkpoint/files.py). Orbax writes each step to a temporary directory and renames it on commit, so a step
interrupted mid-save is never listed. Restore refuses a changed file, then any mismatch in structure, shape or
dtype before reading, and any changed tensor after reading, before a single array is handed back.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from codex_jax.checkpoint import lineage, merkle
from codex_jax.checkpoint.data_shards import DataShardsHandler, DataShardsRestore, DataShardsSave, first_state
from codex_jax.checkpoint.errors import CheckpointIntegrityError, CheckpointWriteError
from codex_jax.checkpoint.files import HashedCommit, check_files
from codex_jax.config.schema import CheckpointConfig

STATE_GROUPS = ("params", "opt_state")  # Hashed into their own roots; every other leaf into extra_root.
AVERAGED_DIR = "averaged"  # WORKDIR/averaged/<step>/: parameter means written by checkpoint/average.py.


def group_of(path: str) -> str:
  head = path.split("/", 1)[0]
  return head if head in STATE_GROUPS else "extra"


def roots(leaf_hashes: dict[str, str]) -> dict[str, str]:
  """content_root (params), optimizer_root (opt_state) and extra_root (step, rng, ...) of a state."""
  by_group: dict[str, list[str]] = {"params": [], "opt_state": [], "extra": []}
  for path in sorted(leaf_hashes, key=lambda p: p.encode("utf-8")):
    by_group[group_of(path)].append(leaf_hashes[path])
  return {"content_root": merkle.root(by_group["params"]), "optimizer_root": merkle.root(by_group["opt_state"]),
          "extra_root": merkle.root(by_group["extra"])}


def state_leaf_hashes(state, refuse_non_finite_at: int | None = None) -> dict[str, str]:
  """Full path -> leaf hash. Params and optimizer leaves are hashed under paths relative to their group,
  so the content root is the weights' own (the same tree exported or imported elsewhere).

  One tensor at a time: a host-local one from its host copy, one spread over processes block-wise
  without gathering it (`merkle.sharded_leaf_hash`). With `refuse_non_finite_at=step`, a NaN or Inf is
  refused (on the host copy, or on device for a distributed tensor).
  """
  hashes = {}
  for path, leaf in merkle.host_leaves(state):
    array = leaf if merkle.is_distributed(leaf) else np.asarray(jax.device_get(leaf))
    if refuse_non_finite_at is not None and jnp.issubdtype(array.dtype, jnp.inexact) and not _finite(array):
      raise CheckpointIntegrityError(f"refusing to save step {refuse_non_finite_at}: tensor {path} holds NaN or Inf")
    group, _, rest = path.partition("/")
    hashes[path] = merkle.array_leaf_hash(rest if group in STATE_GROUPS else path, array)
  return hashes


def _finite(array) -> bool:
  """No NaN or Inf: a host copy checked in numpy, a distributed tensor on its devices."""
  if isinstance(array, np.ndarray):
    return bool(np.all(np.isfinite(array)))
  return bool(_all_finite(array))


@jax.jit
def _all_finite(x):
  return jnp.all(jnp.isfinite(x))


def iterator_hash(state: Any) -> str:
  return hashlib.sha256(lineage.canonical(state)).hexdigest()


def meta_hash(meta: dict) -> str:
  """sha256 of the meta item's own content (data record, accounting), without tensor hashes and record."""
  return hashlib.sha256(lineage.canonical({k: v for k, v in meta.items() if k not in ("leaves", "lineage")})).hexdigest()


def tensor_files(step_dir: str, path: str) -> list[str]:
  """The files Orbax wrote for one tensor (its zarr folder, named by the dotted tree path)."""
  folder = os.path.join(step_dir, "state", path.replace("/", "."))
  return sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True))


class Checkpointer:
  """One Orbax CheckpointManager (`args=` API, Composite of `state`, `data`, `meta`) under workdir/checkpoints."""

  def __init__(self, workdir: str, cfg: CheckpointConfig):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    # Averaging keeps at least its window of snapshots, whatever max_to_keep says (checkpoint/average.py).
    keep = max(cfg.max_to_keep, cfg.average_count if cfg.average_every > 0 or cfg.average_every_seconds > 0 else 0)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=cfg.async_save, create=True,
                                           temporary_path_class=HashedCommit)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(use_ocdbt=False),
                       "data": DataShardsHandler(), "meta": ocp.JsonCheckpointHandler()})
    self.parent: str | None = None  # Lineage hash the next record links to.
    # Process 0 writes lineage.jsonl, and its first data shard's iterator is the one the records hash (every
    # process saves its own tensor shards and data-shard files through Orbax).
    self.primary = jax.process_index() == 0
    self._in_flight: list[dict] = []  # Records of saves that may not have committed yet.

  def _set_aside_torn_line(self) -> None:
    copy = lineage.set_aside_torn_line(self.workdir)
    if copy:
      logging.warning("%s/%s: its last line was torn by a crash in the middle of an append; dropped (the file as "
                      "it was: %s)", self.workdir, lineage.LOG_FILE, copy)

  def _check_log(self, step: int, record: dict[str, Any]) -> None:
    """Before a resume appends to lineage.jsonl: the log verifies as `codex lineage verify` checks it, and holds
    the restored checkpoint's own record; an edited, deleted or foreign log is refused, never extended."""
    path = os.path.join(self.workdir, lineage.LOG_FILE)
    log = lineage.read_log(self.workdir)
    if not log:
      raise CheckpointIntegrityError(f"{path}: missing or empty, while checkpoint {step} exists: the chain cannot "
                                     "continue from it; restore the run's lineage.jsonl")
    chain = lineage.verify_chain(log, path)
    if not any(r.get("lineage_hash") == record["lineage_hash"] for r in chain):
      raise CheckpointIntegrityError(f"{path}: holds no record of checkpoint {step} (lineage hash "
                                     f"{record['lineage_hash']}): the log belongs to another chain")

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def start_fresh(self, start: dict[str, Any]) -> None:
    """A new run: its first record links to `start` (init seed and content root, or a parent checkpoint)."""
    self.parent = start["lineage_hash"] if "lineage_hash" in start else lineage.start_hash(start)
    if self.primary:
      self._set_aside_torn_line()
      lineage.truncate_log(self.workdir, None)
      lineage.append_log(self.workdir, {"start": start, "hash": self.parent})

  def save(self, step: int, state, data_iterators, meta: dict, fields: dict[str, Any]) -> dict:
    """Hashes the state, seals the lineage record, then starts saving (async when configured).

    `data_iterators`: this process's data shards (ShardedBatches) or one iterator (checkpoint/data_shards.py).
    `fields` are the record's run-level entries (manifest_hash, config_hash, eval, layout). Arrays are copied
    off device before this returns; a non-finite value anywhere refuses the save.
    """
    if step in self.manager.all_steps():
      raise CheckpointIntegrityError(f"{self.step_dir(step)} already exists: a committed step is never overwritten")
    if self.parent is None:
      raise CheckpointIntegrityError("no lineage start: call start_fresh() or restore() before the first save")
    self.wait_for_saves()
    leaves = state_leaf_hashes(state, refuse_non_finite_at=step)
    record = lineage.seal({"version": lineage.RECORD_VERSION, "step": step, **roots(leaves),
                           "iterator_hash": iterator_hash(first_state(data_iterators)), "meta_hash": meta_hash(meta),
                           "code_version": lineage.code_version(), **fields, "parent": self.parent})
    meta = {**meta, "leaves": leaves, "lineage": record}
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=DataShardsSave(data_iterators),
        meta=ocp.args.JsonSave(meta)), custom_metadata={"lineage": record}, force=True)
    if self.primary:
      lineage.append_log(self.workdir, record)
    self.parent = record["lineage_hash"]
    self._in_flight.append(record)
    return record

  def wait_for_saves(self) -> None:
    """Waits for the saves in flight. A background write error surfaces here, and the failed saves' records
    leave lineage.jsonl, so the next save links to the last committed checkpoint."""
    failed, self._in_flight = self._in_flight, []
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      if failed:
        self.parent = failed[0]["parent"]
      if failed and self.primary:
        try:
          lineage.drop_records(self.workdir, {r["lineage_hash"] for r in failed})
        except OSError:
          pass  # A full disk: the resume drops them (truncate_log) before appending.
      raise CheckpointWriteError(
          f"{self.directory}: checkpoint {', '.join(str(r['step']) for r in failed) or '?'} could not be written "
          f"({_short(e)}); committed checkpoints {self.all_steps()} are untouched, and a rerun resumes from the "
          "latest") from e

  def read_meta(self, step: int) -> dict:
    return load_meta(self.step_dir(step))[0]

  def restore(self, step: int, abstract_state, data_iterators=None, *, meta: dict, allow_dtype_change: bool = False,
              resume: bool = True):
    """The state at `step` in `abstract_state`'s shardings, verified tensor by tensor; the iterator is set in place.

    With resume=True the run continues from `step` (the next record links to it and lineage.jsonl is cut
    back to it); resume=False only reads (eval, export, averaging) and leaves the workdir untouched.
    """
    step_dir = self.step_dir(step)
    if resume and self.primary:
      self._set_aside_torn_line()
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterators is not None:
      items["data"] = DataShardsRestore(data_iterators)
    state = self._verified_read(step, meta, meta["leaves"], abstract_state, allow_dtype_change,
                                lambda: self.manager.restore(step, args=ocp.args.Composite(**items)).state)
    if data_iterators is not None and self.primary:
      got = iterator_hash(first_state(data_iterators))
      if got != meta["lineage"]["iterator_hash"]:
        raise CheckpointIntegrityError(f"{step_dir}/data: the data-iterator state hashes to {got}, the lineage "
                                       f"record says {meta['lineage']['iterator_hash']}")
    if resume:
      self.parent = meta["lineage"]["lineage_hash"]
      if self.primary:
        self._check_log(step, meta["lineage"])
        lineage.truncate_log(self.workdir, step)
    return state

  def restore_params(self, step: int, abstract_params, *, meta: dict, allow_dtype_change: bool = False):
    """Only the parameters at `step`, in `abstract_params`' shardings, verified as `restore` verifies them.

    For read-only loads (eval, export, averaging): Orbax's partial restore reads the `params` tensors and
    skips the rest of the state (optimizer moments, and any field the TrainState gains), so it needs
    neither their memory nor a target for them. Every file of the step is still checked against its
    recorded hash, and every parameter tensor against the lineage record's, before one is handed back.
    """
    return self.restore_fields(step, {"params": abstract_params}, meta=meta,
                               allow_dtype_change=allow_dtype_change)["params"]

  def restore_fields(self, step: int, abstract: dict[str, Any], *, meta: dict,
                     allow_dtype_change: bool = False) -> dict[str, Any]:
    """The named train-state fields at `step` ({"params": ..., "target_params": ...}), as restore_params."""
    leaves = {path: h for path, h in meta["leaves"].items() if path.split("/", 1)[0] in abstract}
    target = dict(abstract)
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)

    def read():
      with ocp.PyTreeCheckpointer() as reader:
        return reader.restore(os.path.join(self.step_dir(step), "state"), args=args)

    return self._verified_read(step, meta, leaves, target, allow_dtype_change, read)

  def _verified_read(self, step: int, meta: dict, leaves: dict[str, str], target, allow_dtype_change: bool,
                     read: Callable[[], Any]):
    """`read()`'s state tree, read only once the step's files match their recorded hashes and `target` the saved
    tensors (`leaves`, path -> hash), and handed back only once every tensor matches its hash."""
    step_dir = self.step_dir(step)
    check_files(step_dir)
    check_structure(leaves, target, step_dir, allow_dtype_change)
    try:
      restored = read()
    except Exception as e:
      raise CheckpointIntegrityError(f"{step_dir}: restore failed ({type(e).__name__}: {_short(e)})") from e
    check_leaves(leaves, state_leaf_hashes(restored), step_dir)
    return restored

  def close(self) -> None:
    """Waits for the save in flight (a background write error surfaces here)."""
    try:
      self.wait_for_saves()
    finally:
      self.manager.close()


def _short(e: Exception) -> str:
  """One line; the operating system's reason (a full disk) and the file TensorStore names (so the tensor) first."""
  text = " ".join(str(e).split())
  found = re.search(r"'path': '([^']+)'", text) or re.search(r'local file "([^"]+)"', text)
  code = re.search(r"os_error_code='(\d+)'|\[Errno (\d+)\]", text)
  reason = f"{os.strerror(int(code.group(1) or code.group(2)))}: " if code else ""
  return reason + (f"at {found.group(1)}: " if found else "") + text[:300]


def load_meta(step_dir: str) -> tuple[dict, dict]:
  """(meta item, lineage record of Orbax's step metadata), read from the files and checked against each other."""
  try:
    with open(os.path.join(step_dir, "meta", "metadata")) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointIntegrityError(f"{step_dir}/meta/metadata: cannot be read ({e})") from e
  try:
    with open(os.path.join(step_dir, "_CHECKPOINT_METADATA")) as f:
      record = (json.load(f).get("custom_metadata") or {}).get("lineage")
  except (OSError, ValueError, AttributeError) as e:
    raise CheckpointIntegrityError(f"{step_dir}/_CHECKPOINT_METADATA: cannot be read ({e})") from e
  check_meta(meta, step_dir, record)
  return meta, record


def check_meta(meta: dict, step_dir: str, record: dict | None) -> None:
  """The meta item agrees with itself and with the lineage record in Orbax's step metadata."""
  stored = meta.get("lineage", {})
  if record is None:
    raise CheckpointIntegrityError(f"{step_dir}/_CHECKPOINT_METADATA: no lineage record")
  if record.get("version") != lineage.RECORD_VERSION:
    raise CheckpointIntegrityError(
        f"{step_dir}/_CHECKPOINT_METADATA: lineage record version {record.get('version')!r}; this codex-jax reads "
        f"version {lineage.RECORD_VERSION} (tensor hashes over 1 MiB blocks, roots that commit to their leaf count; "
        "docs/checkpoints.md 'Hash format'). Verify or convert older checkpoints with the codex-jax release that "
        "wrote them")
  if lineage.record_hash(record) != record.get("lineage_hash"):
    raise CheckpointIntegrityError(f"{step_dir}/_CHECKPOINT_METADATA: the lineage record was edited "
                                   f"(its hash is {lineage.record_hash(record)}, it says {record.get('lineage_hash')})")
  if stored != record:
    raise CheckpointIntegrityError(f"{step_dir}/meta: its lineage record differs from _CHECKPOINT_METADATA's")
  if meta_hash(meta) != record.get("meta_hash"):
    raise CheckpointIntegrityError(f"{step_dir}/meta: its content hashes to {meta_hash(meta)}, the lineage record "
                                   f"says {record.get('meta_hash')}")
  got = roots(meta.get("leaves", {}))
  for name, value in got.items():
    if record.get(name) != value:
      raise CheckpointIntegrityError(f"{step_dir}/meta: the tensor hashes give {name} {value}, the lineage record "
                                     f"says {record.get(name)}")


def check_structure(leaves: dict[str, str], abstract_state, step_dir: str, allow_dtype_change: bool) -> None:
  """Refuses a restore target whose tensors differ from the saved ones (names, then shapes, then dtypes)."""
  saved = meta_shapes(step_dir)
  wanted = {path: leaf for path, leaf in merkle.host_leaves(abstract_state)}
  missing, extra = sorted(set(leaves) - set(wanted)), sorted(set(wanted) - set(leaves))
  if missing or extra:
    raise CheckpointIntegrityError(f"{step_dir}: the checkpoint's tensors differ from the model's: saved only "
                                   f"{missing[:5]}, requested only {extra[:5]}")
  for path, leaf in wanted.items():
    shape, dtype = saved.get(path, (None, None))
    if shape is not None and tuple(shape) != tuple(leaf.shape):
      raise CheckpointIntegrityError(f"{step_dir}: tensor {path} was saved with shape {tuple(shape)}, the model asks "
                                     f"for {tuple(leaf.shape)}")
    if dtype is not None and np.dtype(dtype) != np.dtype(leaf.dtype) and not allow_dtype_change:
      raise CheckpointIntegrityError(f"{step_dir}: tensor {path} was saved as {np.dtype(dtype).name}, the model asks "
                                     f"for {np.dtype(leaf.dtype).name} (checkpoint.allow_dtype_change=True converts)")


def meta_shapes(step_dir: str) -> dict[str, tuple[tuple[int, ...], str]]:
  """path -> (shape, dtype) from Orbax's own metadata of the saved state (no array is read)."""
  try:
    tree = ocp.StandardCheckpointer().metadata(os.path.join(step_dir, "state"))
    tree = getattr(tree, "item_metadata", tree)
    tree = getattr(tree, "tree", tree)
  except Exception as e:
    raise CheckpointIntegrityError(f"{step_dir}/state/_METADATA: cannot be read ({type(e).__name__}: {_short(e)})") from e
  out = {}
  for path, leaf in merkle.host_leaves(tree):
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
      out[path] = (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
  return out


def check_leaves(expected: dict[str, str], actual: dict[str, str], step_dir: str) -> None:
  bad = [path for path in expected if actual.get(path) != expected[path]]
  if bad:
    details = "; ".join(f"tensor {p} (files {', '.join(os.path.relpath(f, step_dir) for f in tensor_files(step_dir, p)[:3])}): "
                        f"expected {expected[p]}, got {actual.get(p)}" for p in bad[:3])
    raise CheckpointIntegrityError(f"{step_dir}: {len(bad)} tensor(s) do not match their recorded hash: {details}")
