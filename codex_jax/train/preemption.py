"""SIGTERM and a first Ctrl-C mean "save and stop": the loop checks this flag at each step boundary.

On a cluster the scheduler sends SIGTERM some time before killing a job; the step in flight finishes,
that step is checkpointed (unless it just was), and the run exits 0 so a requeue resumes from it. Ctrl-C
(SIGINT) does the same, so an interrupted run at a terminal keeps its progress; a second Ctrl-C stops at once.
With several JAX processes every process must stop at the same step, so the stop is agreed through
JAX's own preemption sync point, which the coordination service also sets when any host is preempted.
"""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging


class Preemption:
  """Installs SIGTERM and SIGINT handlers for the life of a run; `stop_at(step)` says whether to stop after it."""

  def __init__(self):
    self.requested = False
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame) -> None:
    del frame
    if signum == signal.SIGINT and self.requested:
      raise KeyboardInterrupt  # The second Ctrl-C: stop now; the last committed checkpoint stands.
    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    logging.warning("%s: will checkpoint at the next step boundary and exit%s.", name,
                    " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")
    self.requested = True

  def stop_at(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      return self.requested or multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def close(self) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}
