"""Content hashes of array trees: one block-hashed sha256 per tensor, a Merkle root over them, proofs.

The format (docs/checkpoints.md, "Hash format", is the normative copy; a third party needs only numpy and hashlib):

  path      "/".join of the tree keys: dict keys and attribute names as text, sequence indices in
            decimal, e.g. "layers/attention/q" or "1/0/mu/embedding".
  blocks    the array's little-endian C-order bytes cut into consecutive BLOCK_BYTES = 1 MiB (2**20)
            pieces; the last may be shorter; an array of zero bytes has no block
  leaf      sha256(b"codex.leaf.v2\\n" + path + b"\\n" + dtype name + b"\\n" + shape as decimal
            numbers joined by "," ("" for a scalar) + b"\\n" + BLOCK_BYTES in decimal + b"\\n"
            + sha256(block_0) + sha256(block_1) + ...)   (raw 32-byte digests, concatenated)
  order     leaves sorted by the UTF-8 bytes of their path
  node      sha256(b"\\x01" + left + right); an odd last node moves up a level unchanged
  top       the single node left; one leaf is its own top; no leaf: no top (b"")
  root      sha256(b"codex.root.v2\\n" + number of leaves in decimal + b"\\n" + top), so a root commits
            to its leaf count and a proof cannot claim another

Blocks make the hash independent of sharding: a tensor spread over processes is re-laid on device as
[device, blocks, BLOCK_BYTES] rows (`sharded_leaf_hash`), each process hashes the whole blocks it then
holds, and only the 32-byte digests cross between processes; no host ever holds the whole tensor.
"""

from __future__ import annotations

import functools
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

BLOCK_BYTES = 1 << 20
_LEAF_TAG = b"codex.leaf.v2\n"
_NODE_TAG = b"\x01"
_ROOT_TAG = b"codex.root.v2\n"


def key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def leaf_path(keys) -> str:
  return "/".join(key_name(k) for k in keys)


def host_leaves(tree: Any) -> list[tuple[str, Any]]:
  """(path, leaf) in canonical order; leaves stay as they are (jax or numpy arrays)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return sorted(((leaf_path(keys), leaf) for keys, leaf in flat), key=lambda pl: pl[0].encode("utf-8"))


# --- leaves ------------------------------------------------------------------------------------------

def le_bytes(array: np.ndarray) -> np.ndarray:
  """The array's little-endian C-order bytes, as a flat uint8 view (a copy only when the order differs)."""
  array = np.ascontiguousarray(array)  # Makes a scalar 1-d, which keeps its single element's bytes.
  if array.dtype.byteorder == ">":
    array = array.astype(array.dtype.newbyteorder("<"))
  return array.reshape(-1).view(np.uint8)


@functools.cache
def _pool() -> ThreadPoolExecutor:
  return ThreadPoolExecutor(max_workers=min(os.cpu_count() or 1, 16), thread_name_prefix="codex-hash")


def _digests(pieces: list) -> list[bytes]:
  """sha256 of each buffer; hashlib releases the GIL on large buffers, so blocks hash on every core."""
  if len(pieces) < 4:
    return [hashlib.sha256(p).digest() for p in pieces]
  return list(_pool().map(lambda p: hashlib.sha256(p).digest(), pieces))


def block_digests(data: np.ndarray) -> list[bytes]:
  """sha256 of each BLOCK_BYTES piece of flat uint8 `data` (the last may be shorter)."""
  view = memoryview(data)
  return _digests([view[i:i + BLOCK_BYTES] for i in range(0, len(view), BLOCK_BYTES)])


def dtype_of(name: str) -> np.dtype:
  """A dtype from its name as leaves record it (numpy's, bfloat16 and the other ml_dtypes included)."""
  return np.dtype(jnp.dtype(name))


def leaf_from_digests(path: str, dtype, shape, digests) -> str:
  h = hashlib.sha256(_LEAF_TAG)
  h.update(path.encode("utf-8") + b"\n")
  h.update(np.dtype(dtype).name.encode() + b"\n")
  h.update(",".join(str(d) for d in shape).encode() + b"\n")
  h.update(str(BLOCK_BYTES).encode() + b"\n")
  for digest in digests:
    h.update(digest)
  return h.hexdigest()


