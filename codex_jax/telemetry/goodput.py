"""Goodput: where a run's wall-clock went, and the share of it spent training (as MaxText reports it).

From the moment `train()` starts (after imports and `jax.distributed`), each second is counted under one
kind: `step` (dispatching updates and waiting for their results: the productive time), `data` (building the
next update's batch on the host), `checkpoint` (the blocking part of a save and the wait for saves in
flight), `eval`, `compile`, and `other` (start-up: data plan, model setup, restore; probes; writing
telemetry). goodput = step / wall-clock. With asynchronous dispatch the host waits for the device in
`step`, so time the device computes while the host prepares data shows up as `step`, not `data`.
"""

from __future__ import annotations

import contextlib
import time

KINDS = ("step", "data", "checkpoint", "eval", "compile")


class Goodput:
  """Seconds by kind since `started`, in total and since the last `scalars()` (each metrics row's share)."""

  def __init__(self, started: float | None = None):
    self.started = time.perf_counter() if started is None else started
    self.totals = dict.fromkeys(KINDS, 0.0)
    self._since_row = dict.fromkeys(KINDS, 0.0)

  @contextlib.contextmanager
  def timing(self, kind: str):
    began = time.perf_counter()
    try:
      yield
    finally:
      self.add(kind, time.perf_counter() - began)

  def add(self, kind: str, seconds: float) -> None:
    self.totals[kind] += seconds
    self._since_row[kind] += seconds

  def scalars(self) -> dict[str, float]:
    """A metrics row's `time/<kind>_s` since the previous row, and the run's goodput so far."""
    row = {f"time/{kind}_s": seconds for kind, seconds in self._since_row.items()}
    self._since_row = dict.fromkeys(KINDS, 0.0)
    return {**row, "goodput": self.share()}

  def share(self) -> float:
    wall = time.perf_counter() - self.started
    return self.totals["step"] / wall if wall > 0 else 0.0

  def summary(self) -> dict[str, float]:
    """The end summary's part: wall-clock, seconds by kind (other: the rest) and goodput."""
    wall = time.perf_counter() - self.started
    seconds = {kind: round(s, 3) for kind, s in self.totals.items()}
    seconds["other"] = round(max(0.0, wall - sum(self.totals.values())), 3)
    return {"wall_s": round(wall, 3), "time_s": seconds, "goodput": self.share()}


def summary_line(summary: dict) -> str:
  """`goodput 81.2% of 120 s: step 97.4 s, data 3.1 s, ...` for the end-of-run table."""
  parts = ", ".join(f"{kind} {seconds:.1f} s" for kind, seconds in summary["time_s"].items() if seconds >= 0.05)
  return f"{summary['goodput']:.1%} of {summary['wall_s']:.0f} s: {parts}"
