"""The Grain input: manifest sources -> examples -> effective-token mixture -> packed batches.

Chain, per shard of the data stream (a run has `data.shards` of them; each process feeds whole shards,
`ShardedBatches`, so a resume may use any process count that divides the shard count):

  per source: MapDataset(this split's records, this process's share) .block-shuffle per epoch
              .map(read + encode + sample id)  -> IndexedStream (workers: data.num_workers per source)
              -> SourceRows (packed rows of seq_len, in stream order)
  -> EffectiveTokenMix(shares of the phase, exchange rates), row by row
  -> window shuffle of rows -> batch.

Its state (grain's nested dict) is checkpointed with the model; see stream.py for why a different
worker count resumes exactly.
"""

from __future__ import annotations

import dataclasses
import functools

import grain
import numpy as np

from codex_jax.config.schema import DataConfig
from codex_jax.data.encode import Encoder, EncodeSpec
from codex_jax.data.errors import DataError
from codex_jax.data.formats import get_format, validate_options
from codex_jax.data.mixture import EffectiveTokenMix, with_source_states
from codex_jax.data.packing import ROW_FEATURES, SourceRows
from codex_jax.data.plan import SPLITS, DataPlan, SourcePlan
from codex_jax.data.records import MODALITY_IDS
from codex_jax.data.sample_ids import check_source, example_id
from codex_jax.data.stream import EpochBlockShuffle, IndexedStream


def encode_spec(data_cfg: DataConfig, feature_dim: int) -> EncodeSpec:
  spec = EncodeSpec(feature_dim=feature_dim, image_size=data_cfg.image_size, patch_size=data_cfg.patch_size,
                    video_frames=data_cfg.video_frames, tubelet_frames=data_cfg.tubelet_frames,
                    audio_sample_rate=data_cfg.audio_sample_rate, audio_mels=data_cfg.audio_mels,
                    audio_patch_frames=data_cfg.audio_patch_frames)
  spec.check()
  return spec


def batch_spec(local_batch: int, seq_len: int, feature_dim: int) -> dict[str, tuple[tuple[int, ...], type]]:
  """The batch format: feature -> (shape, numpy dtype); see packing.ROW_FEATURES."""
  return {name: ((local_batch, seq_len, feature_dim) if name == "features" else (local_batch, seq_len), dtype)
          for name, dtype in ROW_FEATURES.items()}


def rates_by_modality_id(rates: dict[str, float]) -> np.ndarray:
  table = np.zeros(len(MODALITY_IDS) + 1)
  for name, i in MODALITY_IDS.items():
    table[i] = rates[name]
  return table


