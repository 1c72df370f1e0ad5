"""Cut token streams into pieces of at most seq_len and first-fit pack them into fixed rows.

A document's token ids (EOS appended) give `inputs = ids[:-1]`, `targets = ids[1:]`; pieces never
mix documents, so no target crosses into another document. A document longer than seq_len becomes
several consecutive pieces; each piece is its own packed segment and its positions restart at 0
(the continuation cannot attend to the earlier piece anyway, and RoPE only sees relative offsets).
"""

from __future__ import annotations

import dataclasses
import sys

import grain
import numpy as np

# The packed row format (L = seq_len); padding is token 0 (PAD_ID), segment 0, mask 0.
ROW_FEATURES: dict[str, type] = {
    "inputs": np.int32,  # Token ids fed to the model.
    "targets": np.int32,  # The next token after each input, from the same document.
    "segment_ids": np.int32,  # 1, 2, 3... per packed piece in the row; 0 for padding.
    "positions": np.int32,  # Index within the piece, restarting at 0.
    "loss_mask": np.float32,  # 1.0 on real tokens, 0.0 on padding.
}


@dataclasses.dataclass(frozen=True)
class SplitDocument(grain.experimental.FlatMapTransform):
  """One tokenized document (int32 ids ending in EOS) -> input/target pieces of <= seq_len."""

  seq_len: int
  # Only MapDataset flat-maps use the fan-out bound; pieces are cut on an IterDataset.
  max_fan_out: int = sys.maxsize

  def flat_map(self, ids: np.ndarray) -> list[dict[str, np.ndarray]]:
    num_predictions = len(ids) - 1
    pieces = []
    for start in range(0, num_predictions, self.seq_len):
      end = min(start + self.seq_len, num_predictions)
      pieces.append({"inputs": ids[start:end], "targets": ids[start + 1:end + 1]})
    return pieces


def _to_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  segment_ids = packed["inputs_segment_ids"]
  return {
      "inputs": packed["inputs"].astype(np.int32),
      "targets": packed["targets"].astype(np.int32),
      "segment_ids": segment_ids.astype(np.int32),
      "positions": packed["inputs_positions"].astype(np.int32),
      "loss_mask": (segment_ids > 0).astype(np.float32),
  }


def pack_rows(pieces: grain.IterDataset, *, seq_len: int, num_bins: int,
              seed: int) -> grain.IterDataset:
  """Pieces -> rows of exactly seq_len in the ROW_FEATURES format, via grain's first-fit packer."""
  packed = grain.experimental.FirstFitPackIterDataset(
      pieces,
      length_struct={"inputs": seq_len, "targets": seq_len},
      num_packing_bins=num_bins,
      seed=seed,
      # Bins are emitted together; shuffling them spreads a long document's pieces when there are
      # more bins than rows per batch.
      shuffle_bins=True,
  )
  return packed.map(_to_row)
