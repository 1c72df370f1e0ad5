"""Packs one source's examples, in stream order, into rows of exactly seq_len positions.

An example (data/encode.py) already pairs each position with its next-token target inside its record,
so rows never need a target from another record. Examples are appended to the open row while they
fit; one that does not fit closes the row (padding the rest) and opens the next, unless it is longer
than a whole row: then its head fills the open row and the rest runs on in new rows. Each part is its
own segment and its positions restart at 0 (a continuation cannot attend to the earlier part anyway,
and RoPE sees only relative offsets). Rows are single-source; the mixture interleaves sources by row.

Packing per source, before mixing, keeps every later stage (mixture, shuffle, batch) per row rather
than per record: on this CPU that is what lets the pipeline outrun the trainer by more than 10x.
State: the source stream's state before the record holding the open row's first position, and how
many of that record's positions earlier rows already took (replayed on restore, as grain's own
packers do).
"""

from __future__ import annotations

import copy

import grain
import numpy as np

from codex_jax.data.encode import EXAMPLE_FEATURES

# The packed row format (L = seq_len, F = model.feature_dim); padding is all zeros (PAD token,
# segment 0, modality 0, source 0, mask 0, example id 0).
ROW_FEATURES: dict[str, type] = {
    "inputs": np.int32,  # Token ids fed to the model (PAD at non-text positions).
    "targets": np.int32,  # The next token after each position, from the same record.
    "segment_ids": np.int32,  # 1, 2, 3... per packed part in the row; 0 for padding.
    "positions": np.int32,  # Index within the part, restarting at 0.
    "loss_mask": np.float32,  # 1.0 where the target is a real text token of the same record.
    "modality_ids": np.int32,  # records.MODALITY_IDS per position; 0 for padding.
    "source_ids": np.int32,  # 1-based index of the manifest source (accounting only; never on device).
    "features": np.float32,  # [B, L, F]: patch / audio / proprio / action values; zeros for text.
    # Which sample each position is (data/sample_ids.py; the trainer's samples.jsonl; never on device):
    "example_ids": np.int64,  # Source, epoch and record of the position's example; 0 for padding.
    "example_positions": np.int32,  # Index of the position within its example (a cut one continues).
}
HOST_FIELDS = ("source_ids", "example_ids", "example_positions")  # Accounting and the sample ledger only.
MODEL_FIELDS = tuple(name for name in ROW_FEATURES if name not in HOST_FIELDS)  # What the step receives.


def make_row(parts: list[dict[str, np.ndarray]], seq_len: int) -> dict[str, np.ndarray]:
  """Writes example parts (EXAMPLE_FEATURES slices) one after another into a zero-padded row of seq_len."""
  row = {name: np.zeros((seq_len, *parts[0][name].shape[1:]), dtype) for name, dtype in ROW_FEATURES.items()
         if name in EXAMPLE_FEATURES}
  row["segment_ids"] = np.zeros(seq_len, np.int32)
  row["positions"] = np.zeros(seq_len, np.int32)
  start = 0
  for segment, part in enumerate(parts, start=1):
    end = start + len(part["inputs"])
    for name in EXAMPLE_FEATURES:
      row[name][start:end] = part[name]
    row["segment_ids"][start:end] = segment
    row["positions"][start:end] = np.arange(end - start, dtype=np.int32)
    start = end
  return row


class SourceRows(grain.IterDataset):
  """One source's examples -> rows in the ROW_FEATURES format (see the module docstring)."""

  def __init__(self, parent: grain.IterDataset, seq_len: int):
    super().__init__(parent)
    self._seq_len = seq_len

  def __iter__(self) -> grain.DatasetIterator:
    return _SourceRowsIterator(self._parent.__iter__(), self._seq_len)


class _SourceRowsIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, seq_len: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self._parts: list[dict[str, np.ndarray]] = []
    self._used = 0
    self._example: dict[str, np.ndarray] | None = None  # The record being consumed ...
    self._example_state = None  # ... the parent's state before it ...
    self._start = 0  # ... and how many of its positions are already in rows.
    self._skip = 0  # After set_state: positions of the next record that earlier rows took.
    self._anchor = None  # (parent state, offset) where the open row begins.

  def _take(self, stop: int) -> None:
    if not self._parts:
      self._anchor = (self._example_state, self._start)
    self._parts.append({k: v[self._start:stop] for k, v in self._example.items()})
    self._used += stop - self._start
    self._start = stop

  def _flush(self) -> dict[str, np.ndarray]:
    row = make_row(self._parts, self._seq_len)
    self._parts, self._used, self._anchor = [], 0, None
    return row

  def __next__(self) -> dict[str, np.ndarray]:
    while True:
      if self._example is None:
        self._example_state = copy.deepcopy(self._parent.get_state())
        try:
          self._example = next(self._parent)
        except StopIteration:
          if self._parts:
            return self._flush()
          raise
        self._start, self._skip = self._skip, 0
      n, room = len(self._example["inputs"]) - self._start, self._seq_len - self._used
      if n <= room:
        self._take(self._start + n)
        self._example = None
        if self._used == self._seq_len:
          return self._flush()
      elif n <= self._seq_len and self._parts:
        return self._flush()  # It fits a fresh row: do not cut it.
      else:
        self._take(self._start + room)  # Longer than what is left: its head fills this row.
        return self._flush()

  def get_state(self) -> dict:
    if self._parts:
      parent_state, offset = self._anchor
    elif self._example is not None:
      parent_state, offset = self._example_state, self._start
    else:
      parent_state, offset = self._parent.get_state(), 0
    return {"parent": copy.deepcopy(parent_state), "offset": offset}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._parts, self._used, self._example, self._anchor = [], 0, None, None
    self._skip = int(state["offset"])