class ReadExample(grain.transforms.MapWithIndex):
  """(stream index, (file number, locator, record index)) -> the decoded, encoded example with its id.

  The id (sample_ids.py) takes the epoch from the stream index: `num_records` records per epoch.
  Picklable for worker processes.
  """

  def __init__(self, source: SourcePlan, encoder: Encoder, num_records: int):
    self._paths, self._encoder, self._num_records = source.paths, encoder, num_records
    self._source_id = source.source_id
    self._format = get_format(source.source.format)
    self._options = validate_options(source.source.format, source.source.options)

  def map_with_index(self, index: int, entry) -> dict[str, np.ndarray]:
    file_no, locator, record = entry
    return self._encoder(self._format.read(self._paths[file_no], locator, self._options),
                         example_id(self._source_id, index // self._num_records, record))


def source_stream(plan: DataPlan, source: SourcePlan, data_cfg: DataConfig, spec: EncodeSpec, *, split: str,
                  seed: int, process_index: int, process_count: int,
                  num_epochs: int | None) -> grain.IterDataset | None:
  """One source's packed rows for this process, or None when it has no records of the split.

  Records are packed into rows before mixing, so the mixture interleaves sources row by row and a long
  file cannot put its source ahead of its share by more than one row.
  """
  split_records = source.records[split]
  check_source(source.source_id, len(split_records), source.source.name)
  # (file number, locator, index in the split): the index is the record's part of its sample id.
  records = [(*split_records[i], i) for i in range(process_index, len(split_records), process_count)]
  if not records:
    return None
  encoder = Encoder(plan.tokenizer, spec, source.source_id, source.source.exchange_rates)
  examples = EpochBlockShuffle(grain.MapDataset.source(records), block=data_cfg.shuffle_block,
                               seed=seed * 1_000_003 + source.source_id, num_epochs=num_epochs)
  read = ReadExample(source, encoder, len(records))
  return SourceRows(IndexedStream(examples.map_with_index(read), data_cfg.num_workers), data_cfg.seq_len)


@dataclasses.dataclass
class Batches:
  """A pipeline's iterator (what is checkpointed) and its mixture (whose live position a phase switch needs)."""

  iterator: grain.DatasetIterator
  mixture: EffectiveTokenMix

  def source_states(self) -> list:
    """Where each source's stream is now: the next phase's pipeline continues from here."""
    return self.mixture.live_iterator.get_state()["sources"]

  def start_from(self, source_states: list) -> None:
    """Starts this (fresh) pipeline's sources where another one's stopped; see mixture.with_source_states."""
    self.iterator.set_state(with_source_states(self.iterator.get_state(), source_states))


def hosted_shards(count: int, process_index: int, process_count: int) -> range:
  """The shards of a `count`-shard stream that process `process_index` of `process_count` feeds: a contiguous
  run, so the global batch (processes' rows in process order) holds every shard's rows in shard order."""
  if count % process_count:
    raise DataError(f"the data stream has {count} shard(s); {process_count} processes cannot feed whole shards. "
                    f"Use a process count that divides {count} (data.shards is fixed when a run starts).")
  per = count // process_count
  return range(process_index * per, (process_index + 1) * per)


@dataclasses.dataclass
class ShardedBatches:
  """This process's shards of the data stream; its batch is their batches concatenated in shard order."""

  shards: dict[int, Batches]  # Global shard index -> its pipeline.
  count: int  # Shards of the whole stream.

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(b.iterator) for b in self.shards.values()]
    return parts[0] if len(parts) == 1 else {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

  @property
  def iterators(self) -> dict[int, grain.DatasetIterator]:
    """What a checkpoint saves: one iterator state per shard (checkpoint/data_shards.py)."""
    return {shard: b.iterator for shard, b in self.shards.items()}

  def source_states(self) -> dict[int, list]:
    return {shard: b.source_states() for shard, b in self.shards.items()}

  def start_from(self, source_states: dict[int, list]) -> None:
    for shard, b in self.shards.items():
      b.start_from(source_states[shard])

  def close(self) -> None:
    for b in self.shards.values():
      b.iterator.close()


def make_iterator(plan: DataPlan, data_cfg: DataConfig, **kwargs) -> grain.DatasetIterator:
  """`build_batches(...).iterator`: the checkpointable batch iterator alone."""
  return build_batches(plan, data_cfg, **kwargs).iterator


def build_batches(plan: DataPlan, data_cfg: DataConfig, *, feature_dim: int, split: str, phase: str,
                  local_batch: int, seed: int, process_index: int = 0, process_count: int = 1,
                  num_epochs: int | None = None) -> Batches:
  """Batches of `batch_spec(local_batch, data_cfg.seq_len, feature_dim)` for this process; checkpointable.

  num_epochs=None repeats every source forever. A finite stream ends with a partial batch padded by
  empty rows, so an eval pass counts every token exactly once; processes may then see different
  numbers of batches, so a multi-host eval loop must agree on a count.
  """
  if split not in SPLITS:
    raise DataError(f"split must be one of {SPLITS}, got {split!r}.")
  if local_batch <= 0:
    raise DataError(f"local_batch must be positive, got {local_batch}.")
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index {process_index} is outside [0, {process_count}).")
  spec = encode_spec(data_cfg, feature_dim)
  shares = plan.shares(phase)
  streams, weights, rates = [], [], []
  for source in plan.sources:
    stream = source_stream(plan, source, data_cfg, spec, split=split, seed=seed, process_index=process_index,
                           process_count=process_count, num_epochs=num_epochs)
    if stream is None:
      if split == "train":
        raise DataError(f"source {source.source.name!r} has no {split} records for process {process_index} of "
                        f"{process_count} ({len(source.records[split])} in all).")
      continue
    streams.append(stream)
    weights.append(shares[source.source.name])
    rates.append(rates_by_modality_id(source.source.exchange_rates))
  if not streams:
    raise DataError(f"no source has {split} records for process {process_index}; raise data.eval_fraction.")
  rows = mixture = EffectiveTokenMix(streams, weights, rates)
  if data_cfg.shuffle_window > 1:
    # A long record is many consecutive rows; without this, whole batches would come from one file
    # and the loss would swing with it. The state replays from the window's start.
    rows = grain.experimental.WindowShuffleIterDataset(rows, window_size=data_cfg.shuffle_window, seed=seed)
  batches = rows.batch(local_batch, batch_fn=functools.partial(grain.experimental.batch_and_pad,
                                                               batch_size=local_batch))
  return Batches(iter(batches), mixture)