def leaf_hash(path: str, array: np.ndarray) -> str:
  """The leaf hash of an array this host holds whole."""
  array = np.asarray(array)
  return leaf_from_digests(path, array.dtype, array.shape, block_digests(le_bytes(array)))


def is_distributed(leaf) -> bool:
  return isinstance(leaf, jax.Array) and not leaf.is_fully_addressable


def array_leaf_hash(path: str, leaf) -> str:
  """Any leaf: distributed arrays block-wise across processes, the rest from this host's copy."""
  if is_distributed(leaf):
    return sharded_leaf_hash(path, leaf)
  return leaf_hash(path, np.asarray(jax.device_get(leaf)))


def tree_leaf_hashes(tree: Any) -> dict[str, str]:
  """path -> leaf hash for every leaf, in canonical order (dicts keep insertion order)."""
  return {path: array_leaf_hash(path, leaf) for path, leaf in host_leaves(tree)}


# --- a tensor spread over processes --------------------------------------------------------------------

def sharded_leaf_hash(path: str, leaf: jax.Array) -> str:
  """The same leaf hash as `leaf_hash(path, np.asarray(leaf))`, without any host holding the tensor.

  On device the tensor is re-laid as [device, blocks, block elements] rows, one per device of its
  mesh (an all-to-all, plus one block-sized shift between neighbours); every process hashes the
  blocks its devices hold and the digests are exchanged. Tensors of at most one block are fetched whole.
  """
  dtype, shape = np.dtype(leaf.dtype), tuple(leaf.shape)
  nbytes = leaf.size * dtype.itemsize
  if nbytes <= BLOCK_BYTES:
    return leaf_hash(path, _fetch(leaf))
  if BLOCK_BYTES % dtype.itemsize:
    raise ValueError(f"{path}: {dtype.name} elements do not tile a {BLOCK_BYTES}-byte block")
  leaf, mesh = _auto_mesh(leaf)
  n, cols = mesh.size, BLOCK_BYTES // dtype.itemsize
  n_blocks = -(-leaf.size // cols)
  if leaf.size % n == 0 and leaf.size // n >= cols:  # Each device's chunk of the flat tensor.
    chunk = leaf.size // n
    first = [-(-d * chunk // cols) for d in range(n)]
  else:  # Small or oddly sized: rows of the padded flat tensor (XLA may gather it on device to pad).
    chunk = -(-n_blocks // n) * cols
    first = [d * chunk // cols for d in range(n)]
  ends = [min(n_blocks, f) for f in first[1:]] + [n_blocks]
  rows = max(1, max(e - f for f, e in zip(first, ends, strict=True)))
  offsets = tuple(f * cols - d * chunk for d, f in enumerate(first))
  blocks = _blocker(leaf.shape, dtype, chunk, rows, offsets, NamedSharding(mesh, PartitionSpec(mesh.axis_names)))(leaf)

  local = np.zeros((n_blocks, 33), np.uint8)  # 32 digest bytes and a count of holders per block.
  for shard in blocks.addressable_shards:
    d = shard.index[0].start or 0
    if shard.replica_id or first[d] >= ends[d]:
      continue
    data = le_bytes(np.asarray(shard.data))
    view = memoryview(data)
    pieces = [view[j * BLOCK_BYTES:j * BLOCK_BYTES + min(BLOCK_BYTES, nbytes - b * BLOCK_BYTES)]
              for j, b in enumerate(range(first[d], ends[d]))]
    local[first[d]:ends[d], :32] = np.frombuffer(b"".join(_digests(pieces)), np.uint8).reshape(-1, 32)
    local[first[d]:ends[d], 32] = 1
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    every = np.asarray(multihost_utils.process_allgather(local))
    holders, digests = every[..., 32].sum(0), np.bitwise_or.reduce(every[..., :32], axis=0)
  else:
    holders, digests = local[:, 32], local[:, :32]
  if not np.all(holders == 1):
    raise RuntimeError(f"{path}: blocks {np.flatnonzero(holders != 1)[:5].tolist()} are held by "
                       f"{holders[holders != 1][:5].tolist()} processes, not one")
  return leaf_from_digests(path, dtype, shape, [bytes(row) for row in digests])


def _fetch(leaf: jax.Array) -> np.ndarray:
  if leaf.is_fully_addressable:
    return np.asarray(leaf)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))


def _auto_mesh(leaf: jax.Array) -> tuple[jax.Array, Mesh]:
  """The leaf on a mesh whose axes are all Auto (so XLA may reshape across shards), and that mesh."""
  sharding = leaf.sharding
  if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh):
    mesh = sharding.mesh
    if any(t != AxisType.Auto for t in mesh.axis_types):
      mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
      leaf = jax.device_put(leaf, NamedSharding(mesh, sharding.spec))
    return leaf, mesh
  devices = sorted(sharding.device_set, key=lambda d: d.id)
  return leaf, Mesh(np.asarray(devices), ("blocks",), axis_types=(AxisType.Auto,))


@functools.lru_cache(maxsize=256)
def _blocker(shape, dtype, chunk: int, rows: int, offsets: tuple[int, ...], out: NamedSharding):
  """jit: tensor -> [n, rows, cols]; device d's row j is global block first[d] + j (offsets[d] = its
  start in elements relative to d * chunk). Cached so a later save of the same state compiles nothing."""
  n, cols = len(offsets), BLOCK_BYTES // np.dtype(dtype).itemsize
  size = int(np.prod(shape, dtype=np.int64))
  flat_out = NamedSharding(out.mesh, PartitionSpec(out.spec[0], None))

  def to_blocks(x):
    x = x.reshape(-1)
    if size < n * chunk:
      x = jnp.pad(x, (0, n * chunk - size))
    x = jax.lax.with_sharding_constraint(x.reshape(n, chunk), flat_out)
    if not any(offsets) and chunk == rows * cols:  # Blocks already start at every device's first element.
      return x.reshape(n, rows, cols)
    head = x[:, :cols]
    after = jnp.roll(head, -1, axis=0)  # Device d + 1's first elements, for the block that crosses into it.
    tail = max(0, max(offsets) + rows * cols - chunk - cols)  # So no slice below runs past the end.
    x = jnp.concatenate([x, after, jnp.zeros((n, tail), x.dtype)], axis=1)
    x = jax.vmap(lambda row, at: jax.lax.dynamic_slice(row, (at,), (rows * cols,)))(x, jnp.asarray(offsets))
    return x.reshape(n, rows, cols)
  return jax.jit(to_blocks, out_shardings=out)


# --- roots and proofs ------------------------------------------------------------------------------

def _parent(left: str, right: str) -> str:
  return hashlib.sha256(_NODE_TAG + bytes.fromhex(left) + bytes.fromhex(right)).hexdigest()


def root(hashes: list[str]) -> str:
  """The Merkle root of leaf hashes already in canonical order."""
  level = list(hashes)
  while len(level) > 1:
    level = [_parent(level[i], level[i + 1]) if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)]
  return _sealed(len(hashes), level[0] if level else None)


def _sealed(count: int, top: str | None) -> str:
  return hashlib.sha256(_ROOT_TAG + str(count).encode() + b"\n" + (bytes.fromhex(top) if top else b"")).hexdigest()


EMPTY_ROOT = root([])


def proof(hashes: list[str], index: int) -> list[str]:
  """The sibling hashes from leaf `index` up to the root; which side each is on follows from index and count."""
  if not 0 <= index < len(hashes):
    raise IndexError(f"leaf {index} of {len(hashes)}")
  siblings, level = [], list(hashes)
  while len(level) > 1:
    if index ^ 1 < len(level):
      siblings.append(level[index ^ 1])
    level = [_parent(level[i], level[i + 1]) if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)]
    index //= 2
  return siblings


def root_from_proof(leaf: str, index: int, count: int, siblings: list[str]) -> str:
  """The root that leaf `index` of `count` and its siblings give; ValueError when their number does not fit."""
  if not 0 <= index < count:
    raise ValueError(f"leaf index {index} is not in a tree of {count} leaves")
  node, rest, leaves = leaf, list(siblings), count
  while count > 1:
    if index ^ 1 < count:
      if not rest:
        raise ValueError("too few sibling hashes for that index and count")
      sibling = rest.pop(0)
      node = _parent(sibling, node) if index & 1 else _parent(node, sibling)
    index, count = index // 2, (count + 1) // 2
  if rest:
    raise ValueError(f"{len(rest)} sibling hash(es) more than that index and count have")
  return _sealed(leaves, node)
