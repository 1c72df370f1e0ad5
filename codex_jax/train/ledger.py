"""The sample ledger: which samples every step trained, one JSON line per step, cut back on resume.

`WORKDIR/samples.jsonl` gets `{"step": N, "samples": [[id, start, length], ...]}` for update N (the same
numbering as metrics.jsonl): every packed part of that step's batch, in row order, as its example id
(data/sample_ids.py: source, epoch, record), its first position in the record and its length. Each JAX
process writes the rows it fed, with no collective in the loop: process 0 to `samples.jsonl`, process
i > 0 to `samples.p{i}.jsonl`; a step's global batch is that step's lines of all of them together.
A resume from step S first drops lines past S (and a line torn by a kill), so the ledger describes
exactly the updates that made the restored state and those after it; after a resume with fewer processes,
process 0 also cuts the files of the processes that no longer exist.
"""

from __future__ import annotations

import itertools
import json
import os

from codex_jax.telemetry.writer import truncate_jsonl


def ledger_path(workdir: str, process_index: int = 0) -> str:
  return os.path.join(workdir, "samples.jsonl" if process_index == 0 else f"samples.p{process_index}.jsonl")


def read_ledger(path: str) -> dict[int, list[list[int]]]:
  """step -> its samples, from a ledger file."""
  with open(path) as f:
    return {row["step"]: row["samples"] for row in map(json.loads, f)}


class SampleLedger:
  """Appends one line per step; `resume_step` cuts the lines of steps past it first."""

  def __init__(self, workdir: str, process_index: int, resume_step: int, process_count: int = 1):
    os.makedirs(workdir, exist_ok=True)
    self.path = ledger_path(workdir, process_index)
    truncate_jsonl(self.path, resume_step)
    if process_index == 0:
      for index in itertools.count(process_count):
        if not os.path.exists(ledger_path(workdir, index)):
          break
        truncate_jsonl(ledger_path(workdir, index), resume_step)
    self._file = open(self.path, "a")

  def write(self, step: int, samples: list[list[int]]) -> None:
    # Flushed per line, like metrics.jsonl: a killed run's ledger ends at its last reported step.
    self._file.write(json.dumps({"step": int(step), "samples": samples}, separators=(",", ":")) + "\n")
    self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
