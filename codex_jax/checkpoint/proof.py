"""`codex lineage prove` / `verify --proof`: one tensor's place in its checkpoint's root, checkable without it.

A proof (version 2) carries what its leaf hash is made of (the tensor's group and path, dtype, shape, leaf
format, block size and block digests), its index among `count` leaves, the root's name and value, and the
sibling hashes. Verification recomputes the leaf from those fields, so a proof relabelled to another tensor,
moved to another index or presenting an inner node as a leaf gives another root. Against a trusted root
(--root) that is a proof; without one only the proof's own consistency is checked, and it says so.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import tensorstore as ts

from codex_jax.checkpoint import merkle
from codex_jax.checkpoint.errors import CheckpointIntegrityError
from codex_jax.checkpoint.manager import STATE_GROUPS, load_meta

VERSION = 2
LEAF_FORMAT = "codex.leaf.v2"  # merkle.py's leaf tag.
ROOT_OF_GROUP = {"params": "content_root", "opt_state": "optimizer_root"}


def prove(step_dir: str, tensor: str) -> dict[str, Any]:
  """A Merkle inclusion proof of one tensor (e.g. "params/layers/attention/q") in its checkpoint's root."""
  step_dir = os.path.abspath(step_dir)
  meta, record = load_meta(step_dir)
  leaves = meta["leaves"]
  group, _, leaf_path = tensor.partition("/")
  if group not in STATE_GROUPS or tensor not in leaves:
    names = [p for p in leaves if p.split("/", 1)[0] in STATE_GROUPS]
    raise CheckpointIntegrityError(f"{step_dir}: no tensor {tensor!r}; e.g. {', '.join(names[:4])}")
  array = _read_tensor(step_dir, tensor)
  digests = merkle.block_digests(merkle.le_bytes(array))
  leaf = merkle.leaf_from_digests(leaf_path, array.dtype, array.shape, digests)
  if leaf != leaves[tensor]:
    raise CheckpointIntegrityError(f"{step_dir}: tensor {tensor} hashes to {leaf}, its record says {leaves[tensor]}")
  members = sorted((p for p in leaves if p.split("/", 1)[0] == group), key=lambda p: p.encode("utf-8"))
  index = members.index(tensor)
  return {"version": VERSION, "step": record["step"], "lineage_hash": record["lineage_hash"], "tensor": tensor,
          "leaf_path": leaf_path, "leaf_format": LEAF_FORMAT, "dtype": np.dtype(array.dtype).name,
          "shape": list(array.shape), "block_bytes": merkle.BLOCK_BYTES, "block_digests": [d.hex() for d in digests],
          "leaf_hash": leaf, "index": index, "count": len(members), "root_name": ROOT_OF_GROUP[group],
          "root": record[ROOT_OF_GROUP[group]], "siblings": merkle.proof([leaves[p] for p in members], index)}


def _read_tensor(step_dir: str, tensor: str) -> np.ndarray:
  """One stored tensor, read from its zarr folder alone (the rest of the checkpoint is never read)."""
  folder = os.path.join(step_dir, "state", tensor.replace("/", "."))
  try:
    return np.asarray(ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": folder}}).result().read().result())
  except Exception as e:
    raise CheckpointIntegrityError(f"{folder}: tensor {tensor} cannot be read ({' '.join(str(e).split())[:300]})") from e


def verify_proof(proof: dict[str, Any], root: str | None = None, *, untrusted_root_ok: bool = False) -> dict[str, Any]:
  """Recomputes the leaf from the proof's fields and folds it with the siblings up to the root, which must equal
  `root` (trusted); with no `root`, the proof's own, and then only with `untrusted_root_ok`."""
  where = f"proof of {proof.get('tensor')!r}"
  try:
    leaf = _leaf_of(proof, where)
    got = merkle.root_from_proof(leaf, int(proof["index"]), int(proof["count"]), list(proof["siblings"]))
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointIntegrityError(f"{where}: malformed ({type(e).__name__}: {e})") from None
  want = root or proof["root"]
  if got != want:
    raise CheckpointIntegrityError(f"{where}: its tensor fields and siblings give {proof['root_name']} {got}, "
                                   f"expected {want}{'' if root else ' (the root the proof states)'}")
  if not root and not untrusted_root_ok:
    raise CheckpointIntegrityError(
        f"{where}: consistent with the root it states ({got}), but that root is not trusted: pass the checkpoint's "
        f"{proof['root_name']} from a source you trust as --root=HEX (or --untrusted_root_ok to accept a check of the "
        "proof's internal consistency alone)")
  return {"ok": True, "tensor": proof["tensor"], "root_name": proof["root_name"], "root": got,
          "step": proof.get("step"), "trusted_root": bool(root)}


def _leaf_of(proof: dict[str, Any], where: str) -> str:
  """The leaf hash recomputed from the proof's description of the tensor, each field checked against the others."""
  if proof.get("version") != VERSION:
    raise CheckpointIntegrityError(f"{where}: version {proof.get('version')!r}; this codex-jax checks version {VERSION}")
  if proof["leaf_format"] != LEAF_FORMAT or int(proof["block_bytes"]) != merkle.BLOCK_BYTES:
    raise CheckpointIntegrityError(f"{where}: leaf format {proof['leaf_format']!r} over {proof['block_bytes']}-byte "
                                   f"blocks; expected {LEAF_FORMAT!r} over {merkle.BLOCK_BYTES}")
  group = proof["tensor"].split("/", 1)[0]
  if proof["tensor"] != f"{group}/{proof['leaf_path']}" or ROOT_OF_GROUP.get(group) != proof["root_name"]:
    raise CheckpointIntegrityError(f"{where}: its tensor, leaf path {proof['leaf_path']!r} and root name "
                                   f"{proof['root_name']!r} disagree (params/... is in content_root, opt_state/... in "
                                   "optimizer_root)")
  shape = [int(d) for d in proof["shape"]]
  blocks = math.ceil(math.prod(shape) * np.dtype(merkle.dtype_of(proof["dtype"])).itemsize / merkle.BLOCK_BYTES)
  digests = [bytes.fromhex(d) for d in proof["block_digests"]]
  if len(digests) != blocks or any(len(d) != 32 for d in digests):
    raise CheckpointIntegrityError(f"{where}: {len(digests)} block digest(s); a {proof['dtype']}{shape} tensor has "
                                   f"{blocks} of 32 bytes")
  leaf = merkle.leaf_from_digests(proof["leaf_path"], merkle.dtype_of(proof["dtype"]), shape, digests)
  if leaf != proof["leaf_hash"]:
    raise CheckpointIntegrityError(f"{where}: its tensor fields hash to leaf {leaf}, it states {proof['leaf_hash']}")
  return leaf
