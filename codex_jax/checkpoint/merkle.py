"""Content hashes of array trees: one sha256 per tensor, a Merkle root over them, inclusion proofs.

The format (BUILD.md, "Hash format", is the normative copy; a third party needs only hashlib):

  path      "/".join of the tree keys: dict keys and attribute names as text, sequence indices in
            decimal, e.g. "layers/attention/q" or "1/0/mu/embedding".
  leaf      sha256(b"codex.leaf.v1\\n" + path + b"\\n" + dtype name + b"\\n" + shape as decimal
            numbers joined by "," ("" for a scalar) + b"\\n" + the array's little-endian C-order bytes)
  order     leaves sorted by the UTF-8 bytes of their path
  node      sha256(b"\\x01" + left + right); an odd last node moves up a level unchanged
  root      the single node left; one leaf is its own root; no leaf: sha256(b"codex.empty.v1")
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np

_LEAF_TAG = b"codex.leaf.v1\n"
_NODE_TAG = b"\x01"
EMPTY_ROOT = hashlib.sha256(b"codex.empty.v1").hexdigest()


def key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def leaf_path(keys) -> str:
  return "/".join(key_name(k) for k in keys)


def le_bytes(array: np.ndarray) -> bytes:
  """The array's bytes in little-endian C order (what the leaf hash covers)."""
  array = np.ascontiguousarray(array)
  if array.dtype.byteorder == ">":
    array = array.astype(array.dtype.newbyteorder("<"))
  return array.tobytes()


def leaf_hash(path: str, array: np.ndarray) -> str:
  array = np.asarray(array)
  h = hashlib.sha256(_LEAF_TAG)
  h.update(path.encode("utf-8") + b"\n")
  h.update(array.dtype.name.encode() + b"\n")
  h.update(",".join(str(d) for d in array.shape).encode() + b"\n")
  h.update(le_bytes(array))
  return h.hexdigest()


def host_leaves(tree: Any) -> list[tuple[str, Any]]:
  """(path, leaf) in canonical order; leaves stay as they are (jax or numpy arrays)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return sorted(((leaf_path(keys), leaf) for keys, leaf in flat), key=lambda pl: pl[0].encode("utf-8"))


def to_host(leaf) -> np.ndarray:
  """One tensor on this host. Single-process arrays are fully addressable; across processes each
  tensor (never the whole model) is gathered, one at a time."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
  return np.asarray(jax.device_get(leaf))


def tree_leaf_hashes(tree: Any) -> dict[str, str]:
  """path -> leaf hash for every leaf, in canonical order (dicts keep insertion order)."""
  return {path: leaf_hash(path, to_host(leaf)) for path, leaf in host_leaves(tree)}


def _parent(left: str, right: str) -> str:
  return hashlib.sha256(_NODE_TAG + bytes.fromhex(left) + bytes.fromhex(right)).hexdigest()


def root(hashes: list[str]) -> str:
  """The Merkle root of leaf hashes already in canonical order."""
  if not hashes:
    return EMPTY_ROOT
  level = list(hashes)
  while len(level) > 1:
    level = [_parent(level[i], level[i + 1]) if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)]
  return level[0]


def proof(hashes: list[str], index: int) -> list[dict[str, str]]:
  """Siblings from leaf `index` up to the root: [{"side": "left" | "right", "hash": hex}, ...]."""
  if not 0 <= index < len(hashes):
    raise IndexError(f"leaf {index} of {len(hashes)}")
  path, level = [], list(hashes)
  while len(level) > 1:
    sibling = index ^ 1
    if sibling < len(level):
      path.append({"side": "left" if sibling < index else "right", "hash": level[sibling]})
    level = [_parent(level[i], level[i + 1]) if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)]
    index //= 2
  return path


def root_from_proof(leaf: str, siblings: list[dict[str, str]]) -> str:
  node = leaf
  for step in siblings:
    node = _parent(step["hash"], node) if step["side"] == "left" else _parent(node, step["hash"])
  return node
