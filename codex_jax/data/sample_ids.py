"""Sample ids: which record, in which epoch, every packed position came from; a batch's ledger entries.

An example id is an int64 > 0 (0 marks padding), laid out as

  source_id << 56 | (epoch mod 2**16) << 40 | record

- source_id: the 1-based index of the source among the included ones (as in `source_ids`), < 128;
- epoch: how many times this process's stream of the source had gone through all its records before
  this draw (stream index // records of this process), so a record drawn again in a later epoch is a
  new sample with a new id; after 65536 epochs of one source the epoch field wraps;
- record: the record's index in the source's split, in file order, the same for any process or worker
  count: `plan.sources[source_id - 1].records[split][record]` is its (file number, locator).

Rows carry it per position (`example_ids`) with the position's index inside its record
(`example_positions`). A record longer than a row is trained as several parts, so a trained *sample*
is a part: (id, its first position in the record), and (id, position) names a trained token. Ids are
unique within a run phase; a new run phase (`data.phase`) starts every stream, and its epochs, afresh.
"""

from __future__ import annotations

import numpy as np

from codex_jax.data.errors import DataError

SOURCE_SHIFT, EPOCH_SHIFT = 56, 40
MAX_SOURCE_ID = (1 << (63 - SOURCE_SHIFT)) - 1
EPOCHS = 1 << (SOURCE_SHIFT - EPOCH_SHIFT)
MAX_RECORDS = 1 << EPOCH_SHIFT


def check_source(source_id: int, num_records: int, name: str = "") -> None:
  """Fails when a source's ids would not fit the layout above."""
  if not 1 <= source_id <= MAX_SOURCE_ID or num_records > MAX_RECORDS:
    raise DataError(f"source {name or source_id!r}: sample ids hold at most {MAX_SOURCE_ID} sources of at most "
                    f"{MAX_RECORDS} records (this is source {source_id} with {num_records} records).")


def example_id(source_id: int, epoch: int, record: int) -> int:
  return source_id << SOURCE_SHIFT | (epoch % EPOCHS) << EPOCH_SHIFT | record


def split_id(ids):
  """example id(s) -> (source_id, epoch mod 2**16, record); works on ints and integer arrays."""
  return ids >> SOURCE_SHIFT, (ids >> EPOCH_SHIFT) & (EPOCHS - 1), ids & (MAX_RECORDS - 1)


def batch_samples(batch: dict[str, np.ndarray]) -> list[list[int]]:
  """[id, first position in its record, length] for every packed part of a batch, in row-major order.

  Parts are found from `positions` (0 at each part's first position) and `segment_ids` (0 = padding,
  which only ever ends a row); empty examples (no positions) never appear.
  """
  real = np.asarray(batch["segment_ids"]).ravel() > 0
  starts = np.flatnonzero(real & (np.asarray(batch["positions"]).ravel() == 0))
  if not starts.size:
    return []
  taken = np.cumsum(real)  # Real positions up to and including each index.
  ends = np.append(taken[starts[1:] - 1], taken[-1])  # Padding between two parts is not real: not counted.
  lengths = ends - taken[starts] + 1
  ids = np.asarray(batch["example_ids"]).ravel()[starts]
  offsets = np.asarray(batch["example_positions"]).ravel()[starts]
  return np.stack([ids, offsets.astype(np.int64), lengths.astype(np.int64)], axis=1).tolist()
