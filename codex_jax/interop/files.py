"""Reading and writing a Hugging Face model directory: config.json and (sharded) safetensors."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from codex_jax.interop.llama import InteropError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"  # HF tokenizers format, as a run pins it (data/tokenizer.py pinned_path).


def read_config(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, CONFIG)
  if not os.path.isfile(path):
    raise InteropError(f"{path}: missing; a Hugging Face model directory needs config.json")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise InteropError(f"{path}: cannot read it as JSON ({e})") from e


def weight_files(directory: str) -> list[str]:
  """The safetensors files of a model directory: model.safetensors, or the shards its index names."""
  single, index = os.path.join(directory, SINGLE), os.path.join(directory, INDEX)
  if os.path.isfile(index):
    try:
      with open(index) as f:
        names = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, json.JSONDecodeError, KeyError) as e:
      raise InteropError(f"{index}: cannot read its weight_map ({e})") from e
    missing = [n for n in names if not os.path.isfile(os.path.join(directory, n))]
    if missing:
      raise InteropError(f"{index}: names shard(s) {missing} that are not in {directory}")
    return [os.path.join(directory, n) for n in names]
  if os.path.isfile(single):
    return [single]
  found = sorted(n for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
  raise InteropError(f"{directory}: neither {SINGLE} nor {INDEX}" +
                     (f" (found {found}: only safetensors are read; convert them first)" if found else ""))


def tensor_shapes(files: list[str]) -> dict[str, tuple[int, ...]]:
  """Name -> shape of every tensor, from the headers only (nothing is loaded)."""
  from safetensors import safe_open
  shapes = {}
  for path in files:
    with safe_open(path, framework="numpy") as f:
      for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
        shapes[name] = tuple(f.get_slice(name).get_shape())
  return shapes


def read_tensors(files: list[str], dtype: str) -> dict[str, np.ndarray]:
  """Every tensor as a numpy array of `dtype` (bfloat16 included, via ml_dtypes)."""
  from safetensors import safe_open
  out = {}
  for path in files:
    with safe_open(path, framework="flax") as f:
      for name in f.keys():  # noqa: SIM118
        out[name] = np.asarray(f.get_tensor(name)).astype(np.dtype(dtype))
  return out


def write_tensors(tensors: dict[str, np.ndarray], directory: str, max_shard_bytes: int) -> list[str]:
  """model.safetensors, or model-0000i-of-0000n.safetensors + the index when over `max_shard_bytes`."""
  import jax.numpy as jnp
  from safetensors.flax import save_file

  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, array in tensors.items():
    if shards[-1] and size + array.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = array
    size += array.nbytes
  metadata = {"format": "pt"}  # transformers refuses a file without it.
  if len(shards) == 1:
    save_file({k: jnp.asarray(v) for k, v in shards[0].items()}, os.path.join(directory, SINGLE), metadata)
    return [SINGLE]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  for name, shard in zip(names, shards, strict=True):
    save_file({k: jnp.asarray(v) for k, v in shard.items()}, os.path.join(directory, name), metadata)
  index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
           "weight_map": {k: name for name, shard in zip(names, shards, strict=True) for k in shard}}
  write_json(os.path.join(directory, INDEX), index)
  return [*names, INDEX]


def write_json(path: str, value: Any) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")
