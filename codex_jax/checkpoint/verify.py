"""`codex lineage`: verify a run's chain and its checkpoints from the bytes on disk; prove one tensor.

Verification needs no model and no config: lineage.jsonl gives the chain, each checkpoint's stored
arrays are read back with Orbax and hashed again, and the first broken link is named.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from codex_jax.checkpoint import lineage, merkle
from codex_jax.checkpoint.errors import CheckpointIntegrityError
from codex_jax.checkpoint.manager import (
  AVERAGED_DIR,
  STATE_GROUPS,
  check_files,
  check_leaves,
  iterator_hash,
  load_meta,
  state_leaf_hashes,
)

ROOT_OF_GROUP = {"params": "content_root", "opt_state": "optimizer_root"}


def verify_checkpoint(step_dir: str) -> dict[str, Any]:
  """Re-hashes every stored tensor and the iterator state; returns the verified lineage record."""
  step_dir = os.path.abspath(step_dir)
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
  """Verifies a workdir (the whole chain and every checkpoint still on disk) or one step directory."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    workdir, only = path, None
  elif os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA")):
    workdir, only = os.path.dirname(os.path.dirname(path)), path
  else:
    raise CheckpointIntegrityError(f"{path}: neither a workdir (with checkpoints/) nor a checkpoint step directory")
  log = lineage.read_log(workdir)
  if not log and only is None and _step_dirs(workdir, "checkpoints"):
    raise CheckpointIntegrityError(f"{os.path.join(workdir, lineage.LOG_FILE)}: missing or empty, while checkpoints "
                                   "exist: the chain cannot be checked back to the run's start")
  files = {r["files_of"]: r["files"] for r in log if "files_of" in r}
  log = [r for r in log if "files_of" not in r]
  by_hash = {}
  if log:
    by_hash = {r["lineage_hash"]: r for r in lineage.verify_chain(log, os.path.join(workdir, lineage.LOG_FILE))}
  dirs = [only] if only else [d for folder in ("checkpoints", AVERAGED_DIR) for d in _step_dirs(workdir, folder)]
  checked = []
  for step_dir in dirs:
    average = os.path.basename(os.path.dirname(step_dir)) == AVERAGED_DIR
    recorded = [f for h, f in files.items() if by_hash.get(h, {}).get("step") == int(os.path.basename(step_dir))
                and ("parents" in by_hash[h]) == average]
    if recorded:
      check_files(recorded[-1], step_dir)  # Names the exact file first; then tensors and records below.
    record = verify_checkpoint(step_dir)
    if log and by_hash.get(record["lineage_hash"]) != record:
      raise CheckpointIntegrityError(f"{step_dir}: its lineage record is not in the run's chain "
                                     f"({os.path.join(workdir, lineage.LOG_FILE)})")
    checked.append({"step": record["step"], "lineage_hash": record["lineage_hash"],
                    "content_root": record["content_root"], **({"parents": record["parents"]} if average else {})})
  return {"ok": True, "workdir": workdir, "chain_length": len(by_hash), "checkpoints": checked,
          "files_checked": sum(1 for c in checked if c["lineage_hash"] in files),
          "head": checked[-1]["lineage_hash"] if checked else None}


def _step_dirs(workdir: str, folder: str) -> list[str]:
  root = os.path.join(workdir, folder)
  names = os.listdir(root) if os.path.isdir(root) else []
  return sorted((os.path.join(root, d) for d in names if d.isdigit()), key=lambda d: int(os.path.basename(d)))


def prove(step_dir: str, tensor: str) -> dict[str, Any]:
  """A Merkle inclusion proof of one tensor (e.g. "params/layers/attention/q") in its checkpoint's root."""
  step_dir = os.path.abspath(step_dir)
  meta, record = load_meta(step_dir)
  leaves = meta["leaves"]
  group = tensor.split("/", 1)[0]
  if group not in STATE_GROUPS or tensor not in leaves:
    names = [p for p in leaves if p.split("/", 1)[0] in STATE_GROUPS]
    raise CheckpointIntegrityError(f"{step_dir}: no tensor {tensor!r}; e.g. {', '.join(names[:4])}")
  members = sorted((p for p in leaves if p.split("/", 1)[0] == group), key=lambda p: p.encode("utf-8"))
  hashes = [leaves[p] for p in members]
  index = members.index(tensor)
  return {"version": 1, "step": record["step"], "lineage_hash": record["lineage_hash"], "tensor": tensor,
          "leaf_path": tensor.split("/", 1)[1], "leaf_hash": leaves[tensor], "index": index, "count": len(hashes),
          "root_name": ROOT_OF_GROUP[group], "root": record[ROOT_OF_GROUP[group]],
          "siblings": merkle.proof(hashes, index)}


def verify_proof(proof: dict[str, Any], root: str | None = None) -> dict[str, Any]:
  """Recomputes the root from the tensor's hash and its siblings; `root` (if given) must match too."""
  got = merkle.root_from_proof(proof["leaf_hash"], proof["siblings"])
  want = root or proof["root"]
  if got != want:
    raise CheckpointIntegrityError(f"proof for {proof.get('tensor')}: the leaf and siblings give root {got}, "
                                   f"expected {want}")
  return {"ok": True, "tensor": proof.get("tensor"), "root": got, "step": proof.get("step")}
