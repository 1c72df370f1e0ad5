"""Scalar metrics to TensorBoard event files and to `metrics.jsonl` in the workdir."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping
from typing import Any

import numpy as np

from codex_jax import atomic

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
  """Writes `{"step": int, name: float | null, ...}` lines and TensorBoard scalars.

  `resume_step=N` is for a run restarted from a checkpoint at step N: steps after N belong to the
  abandoned tail of the earlier run, so they are cut from the jsonl and hidden in TensorBoard
  (tensorboardX's `purge_step`). `enabled=False` (JAX processes other than 0) makes every call a no-op.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None,
               flush_secs: int = 30):
    self.workdir = workdir
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if resume_step is not None:
      truncate_jsonl(self.path, resume_step)
    from tensorboardX import SummaryWriter  # Local: process 1..N never pays for the import.

    self._tb = SummaryWriter(workdir, flush_secs=flush_secs,
                             purge_step=None if resume_step is None else resume_step + 1)
    self._jsonl = open(self.path, "a")

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    step = int(step)
    values = {name: _to_float(name, value) for name, value in scalars.items()}
    record = {"step": step, **{k: (v if math.isfinite(v) else None) for k, v in values.items()}}
    # One line per call, flushed at once, so a killed run's jsonl ends at its last logged step.
    try:
      self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
      self._jsonl.flush()
    except OSError as e:
      raise OSError(e.errno, f"{self.path}: {e.strerror}") from e
    for name, value in values.items():
      self._check_tensorboard()
      self._tb.add_scalar(name, value, step)

  def _check_tensorboard(self) -> None:
    _check_alive(_event_writer(self._tb), self.workdir)

  def flush(self) -> None:
    if self.enabled:
      self._jsonl.flush()
      self._check_tensorboard()
      self._tb.flush()

  def close(self) -> None:
    if self.enabled and self._jsonl is not None:
      tb, jsonl, self._jsonl, self._tb, self.enabled = self._tb, self._jsonl, None, None, False
      events = _event_writer(tb)
      try:
        jsonl.close()
        _check_alive(events, self.workdir)
        tb.close()
      except OSError:
        if events is not None:
          events._closed = True  # Its exit hook would otherwise wait forever on a dead thread, or fail again.
        raise

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _event_writer(tb):
  """tensorboardX's EventFileWriter (its thread and state are private), or None."""
  return getattr(getattr(tb, "file_writer", None), "event_writer", None)


def _check_alive(events, workdir: str) -> None:
  """tensorboardX writes events from a thread; when that thread dies (a full disk), a write blocks forever on its
  full queue and a flush waits forever for it. Fail instead, naming the folder."""
  worker = getattr(events, "_worker", None)
  if worker is not None and not worker.is_alive():
    free = shutil.disk_usage(workdir).free
    raise OSError(f"{workdir}: the TensorBoard event writer stopped: it failed writing an event file ("
                  + ("No space left on device" if free == 0 else f"{free} bytes free on that disk") + ")")


def truncate_jsonl(path: str, max_step: int) -> int:
  """Drops lines with step > max_step (and a torn last line) from `path`; returns lines dropped."""
  try:
    with open(path) as f:
      lines = f.readlines()
  except FileNotFoundError:
    return 0
  kept = []
  for line in lines:
    try:
      if int(json.loads(line)["step"]) <= max_step:
        kept.append(line if line.endswith("\n") else line + "\n")
    except (ValueError, KeyError, TypeError):
      pass  # A half-written line from a run killed mid-write.
  if len(kept) == len(lines) and all(a == b for a, b in zip(kept, lines, strict=True)):
    return 0
  atomic.write_text(path, "".join(kept))
  return len(lines) - len(kept)


def _to_float(name: str, value: Any) -> float:
  # np.asarray covers Python numbers, numpy scalars and (fetched or not) jax arrays alike.
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(f"metric {name!r} is not a scalar: shape {array.shape}")
  return float(array.reshape(()))
