"""Tensor hashes (format v2): re-derived from docs/checkpoints.md with numpy and hashlib alone, the same however a
tensor is sharded (over two real processes too), and changed by one flipped byte in exactly its leaf and block."""

import hashlib
import json
import os
import socket
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from codex_jax.checkpoint import manager, merkle
from codex_jax.checkpoint.errors import CheckpointIntegrityError
from tests.helpers import ROOT
from tests.xla_flags import xla_flags

BLOCK = 1048576


# --- docs/checkpoints.md's "Hash format", written out independently of codex_jax ---------------------------------

def spec_leaf(path: str, array) -> str:
  array = np.asarray(array)
  data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
  digests = b"".join(hashlib.sha256(data[i:i + BLOCK]).digest() for i in range(0, len(data), BLOCK))
  header = (b"codex.leaf.v2\n" + path.encode() + b"\n" + array.dtype.name.encode() + b"\n"
            + ",".join(map(str, array.shape)).encode() + b"\n" + b"1048576\n")
  return hashlib.sha256(header + digests).hexdigest()


def spec_root(hashes: list[str]) -> str:
  level = [bytes.fromhex(h) for h in hashes]
  while len(level) > 1:
    nxt = [hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
    level = nxt + ([level[-1]] if len(level) % 2 else [])
  return hashlib.sha256(b"codex.root.v2\n" + str(len(hashes)).encode() + b"\n" + b"".join(level)).hexdigest()


def _arrays() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {
      "big/f32": rng.normal(size=(3, BLOCK // 4 + 5)).astype(np.float32),  # 3 MiB + 60 bytes: a short last block.
      "big/bf16": rng.normal(size=(1000, 1500)).astype(ml_dtypes.bfloat16),  # 2.86 MiB.
      "exact": rng.normal(size=(2, BLOCK // 4)).astype(np.float32),  # Exactly two blocks.
      "small/bf16": rng.normal(size=(3, 4)).astype(ml_dtypes.bfloat16),
      "small/f32": rng.normal(size=(3, 4)).astype(np.float32),
      "a": np.arange(5, dtype=np.int32),
      "mask": np.array([True, False, True]),
      "scalar": np.float32(2.5),
      "empty": np.zeros((2, 0, 3), np.float32),
  }


def test_leaves_and_root_match_a_third_party_reading_of_build_md():
  arrays = _arrays()
  for path, array in arrays.items():
    assert merkle.leaf_hash(path, array) == spec_leaf(path, array), path
  empty_header = b"codex.leaf.v2\nempty\nfloat32\n2,0,3\n1048576\n"  # No block, no digest.
  assert merkle.leaf_hash("empty", arrays["empty"]) == hashlib.sha256(empty_header).hexdigest()
  assert len(merkle.block_digests(merkle.le_bytes(arrays["big/f32"]))) == 4
  big_endian = arrays["big/f32"].astype(">f4")
  assert merkle.leaf_hash("big/f32", big_endian) == merkle.leaf_hash("big/f32", arrays["big/f32"])
  assert merkle.leaf_hash("a", arrays["a"]) != merkle.leaf_hash("a", arrays["a"].astype(np.int64))
  assert merkle.leaf_hash("a", arrays["a"]) != merkle.leaf_hash("a", arrays["a"].reshape(5, 1))
  assert merkle.leaf_hash("a", arrays["a"]) != merkle.leaf_hash("b", arrays["a"])

  hashes = merkle.tree_leaf_hashes(arrays)
  assert list(hashes) == sorted(arrays, key=str.encode)  # Canonical order: by path bytes.
  assert merkle.root(list(hashes.values())) == spec_root([spec_leaf(p, arrays[p]) for p in sorted(arrays)])


def test_a_known_leaf_hash_pins_the_format():
  # Changes only with the format itself (then bump the "codex.leaf.vN" tag, update docs/checkpoints.md and
  # print merkle.leaf_hash("w", np.arange(6, dtype=np.float32).reshape(2, 3)) to renew this value).
  assert merkle.leaf_hash("w", np.arange(6, dtype=np.float32).reshape(2, 3)) == (
      "e5711ede8cf941e1b2d30ba906502eaa646384c49f72520ff0d6e689d5c8abc9")
  # The root format likewise ("codex.root.vN"); renew with merkle.root([leaf]) and merkle.root([leaf] * 3).
  leaf = "e5711ede8cf941e1b2d30ba906502eaa646384c49f72520ff0d6e689d5c8abc9"
  assert merkle.root([leaf]) == "7e7421f0d4a495742e982cba2f79672c17b35ed60d1cccb25b4e44af53c67d10"
  assert merkle.root([leaf] * 3) == "b00a277b9f6a753e4f1f0013075252925dd35290f8dd5f733857b6b03560cec5"


def test_roots_and_proofs_match_the_spec():
  for n in range(0, 10):
    leaves = [hashlib.sha256(bytes([i])).hexdigest() for i in range(n)]
    assert merkle.root(leaves) == spec_root(leaves)
    for i in range(n):
      siblings = merkle.proof(leaves, i)
      assert merkle.root_from_proof(leaves[i], i, n, siblings) == merkle.root(leaves)
      if n > 1:
        assert merkle.root_from_proof(leaves[(i + 1) % n], i, n, siblings) != merkle.root(leaves)
        claims = [(j, c) for j in range(n + 2) for c in range(j + 1, n + 3) if (j, c) != (i, n)]
        for j, c in claims:  # Another index or count: never the same root (the root commits to its count).
          try:
            assert merkle.root_from_proof(leaves[i], j, c, siblings) != merkle.root(leaves)
          except ValueError:
            pass


# --- the distributed path, forced on the fake 8-device mesh -----------------------------------------

def _mesh(shape, names, types=AxisType.Auto):
  return jax.make_mesh(shape, names, axis_types=(types,) * len(names))


SHARDINGS = {
    "data": lambda: NamedSharding(_mesh((2, 4), ("data", "tensor")), P("data")),
    "tensor": lambda: NamedSharding(_mesh((2, 4), ("data", "tensor")), P(None, "tensor")),
    "replicated": lambda: NamedSharding(_mesh((2, 4), ("data", "tensor")), P()),
    "2x2x2": lambda: NamedSharding(_mesh((2, 2, 2), ("data", "tensor", "pipeline")), P("data", "tensor")),
    "2x2x2-swapped": lambda: NamedSharding(_mesh((2, 2, 2), ("data", "tensor", "pipeline")), P("tensor", "data")),
    "explicit": lambda: NamedSharding(_mesh((2, 4), ("data", "tensor"), AxisType.Explicit), P(None, "tensor")),
    "one-device": lambda: jax.sharding.SingleDeviceSharding(jax.devices()[5]),
}

SHAPES = {  # Each lays blocks out differently across 8 devices.
    "chunks-cross-blocks": ((16, 131080), np.float32),  # 8 MiB + 320 B: device chunks start mid-block.
    "chunks-are-blocks": ((16, 131072), np.float32),  # Exactly 8 blocks, one per device.
    "padded": ((8, 40000), np.float32),  # 2 blocks: fewer than the devices.
    "bf16": ((16, 262152), ml_dtypes.bfloat16),  # 8 MiB + 256 B of 2-byte elements, chunks mid-block.
    "one-block": ((4, 8), np.float32),  # Fetched whole.
    "empty": ((8, 0), np.float32),
}


@pytest.mark.parametrize("layout", sorted(SHARDINGS))
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_sharded_path_gives_the_host_hash_for_every_sharding(layout, shape):
  dims, dtype = SHAPES[shape]
  array = np.random.default_rng(1).normal(size=dims).astype(dtype)
  placed = jax.device_put(array, SHARDINGS[layout]())
  assert merkle.sharded_leaf_hash("p/w", placed) == merkle.leaf_hash("p/w", array) == spec_leaf("p/w", array)


def test_a_repeated_save_compiles_nothing_new():
  array = jax.device_put(np.ones((16, 131080), np.float32), SHARDINGS["data"]())
  merkle.sharded_leaf_hash("w", array)
  before = merkle._blocker.cache_info().misses
  merkle.sharded_leaf_hash("w", array + 1)
  assert merkle._blocker.cache_info().misses == before


def test_the_state_hashes_and_the_non_finite_refusal_are_the_same_on_the_distributed_path(monkeypatch):
  sharding = SHARDINGS["tensor"]()
  state = {"params": {"w": jax.device_put(np.ones((16, 131080), np.float32), sharding),
                      "b": jax.device_put(np.zeros((8,), ml_dtypes.bfloat16), NamedSharding(sharding.mesh, P()))},
           "step": np.int32(3)}
  host = manager.state_leaf_hashes(state, refuse_non_finite_at=3)
  monkeypatch.setattr(merkle, "is_distributed", lambda leaf: isinstance(leaf, jax.Array))
  assert manager.state_leaf_hashes(state, refuse_non_finite_at=3) == host
  bad = {**state, "params": {**state["params"], "b": state["params"]["b"].at[3].set(np.nan)}}
  with pytest.raises(CheckpointIntegrityError, match="step 3: tensor params/b holds NaN"):
    manager.state_leaf_hashes(bad, refuse_non_finite_at=3)


# --- one flipped byte -------------------------------------------------------------------------------

def test_a_flipped_byte_changes_exactly_its_leaf_and_its_block():
  arrays = _arrays()
  flipped = {**arrays, "big/f32": arrays["big/f32"].copy()}
  flipped["big/f32"].view(np.uint8).reshape(-1)[2 * BLOCK + 12345] ^= 0x04  # Inside block 2 of 4.
  before, after = merkle.tree_leaf_hashes(arrays), merkle.tree_leaf_hashes(flipped)
  assert [p for p in before if before[p] != after[p]] == ["big/f32"]
  blocks = [merkle.block_digests(merkle.le_bytes(t["big/f32"])) for t in (arrays, flipped)]
  assert [i for i, (a, b) in enumerate(zip(*blocks, strict=True)) if a != b] == [2]
  assert merkle.root(list(before.values())) != merkle.root(list(after.values()))

  sharding = SHARDINGS["tensor"]()  # The distributed path sees the same single change.
  big = {name: jax.device_put(t["big/f32"][:, :BLOCK // 4], sharding) for name, t in
         (("before", arrays), ("after", flipped))}  # 3 whole blocks, the flipped byte in the last.
  got = {name: merkle.sharded_leaf_hash("big/f32", a) for name, a in big.items()}
  want = {name: merkle.leaf_hash("big/f32", np.asarray(a)) for name, a in big.items()}
  assert got == want and got["before"] != got["after"]


# --- two real processes: tensors no host holds whole ------------------------------------------------

_WORKER = """
import os, sys
os.environ["XLA_FLAGS"] = sys.argv[3]
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[1]))
import json, ml_dtypes, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from codex_jax.checkpoint import manager, merkle
mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
rng, got = np.random.default_rng(0), []
for dims, dtype in [((16, 131080), np.float32), ((8, 40000), np.float32), ((16, 262152), ml_dtypes.bfloat16),
                    ((4, 8), np.float32)]:
  full = rng.normal(size=dims).astype(dtype)
  for spec in [P("data"), P(None, "tensor"), P(), P("tensor", "data")]:
    array = jax.make_array_from_callback(dims, NamedSharding(mesh, spec), lambda index: full[index])
    assert not array.is_fully_addressable
    got.append([merkle.leaf_hash("w", full), manager.state_leaf_hashes({"params": {"w": array}}, 1)["params/w"]])
print(json.dumps(got))
"""


@pytest.mark.slow
def test_two_processes_hash_tensors_neither_holds_whole_to_the_host_hash():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = str(s.getsockname()[1])
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(i), port, xla_flags(4)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
  results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
  assert results[0] == results[1] and len(results[0]) == 16
  assert all(host == distributed for host, distributed in results[0])


def test_a_version_1_record_is_refused_by_name_not_reported_as_tampered():
  from codex_jax.checkpoint.errors import CheckpointIntegrityError
  from codex_jax.checkpoint.manager import check_meta
  with pytest.raises(CheckpointIntegrityError, match=r"ckpt/7/_CHECKPOINT_METADATA: lineage record version 1; "
                                                     r"this codex-jax reads version 3"):
    check_meta({}, "ckpt/7", {"version": 1, "step": 7})
