"""The Grain input pipeline: documents -> token ids -> packed rows -> this process's batches.

Chain (one source today; a weighted mixture would combine several `build_source_dataset`s where
marked, before the worker boundary):

  MapDataset(texts of this split and process) .shuffle(seed) .repeat(num_epochs) .map(tokenize)
  -> TokenStream (to_iter_dataset, plus mp_prefetch when num_workers > 0: workers only tokenize)
  -> cut into pieces (flat map) -> window shuffle of pieces -> first-fit pack into rows -> batch.

Workers do only the one-to-one tokenize step and grain interleaves them round-robin, so the stream
is the same for any `num_workers`. `TokenStream` keeps the state the same too (grain's own
mp_prefetch state has one entry per worker), so a run may resume with another worker count.
"""

from __future__ import annotations

import dataclasses
import functools

import grain
import numpy as np
import tokenizers
from absl import flags

from codex_jax.config.schema import DataConfig
from codex_jax.data.corpus import Document, split_of
from codex_jax.data.errors import DataError
from codex_jax.data.packing import ROW_FEATURES, SplitDocument, pack_rows
from codex_jax.data.tokenizer import EOS_ID

SPLITS = ("train", "eval")
# Small read-ahead: tokenizing holds the GIL, so more threads do not help, and a large buffer makes
# every (re)start tokenize hundreds of documents before the first batch.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=16)


def batch_spec(local_batch: int, seq_len: int) -> dict[str, tuple[tuple[int, int], type]]:
  """The batch format: feature -> (shape [B, L], numpy dtype); see packing.ROW_FEATURES."""
  return {name: ((local_batch, seq_len), dtype) for name, dtype in ROW_FEATURES.items()}


@dataclasses.dataclass(frozen=True)
class Tokenize(grain.transforms.Map):
  """Text -> int32 token ids with EOS appended."""

  tokenizer: tokenizers.Tokenizer

  def map(self, text: str) -> np.ndarray:
    ids = self.tokenizer.encode(text).ids
    ids.append(EOS_ID)
    return np.asarray(ids, dtype=np.int32)


def shard_documents(documents: list[Document], *, split: str, eval_fraction: float,
                    process_index: int, process_count: int) -> list[Document]:
  """This process's documents of one split: every process_count-th, from process_index."""
  if split not in SPLITS:
    raise DataError(f"split must be one of {SPLITS}, got {split!r}.")
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index {process_index} is outside [0, {process_count}).")
  in_split = [d for d in documents if split_of(d.id, eval_fraction) == split]
  shard = in_split[process_index::process_count]
  if not shard:
    raise DataError(
        f"No {split} documents for process {process_index} of {process_count}: the split has "
        f"{len(in_split)} of {len(documents)} documents (eval_fraction={eval_fraction}); "
        "raise data.corpus_max_bytes or adjust data.eval_fraction.")
  return shard


def build_source_dataset(documents: list[Document], tokenizer: tokenizers.Tokenizer, *,
                         seed: int, num_epochs: int | None) -> grain.MapDataset:
  """One source's documents as token-id arrays, reshuffled each epoch (grain folds in the epoch)."""
  texts = [d.text for d in documents]
  return (grain.MapDataset.source(texts)
          .shuffle(seed=seed)
          .repeat(num_epochs)
          .map(Tokenize(tokenizer)))


class TokenStream(grain.IterDataset):
  """Reads a MapDataset in order, in process or with worker processes; state is just the index."""

  def __init__(self, tokens: grain.MapDataset, num_workers: int):
    super().__init__()
    self._tokens = tokens
    self._num_workers = num_workers

  def __iter__(self) -> grain.DatasetIterator:
    return _TokenStreamIterator(self._tokens, self._num_workers)


class _TokenStreamIterator(grain.DatasetIterator):

  def __init__(self, tokens: grain.MapDataset, num_workers: int):
    super().__init__()
    self._tokens = tokens
    self._num_workers = num_workers
    self._next_index = 0
    self._reader: grain.DatasetIterator | None = None  # Opened on first use: set_state is cheap.

  def _open(self) -> grain.DatasetIterator:
    ds = self._tokens[self._next_index:].to_iter_dataset(_READ_OPTIONS)
    if self._num_workers > 0:
      if not flags.FLAGS.is_parsed():
        # grain's worker launch reads one of its absl flags unguarded; outside an absl app
        # (tests, notebooks) nobody parsed them, so take the defaults.
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers))
    return iter(ds)

  def __next__(self) -> np.ndarray:
    self._assert_not_closed()
    if self._reader is None:
      self._reader = self._open()
    # Workers hand over shared-memory arrays; a plain copy frees the segment now rather than at
    # interpreter exit (where grain's cleanup fails and warns of a leak).
    element = np.array(next(self._reader), copy=True)
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


def make_iterator(data_cfg: DataConfig, tokenizer: tokenizers.Tokenizer, documents: list[Document],
                  *, split: str, local_batch: int, seed: int, process_index: int = 0,
                  process_count: int = 1, num_epochs: int | None = None) -> grain.DatasetIterator:
  """Batches of `batch_spec(local_batch, data_cfg.seq_len)` for this process; checkpointable.

  num_epochs=None repeats forever. A finite stream ends with a partial batch padded by empty rows
  (all PAD, segment 0, loss_mask 0), so an eval pass counts every token exactly once; processes
  may then see different numbers of batches, so a multi-host eval loop must agree on a count.
  The caller passes the seed (normally data.seed); processes may share it, their shards differ.
  """
  if local_batch <= 0:
    raise DataError(f"local_batch must be positive, got {local_batch}.")
  shard = shard_documents(documents, split=split, eval_fraction=data_cfg.eval_fraction,
                          process_index=process_index, process_count=process_count)
  tokens = build_source_dataset(shard, tokenizer, seed=seed, num_epochs=num_epochs)
  # A weighted mixture of sources would combine several `tokens` datasets here.
  ds = TokenStream(tokens, data_cfg.num_workers)
  pieces = grain.experimental.FlatMapIterDataset(ds, SplitDocument(data_cfg.seq_len))
  if data_cfg.shuffle_window > 1:
    # A long document is hundreds of consecutive pieces; without this, whole batches would come
    # from one file and the loss would swing with it. The state replays from the window's start.
    pieces = grain.experimental.WindowShuffleIterDataset(pieces, window_size=data_cfg.shuffle_window,
                                                         seed=seed)
  rows = pack_rows(pieces, seq_len=data_cfg.seq_len,
                   num_bins=data_cfg.packing_bins or local_batch, seed=seed)
  batches = rows.batch(local_batch, batch_fn=functools.partial(
      grain.experimental.batch_and_pad, batch_size=local_batch))
  return iter(batches)
