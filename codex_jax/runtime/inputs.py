"""The run's data side: the resolved plan, its train batches across mixture phases, resume rules.

Resume order (before any state is restored): the checkpoint's data record is read; the stream keeps the
shard count it started with (data.shards), and any process count that divides it may feed it (each process
feeds whole shards, data/batches.py:ShardedBatches, so the global batches are the same); a different manifest
hash is refused unless data.phase names a new run phase, in which case the data stream starts afresh
on the new manifest. Within a run, the manifest's mixture phases switch at their start steps: the new
phase's batches continue every source where the old one stopped (rows still buffered in the
shuffle window and the open rows of the packers at that moment are dropped, never repeated).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from absl import logging

from codex_jax.config.schema import Config
from codex_jax.data import batches as batches_lib
from codex_jax.data.accounting import TokenAccountant
from codex_jax.data.errors import DataError
from codex_jax.data.plan import DataPlan, build_plan, write_data_record
from codex_jax.runtime.feed import interleave


@dataclasses.dataclass
class RunInputs:
  cfg: Config
  plan: DataPlan
  local_batch: int  # This process's rows of one micro-batch: one batch of the data stream.
  batches: batches_lib.ShardedBatches | None = None
  shards: int = 0  # Shards of the train stream: data.shards, or the process count at the run's first start.
  phase: str = ""
  accountant: TokenAccountant | None = None
  restore_iterator: bool = True  # False after a run-phase change: the old iterator state does not apply.

  @classmethod
  def create(cls, cfg: Config, workdir: str, is_main: bool) -> RunInputs:
    plan = build_plan(cfg.data, vocab_size=cfg.model.vocab_size, feature_dim=cfg.model.feature_dim,
                      workdir=workdir if is_main else None)
    if plan.malformed:
      logging.warning("Skipping %d malformed record(s) (data.on_malformed='skip'); see %s/data/quarantine.jsonl",
                      len(plan.malformed), workdir)
    logging.info("Data %s: manifest hash %s, sources %s, excluded %s", plan.manifest.path, plan.manifest_hash,
                 ", ".join(s.source.name for s in plan.sources),
                 ", ".join(f"{e.source} ({e.reason})" for e in plan.exclusions) or "none")
    return cls(cfg, plan, cfg.train.micro_batch // jax.process_count())  # The data stream yields micro-batches.

  def _build(self, phase: str, split: str, *, shard: int, shards: int, rows: int,
             num_epochs: int | None = None) -> batches_lib.Batches:
    """Shard `shard` of `shards` of the split's stream, `rows` rows a batch."""
    return batches_lib.build_batches(
        self.plan, self.cfg.data, feature_dim=self.cfg.model.feature_dim, split=split, phase=phase,
        local_batch=rows, seed=self.cfg.data.seed, process_index=shard, process_count=shards, num_epochs=num_epochs)

  def eval_iterator(self, step: int):
    """A fresh pass over the held-out records, mixed by the shares of the phase at `step` (one shard per process)."""
    return self._build(self.plan.manifest.phase_at(step).name, "eval", shard=jax.process_index(),
                       shards=jax.process_count(), rows=self.local_batch, num_epochs=1).iterator

  def _build_train(self, phase: str) -> batches_lib.ShardedBatches:
    hosted = batches_lib.hosted_shards(self.shards, jax.process_index(), jax.process_count())
    rows = self.cfg.train.micro_batch // self.shards  # Each shard's rows of a micro-batch.
    return batches_lib.ShardedBatches(
        {shard: self._build(phase, "train", shard=shard, shards=self.shards, rows=rows) for shard in hosted},
        self.shards)

  def start(self, step: int, meta: dict | None) -> None:
    """Builds the train batches for `step`, checking a checkpoint's data record first when resuming."""
    self.shards = self.cfg.data.shards or jax.process_count()
    if meta is not None:
      self._check_resume(step, meta)
    self.phase = self.plan.manifest.phase_at(step).name
    self.batches = self._build_train(self.phase)
    totals = meta.get("accounting") if meta and self.restore_iterator else None
    self.accountant = TokenAccountant(self.plan, self.phase, totals)

  def _check_resume(self, step: int, meta: dict) -> None:
    saved = meta.get("data", {})
    if saved.get("manifest_hash") == self.plan.manifest_hash:  # The stream continues, in its own shards.
      shards = meta.get("data_shards", meta.get("process_count"))  # Before data.shards: one per process.
      if shards % jax.process_count():
        raise DataError(f"checkpoint {step} streams its data in {shards} shard(s) (written by "
                        f"{meta.get('process_count')} process(es)); {jax.process_count()} processes cannot feed "
                        f"whole shards. Resume with a process count that divides {shards}.")
      if meta.get("process_count") != jax.process_count():
        logging.warning("Checkpoint %d was written by %s process(es); %d now feed its %d data shard(s).", step,
                        meta.get("process_count"), jax.process_count(), shards)
      self.shards = shards
      return
    old_phase = meta.get("run_phase")
    if old_phase == self.cfg.data.phase:
      raise DataError(
          f"checkpoint {step} was trained on data with manifest hash {saved.get('manifest_hash')}, this run's is "
          f"{self.plan.manifest_hash} ({describe_change(saved, self.plan.record())}). Resuming would silently "
          f"change the data of run phase {old_phase!r}: restore the old data, or start a new phase with "
          f"--config.data.phase=<new name>.")
    logging.info("Run phase %r -> %r: new data (manifest hash %s -> %s); the data stream starts afresh.",
                 old_phase, self.cfg.data.phase, saved.get("manifest_hash"), self.plan.manifest_hash)
    self.restore_iterator = False

  def next_update(self, step: int, k: int) -> tuple[dict, dict[str, float]]:
    """This process's rows of update `step` (0-based): k batches of the data stream interleaved so that micro-batch m
    is batch m (train/accumulate.py), and the update's data metrics; switches mixture phase on time."""
    self._switch_phase(step)
    batch = interleave([next(self.batches) for _ in range(k)])
    return batch, self.accountant.update(batch)

  def _switch_phase(self, step: int) -> None:
    phase = self.plan.manifest.phase_at(step).name
    if phase != self.phase:
      sources = self.batches.source_states()
      self.batches.close()
      logging.info("Step %d: mixture phase %r -> %r", step, self.phase, phase)
      self.phase, self.batches = phase, self._build_train(phase)
      self.batches.start_from(sources)
      self.accountant = TokenAccountant(self.plan, phase)

  def write_record(self, workdir: str) -> None:
    """workdir/data/: the manifest record (sources, exclusions and why, shares, hashes) and the quarantine."""
    write_data_record(self.plan, workdir)

  def meta(self) -> dict[str, Any]:
    """What a checkpoint records about the data (see checkpoint/manager.py)."""
    return {"data": self.plan.record(), "run_phase": self.cfg.data.phase, "mixture_phase": self.phase,
            "process_count": jax.process_count(), "data_shards": self.shards, "accounting": self.accountant.state()}

  def close(self) -> None:
    if self.batches is not None:
      self.batches.close()


def describe_change(old: dict, new: dict) -> str:
  """Names what differs between two data records: files, shares, licences or the tokenizer."""
  changes = []
  old_files = {(s, f): h for s, files in old.get("files", {}).items() for f, h in files}
  new_files = {(s, f): h for s, files in new.get("files", {}).items() for f, h in files}
  for key in sorted(set(old_files) | set(new_files)):
    if old_files.get(key) != new_files.get(key):
      what = "added" if key not in old_files else "removed" if key not in new_files else "changed"
      changes.append(f"{key[0]}: file {key[1]} {what}")
  if old.get("manifest") != new.get("manifest"):
    changes.append("manifest entries (sources, shares, licences or rates) differ")
  if old.get("excluded") != new.get("excluded"):
    changes.append("licence exclusions differ")
  if old.get("tokenizer_sha256") != new.get("tokenizer_sha256"):
    changes.append("tokenizer differs")
  return "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "") or "unknown change"
