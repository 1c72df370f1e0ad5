"""Turns each process's numpy batches into one global, data-sharded jax.Array per model field."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding

from codex_jax.data.errors import DataError
from codex_jax.data.packing import MODEL_FIELDS, ROW_FEATURES


def check_batch(batch: dict, local_batch: int, seq_len: int, vocab_size: int, feature_dim: int) -> None:
  """Fails before the first step, naming the field, when a batch does not fit the model."""
  missing = sorted(set(ROW_FEATURES) - set(batch))
  if missing:
    raise DataError(f"batch is missing field(s) {missing}; expected {sorted(ROW_FEATURES)}")
  for name, dtype in ROW_FEATURES.items():
    array = np.asarray(batch[name])
    shape = (local_batch, seq_len, feature_dim) if name == "features" else (local_batch, seq_len)
    if array.shape != shape or array.dtype != dtype:
      raise DataError(f"batch[{name!r}] is {array.dtype}{list(array.shape)}; the model expects "
                      f"{np.dtype(dtype).name}{list(shape)} (micro-batches x train.global_batch / train.grad_accum "
                      f"/ processes, data.seq_len{', model.feature_dim' if name == 'features' else ''})")
  for name in ("inputs", "targets"):
    top = int(np.max(batch[name]))
    if top >= vocab_size or int(np.min(batch[name])) < 0:
      raise DataError(f"batch[{name!r}] holds token id {top}, outside model.vocab_size={vocab_size}")


def to_global(batch: dict, sharding: NamedSharding) -> dict[str, jax.Array]:
  """Each process contributes its rows; together they form the global batch sharded over `data`."""
  return {name: jax.make_array_from_process_local_data(sharding, np.asarray(batch[name])) for name in MODEL_FIELDS}


def interleave(batches: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """k host batches of g rows -> one of k * g rows whose micro-batch m (train/accumulate.py `split`) is batches[m]."""
  k = len(batches)
  if k == 1:
    return batches[0]
  return {name: np.stack([b[name] for b in batches], axis=1).reshape(-1, *np.shape(batches[0][name])[1:])
          for name in batches[0]}
