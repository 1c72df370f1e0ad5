"""Console progress bar for the step loop: step/total, rate, tokens/s, loss and ETA on stderr."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

from absl import logging
from tqdm import tqdm


class Progress:
  """A tqdm bar driven by absolute step numbers, so it can start mid-run after a resume.

  tqdm shows steps/s, or s/step once a step takes more than a second, and the ETA; the rate is an
  exponential moving average, so the compile time of the first step fades out after a few updates.
  """

  def __init__(self, total_steps: int, initial_step: int = 0, tokens_per_step: int = 0,
               enabled: bool = True, file=None):
    self.tokens_per_step = tokens_per_step
    self.enabled = enabled
    file = file or sys.stderr
    is_tty = hasattr(file, "isatty") and file.isatty()
    self._bar = tqdm(
        total=total_steps,
        initial=initial_step,
        file=file,
        unit="step",
        dynamic_ncols=is_tty,
        # A pipe or log file gets a new line per refresh; every 30 s keeps it readable.
        mininterval=0.1 if is_tty else 30.0,
        smoothing=0.1,
        disable=not enabled,
    )
    # On a terminal, log lines go above the bar instead of through it: the bar is cleared while the log
    # handler writes a record, and drawn again after it.
    self._log_handler = None
    if enabled and is_tty:
      self._log_handler = logging.get_absl_handler().python_handler
      emit = self._log_handler.emit

      def emit_above_the_bar(record):
        self._bar.clear()
        emit(record)
        self._bar.refresh()

      self._log_handler.emit = emit_above_the_bar

  def update(self, step: int, loss: float | None = None, extra: Mapping[str, Any] | None = None,
             tokens: int | None = None) -> None:
    """Moves the bar to `step` (steps done) and shows loss, tokens/s and any `extra` values; `tokens`: this
    step's tokens, when steps differ in size (a batch-size ramp), else the constructor's tokens_per_step."""
    if not self.enabled:
      return
    postfix = {}
    if loss is not None:
      postfix["loss"] = _fmt(loss)
    fmt = self._bar.format_dict
    # tqdm's smoothed rate exists only after its first refresh; until then, the plain average.
    rate = fmt.get("rate") or ((fmt["n"] - fmt["initial"]) / fmt["elapsed"] if fmt["elapsed"] else 0)
    tokens = self.tokens_per_step if tokens is None else tokens
    if tokens and rate:
      postfix["tok/s"] = _si(rate * tokens)
    for name, value in (extra or {}).items():
      postfix[name] = _fmt(value)
    self._bar.set_postfix(postfix, refresh=False)
    self._bar.update(int(step) - self._bar.n)

  def write(self, message: str) -> None:
    """Prints a line above the bar without breaking it."""
    if self.enabled:
      self._bar.write(message, file=self._bar.fp)

  def close(self) -> None:
    self._bar.close()
    if self._log_handler is not None:
      del self._log_handler.emit  # The class's own again.
      self._log_handler = None

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _fmt(value: Any) -> str:
  try:
    value = float(value)
  except (TypeError, ValueError):
    return str(value)
  if math.isfinite(value) and value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
    return f"{value:.3g}"
  return f"{value:.4f}"


def _si(value: float) -> str:
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(value) >= scale:
      return f"{value / scale:.2f}{unit}"
  return f"{value:.0f}"
