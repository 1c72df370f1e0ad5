"""SIGTERM and a first Ctrl-C mean "save and stop": the loop checks this at each step boundary.

On a cluster the scheduler sends SIGTERM some time before killing a job; the step in flight finishes,
that step is checkpointed (unless it just was), and the run exits 0 so a requeue resumes from it. Ctrl-C
(SIGINT) does the same, so an interrupted run at a terminal keeps its progress; a second Ctrl-C stops at once.

With several JAX processes every process must stop at the same step, or they enter the collective save
apart and hang. `jax.distributed.initialize` installs JAX's preemption notifier on SIGTERM: a SIGTERM to
any one process reaches the coordination service, which agrees with every process on one sync step
(`reached_preemption_sync_point`, a local check of a few microseconds per step: docs/results.md). So a
multi-process run leaves SIGTERM to JAX, and its Ctrl-C handler sends the process a SIGTERM.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
from absl import logging


class Preemption:
  """Installs the signal handlers for the life of a run; `stop_at(step)` says whether to stop after it."""

  def __init__(self):
    self.requested = False
    self._agreed = jax.process_count() > 1  # The stop step comes from JAX's coordination service.
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      signals = (signal.SIGINT,) if self._agreed else (signal.SIGTERM, signal.SIGINT)
      self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

  def _handle(self, signum, frame) -> None:
    del frame
    if signum == signal.SIGINT and self.requested:
      raise KeyboardInterrupt  # The second Ctrl-C: stop now; the last committed checkpoint stands.
    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    logging.warning("%s: will checkpoint at the next step boundary%s and exit%s.", name,
                    " all processes agree on" if self._agreed else "",
                    " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")
    self.requested = True
    if self._agreed:
      os.kill(os.getpid(), signal.SIGTERM)  # To JAX's notifier, which tells the other processes.

  def stop_at(self, step: int) -> bool:
    if self._agreed:
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def close(self) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}
