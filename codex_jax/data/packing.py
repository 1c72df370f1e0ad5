"""Cut examples into pieces of at most seq_len positions and first-fit pack them into fixed rows.

An example (data/encode.py) already pairs each position with its next-token target inside the same
record, so pieces never mix records and no target crosses into another. A record longer than
seq_len becomes several consecutive pieces; each is its own packed segment and its positions restart
at 0 (the continuation cannot attend to the earlier piece anyway, and RoPE sees only relative offsets).
"""

from __future__ import annotations

import dataclasses
import sys

import grain
import numpy as np

from codex_jax.data.encode import EXAMPLE_FEATURES

# The packed row format (L = seq_len, F = model.feature_dim); padding is all zeros (PAD token,
# segment 0, modality 0, source 0, mask 0).
ROW_FEATURES: dict[str, type] = {
    "inputs": np.int32,  # Token ids fed to the model (PAD at non-text positions).
    "targets": np.int32,  # The next token after each position, from the same record.
    "segment_ids": np.int32,  # 1, 2, 3... per packed piece in the row; 0 for padding.
    "positions": np.int32,  # Index within the piece, restarting at 0.
    "loss_mask": np.float32,  # 1.0 where the target is a real text token of the same record.
    "modality_ids": np.int32,  # records.MODALITY_IDS per position; 0 for padding.
    "source_ids": np.int32,  # 1-based index of the manifest source (accounting only; never on device).
    "features": np.float32,  # [B, L, F]: patch / audio / proprio / action values; zeros for text.
}
MODEL_FIELDS = tuple(name for name in ROW_FEATURES if name != "source_ids")  # What the step receives.


@dataclasses.dataclass(frozen=True)
class SplitExample(grain.experimental.FlatMapTransform):
  """One example (EXAMPLE_FEATURES) -> consecutive pieces of <= seq_len positions."""

  seq_len: int
  # Only MapDataset flat-maps use the fan-out bound; pieces are cut on an IterDataset.
  max_fan_out: int = sys.maxsize

  def flat_map(self, example: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    n = len(example["inputs"])
    return [{k: v[start:start + self.seq_len] for k, v in example.items()} for start in range(0, n, self.seq_len)]


def _to_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  segment_ids = packed["inputs_segment_ids"].astype(np.int32)
  row = {name: packed[name].astype(dtype) for name, dtype in EXAMPLE_FEATURES.items()}
  row["loss_mask"] = row["loss_mask"] * (segment_ids > 0)
  return {**row, "segment_ids": segment_ids, "positions": packed["inputs_positions"].astype(np.int32)}


def pack_rows(pieces: grain.IterDataset, *, seq_len: int, num_bins: int, seed: int) -> grain.IterDataset:
  """Pieces -> rows of exactly seq_len in the ROW_FEATURES format, via grain's first-fit packer."""
  packed = grain.experimental.FirstFitPackIterDataset(
      pieces,
      length_struct={name: seq_len for name in EXAMPLE_FEATURES},
      num_packing_bins=num_bins,
      seed=seed,
      # Bins are emitted together; shuffling them spreads a long record's pieces when there are
      # more bins than rows per batch.
      shuffle_bins=True,
  )
  return packed.map(_to_row)
