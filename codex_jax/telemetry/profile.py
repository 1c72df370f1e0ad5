"""`codex train --profile_steps=A:B`: a jax.profiler trace of steps A..B (1-based, inclusive) under WORKDIR/profile,
viewable in TensorBoard's profile plugin or Perfetto (ui.perfetto.dev opens its .trace.json.gz)."""

from __future__ import annotations

import os

from absl import logging

PROFILE_DIR = "profile"


def parse_steps(text: str | None) -> tuple[int, int] | None:
  """"A:B" -> (A, B) with 1 <= A <= B; None for none; ValueError naming the flag and what was expected."""
  if not text:
    return None
  first, sep, last = text.partition(":")
  if not sep or not first.isdigit() or not last.isdigit() or not 1 <= int(first) <= int(last):
    raise ValueError(f"--profile_steps={text!r}: expected A:B, the first and last step to trace, 1 <= A <= B")
  return int(first), int(last)


class StepProfiler:
  """Starts the trace before step A is dispatched and stops it once step B's update has finished."""

  def __init__(self, steps: tuple[int, int] | None, workdir: str, enabled: bool = True):
    self.steps, self.folder, self.active = steps if enabled else None, os.path.join(workdir, PROFILE_DIR), False

  def before(self, step: int) -> None:
    if self.steps and step == self.steps[0]:
      import jax  # Here: `codex train` parses the flag before it imports jax.
      jax.profiler.start_trace(self.folder, create_perfetto_trace=True)
      self.active = True

  def after(self, step: int, state) -> None:
    if self.active and step >= self.steps[1]:
      import jax
      jax.block_until_ready(state)  # Dispatch is asynchronous: the trace ends when the work does.
      self.close()
      logging.info("Profiled steps %d-%d: %s (TensorBoard's profile tab, or Perfetto)", *self.steps, self.folder)

  def close(self) -> None:
    if self.active:
      import jax
      self.active = False
      jax.profiler.stop_trace()
