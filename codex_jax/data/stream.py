"""One source's examples as a resumable stream: block-shuffled epochs, decoded in optional workers.

`SourceRecords` is a MapDataset over the source's (file, locator) index: epoch e is a permutation of
blocks of consecutive records (seeded by seed and e), so readers of compressed or columnar files read
neighbouring records together, and `data.shuffle_window` mixes them further downstream.
`IndexedStream` reads such a MapDataset in index order, in this process or in worker processes that
grain interleaves round-robin, so the stream and its state (just the next index) are the same for any
worker count: a run may resume with a different `data.num_workers`.
"""

from __future__ import annotations

import ctypes
import signal
import sys

import grain
import numpy as np
from absl import flags

# In process, decode synchronously: decoding holds the GIL, and reader threads contending for it made
# the whole pipeline 25% slower (measured). Worker processes get a small read-ahead each.
_IN_PROCESS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
_IN_WORKER = grain.ReadOptions(num_threads=1, prefetch_buffer_size=16)
_PR_SET_PDEATHSIG = 1


class EpochBlockShuffle(grain.MapDataset):
  """Element i of epoch e = i // n is record perm_e(i % n), permuting blocks of `block` records."""

  def __init__(self, parent: grain.MapDataset, *, block: int, seed: int, num_epochs: int | None):
    super().__init__(parent)
    self._n, self._block, self._seed = len(parent), max(1, block), seed
    self._length = sys.maxsize if num_epochs is None else self._n * num_epochs
    self._order: tuple[int, np.ndarray] | None = None  # (epoch, record order) of the last epoch used.

  def __len__(self) -> int:
    return self._length

  def _epoch_order(self, epoch: int) -> np.ndarray:
    if self._order is None or self._order[0] != epoch:
      num_blocks = -(-self._n // self._block)
      blocks = np.random.default_rng([self._seed, epoch]).permutation(num_blocks)
      order = np.concatenate([np.arange(b * self._block, min((b + 1) * self._block, self._n)) for b in blocks])
      self._order = (epoch, order)
    return self._order[1]

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    if index >= self._length:
      raise IndexError(index)
    epoch, i = divmod(index, self._n)
    return self._parent[int(self._epoch_order(epoch)[i])]

  def __str__(self) -> str:
    return f"EpochBlockShuffle(block={self._block}, seed={self._seed})"


def _die_with_parent(worker_index: int, worker_count: int) -> None:
  """Runs in each grain worker: the kernel kills it when the trainer dies, even by kill -9."""
  del worker_index, worker_count
  if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _copy(element):
  # Workers hand over shared-memory arrays; a plain copy frees the segment now rather than at
  # interpreter exit (where grain's cleanup fails and warns of a leak).
  if isinstance(element, dict):
    return {k: np.array(v, copy=True) for k, v in element.items()}
  return np.array(element, copy=True)


class IndexedStream(grain.IterDataset):
  """Reads a MapDataset in order, in process or with worker processes; state is just the index."""

  def __init__(self, elements: grain.MapDataset, num_workers: int):
    super().__init__()
    self._elements = elements
    self._num_workers = num_workers

  def __iter__(self) -> grain.DatasetIterator:
    return _IndexedStreamIterator(self._elements, self._num_workers)


class _IndexedStreamIterator(grain.DatasetIterator):

  def __init__(self, elements: grain.MapDataset, num_workers: int):
    super().__init__()
    self._elements = elements
    self._num_workers = num_workers
    self._next_index = 0
    self._reader: grain.DatasetIterator | None = None  # Opened on first use: set_state is cheap.

  def _open(self) -> grain.DatasetIterator:
    ds = self._elements[self._next_index:].to_iter_dataset(_IN_WORKER if self._num_workers else _IN_PROCESS)
    if self._num_workers > 0:
      if not flags.FLAGS.is_parsed():
        # grain's worker launch reads one of its absl flags unguarded; outside an absl app
        # (tests, notebooks) nobody parsed them, so take the defaults.
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers, per_worker_buffer_size=16),
                          worker_init_fn=_die_with_parent)
    return iter(ds)

  def __next__(self):
    self._assert_not_closed()
    if self._next_index >= len(self._elements):
      raise StopIteration
    if self._reader is None:
      self._reader = self._open()
    element = next(self._reader)
    if self._num_workers > 0:
      element = _copy(element)
    self._next_index += 1
    return element

  def get_state(self) -> dict[str, int]:
    return {"next_index": self._next_index}

  def set_state(self, state: dict[str, int]) -> None:
    self._close_reader()
    self._next_index = int(state["next_index"])

  def start_prefetch(self) -> None:
    if self._reader is None:
      self._reader = self._open()
    self._reader.start_prefetch()

  def _close_reader(self) -> None:
    if self._reader is not None:
      self._reader.close()
      self._reader = None

  def close(self) -> None:
    self._close_reader()
    super().close()
