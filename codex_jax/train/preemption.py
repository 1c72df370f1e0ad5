"""SIGTERM means "save and stop": the loop checks this flag at each step boundary (single process too).

On a cluster the scheduler sends SIGTERM some time before killing a job; the step in flight finishes,
that step is checkpointed (unless it just was), and the run exits 0 so a requeue resumes from it.
With several JAX processes every process must stop at the same step, so the stop is agreed through
JAX's own preemption sync point, which the coordination service also sets when any host is preempted.
"""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging


class Preemption:
  """Installs a SIGTERM handler for the life of a run; `stop_at(step)` says whether to stop after it."""

  def __init__(self):
    self.requested = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame) -> None:
    del frame
    logging.warning("Signal %d received: will checkpoint at the next step boundary and exit.", signum)
    self.requested = True

  def stop_at(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      return self.requested or multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
