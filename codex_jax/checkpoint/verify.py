"""`codex lineage verify`: a run's chain and its checkpoints, from the bytes on disk.

Verification needs no model and no config: each checkpoint's files are checked against its files.json, its
arrays read back with Orbax and hashed again, the checkpoints' own records must link one to the next, and
lineage.jsonl must hold them all in a chain back to the run's start; the first broken link is named.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from codex_jax.checkpoint import lineage
from codex_jax.checkpoint.errors import CheckpointIntegrityError
from codex_jax.checkpoint.files import check_files
from codex_jax.checkpoint.manager import (
  AVERAGED_DIR,
  check_leaves,
  iterator_hash,
  load_meta,
  state_leaf_hashes,
)
from codex_jax.config.workdir import config_path
from codex_jax.hashing import sha256_file


def verify_checkpoint(step_dir: str) -> dict[str, Any]:
  """Re-hashes every file (files.json), stored tensor and the iterator state; returns the verified lineage record."""
  step_dir = os.path.abspath(step_dir)
  check_files(step_dir)  # Names the exact file first; then tensors and records.
  meta, record = load_meta(step_dir)
  try:
    state = read_state(os.path.join(step_dir, "state"))
  except Exception as e:
    raise CheckpointIntegrityError(f"{step_dir}/state: cannot be read ({type(e).__name__}: "
                                   f"{' '.join(str(e).split())[:300]})") from e
  check_leaves(meta["leaves"], state_leaf_hashes(state), step_dir)
  if record.get("kind") == "average":  # Parameters only: no optimizer, no data iterator.
    return record
  data_files = sorted(f for f in os.listdir(os.path.join(step_dir, "data")) if f.endswith(".json"))
  for name in data_files[:1]:  # Process 0's iterator state; the record hashes that one.
    path = os.path.join(step_dir, "data", name)
    try:
      with open(path) as f:
        got = iterator_hash(json.load(f))
    except (OSError, ValueError) as e:
      raise CheckpointIntegrityError(f"{path}: cannot be read ({e})") from e
    if got != record["iterator_hash"]:
      raise CheckpointIntegrityError(f"{path}: the iterator state hashes to {got}, the record says "
                                     f"{record['iterator_hash']}")
  return record


def read_state(state_dir: str):
  """The stored arrays, each on this host's first device: a checkpoint saved by many processes (other
  device ids, other hosts) reads back on one machine, where its saved shardings would not resolve."""
  tree = ocp.StandardCheckpointHandler().metadata(pathlib.Path(state_dir))  # The item's own _METADATA only.
  tree = getattr(getattr(tree, "item_metadata", tree), "tree", tree)
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  as_stored = lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here) if hasattr(m, "dtype") else m
  return ocp.StandardCheckpointer().restore(state_dir, jax.tree.map(as_stored, tree))


def verify(path: str) -> dict[str, Any]:
  """Verifies a workdir or one step directory: every retained checkpoint's files, tensors and record; the chain
  their own records form (each links to the checkpoint saved before it); then lineage.jsonl against them."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    workdir, only = path, None
  elif os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA")):
    workdir, only = os.path.dirname(os.path.dirname(path)), path
  else:
    raise CheckpointIntegrityError(f"{path}: neither a workdir (with checkpoints/) nor a checkpoint step directory")
  dirs = [only] if only else [d for folder in ("checkpoints", AVERAGED_DIR) for d in _step_dirs(workdir, folder)]
  records = {step_dir: verify_checkpoint(step_dir) for step_dir in dirs}
  chain = [r for d, r in records.items() if os.path.basename(os.path.dirname(d)) != AVERAGED_DIR]
  if only is None:
    lineage.verify_links(chain, os.path.join(workdir, "checkpoints"))
  log_path = os.path.join(workdir, lineage.LOG_FILE)
  log = lineage.read_log(workdir)
  if not log and chain:
    raise CheckpointIntegrityError(
        f"{log_path}: missing or empty. The checkpoints' own records link from step {chain[0]['step']} to "
        f"{chain[-1]['step']}, but the records before step {chain[0]['step']} and the run's start can only be "
        "checked with the log")
  by_hash = {r["lineage_hash"]: r for r in lineage.verify_chain(log, log_path)} if log else {}
  for step_dir, record in records.items():
    if by_hash.get(record["lineage_hash"]) != record:
      raise CheckpointIntegrityError(f"{step_dir}: its lineage record is not in the run's chain ({log_path})")
  for record in (by_hash or {r["lineage_hash"]: r for r in records.values()}).values():
    _check_config(workdir, record)
  checked = [{"step": r["step"], "lineage_hash": r["lineage_hash"], "content_root": r["content_root"],
              **({"parents": r["parents"]} if "parents" in r else {})} for r in records.values()]
  return {"ok": True, "workdir": workdir, "chain_length": len(by_hash), "checkpoints": checked,
          "files_checked": len(checked), "head": checked[-1]["lineage_hash"] if checked else None}


def _check_config(workdir: str, record: dict[str, Any]) -> None:
  """The config a record names by hash is kept (configs/<hash>.json) and still hashes to it."""
  if "config_hash" not in record:
    return
  path = config_path(workdir, record["config_hash"])
  try:
    got = sha256_file(path)
  except OSError as e:
    raise CheckpointIntegrityError(f"{path}: the config step {record['step']} ran under cannot be read ({e.strerror}); "
                                   "its config hash cannot be re-derived") from None
  if got != record["config_hash"]:
    raise CheckpointIntegrityError(f"{path}: hashes to {got}, not to its name: the config was edited")


def _step_dirs(workdir: str, folder: str) -> list[str]:
  root = os.path.join(workdir, folder)
  names = os.listdir(root) if os.path.isdir(root) else []
  return sorted((os.path.join(root, d) for d in names if d.isdigit()), key=lambda d: int(os.path.basename(d)))
