"""Per-step telemetry: fetches a step's metrics, adds throughput and MFU, writes and logs them."""

from __future__ import annotations

import math
import time

import jax
import numpy as np
from absl import logging

from codex_jax.config.schema import OBJECTIVES
from codex_jax.telemetry import peak
from codex_jax.telemetry.goodput import Goodput, summary_line
from codex_jax.telemetry.progress import Progress
from codex_jax.telemetry.writer import MetricsWriter
from codex_jax.train.ledger import SampleLedger


class Reporter:
  """Turns each step's device metrics into TensorBoard / metrics.jsonl rows, a log line and the bar.

  With a `ledger`, each step's trained samples go to samples.jsonl at the same moment (train/ledger.py).
  Each row carries the run's goodput so far and where the time went since the previous row (`clock`).
  Tokens and FLOPs are per update: its rows (accumulated micro-batches, train/batch_ramp.py) x seq_len.
  """

  def __init__(self, writer: MetricsWriter, bar: Progress, *, seq_len: int, flops_per_token: float,
               xla_flops_per_row: float | None, peak_flops: peak.PeakFlops, log_every: int,
               ledger: SampleLedger | None = None, clock: Goodput | None = None):
    self.writer, self.bar, self.ledger = writer, bar, ledger
    self.clock = clock or Goodput()
    self.seq_len, self.flops_per_token, self.xla_flops_per_row = seq_len, flops_per_token, xla_flops_per_row
    self.peak_flops, self.log_every = peak_flops, log_every
    self.last: dict | None = None
    self.first: dict | None = None
    self.last_time = time.perf_counter()
    self._speeds: list[tuple[float, float]] = []  # (tokens/s, MFU) of each row, for the summary's medians.

  def step(self, step: int, metrics, host_metrics: dict[str, float] | None, samples: list[list[int]] | None,
           rows: int, accum: int = 1) -> None:
    """Blocks until `metrics` (of update number `step`) are on the host; the next step is already queued.

    `host_metrics` are the step's host-side numbers (the data accounting), written alongside;
    `samples` its ledger entries (data/sample_ids.batch_samples); `rows` the update's global rows, `accum`
    its micro-batches (logged as batch/rows, batch/accum).
    """
    with self.clock.timing("step"):  # The device finishing the update: productive time.
      scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
    scalars.update(host_metrics or {})
    scalars.update(self.clock.scalars())
    now = time.perf_counter()
    step_time, self.last_time = now - self.last_time, now
    tokens = rows * self.seq_len
    model_flops = self.flops_per_token * tokens
    scalars.update({"batch/rows": rows, "batch/accum": accum}, step_time=step_time, tokens_per_s=tokens / step_time,
                   model_tflops_per_s=model_flops / step_time / 1e12,
                   mfu=peak.mfu(model_flops / step_time, self.peak_flops))
    if self.xla_flops_per_row:
      scalars["mfu_xla"] = peak.mfu(self.xla_flops_per_row * rows / step_time, self.peak_flops)
    if not math.isfinite(scalars["loss"]):
      logging.warning("Step %d: non-finite loss %s", step, scalars["loss"])
    self.writer.write(step, scalars)
    if self.ledger is not None and samples is not None:
      self.ledger.write(step, samples)
    # The headline is the text cross-entropy: with several objectives `loss` is their weighted sum, whose
    # weights the tuner moves, so it can rise while every objective falls.
    self.bar.update(step, extra={"text_ce": text_ce(scalars)}, tokens=tokens)
    self.first = self.first or scalars
    self.last = scalars
    self._speeds.append((scalars["tokens_per_s"], scalars["mfu"]))
    if step % self.log_every == 0 or step <= 3:
      logging.info("%s", console_line(step, scalars))

  def eval(self, step: int, loss: float | None, scores: dict[str, float | None] | None = None) -> None:
    loss = float("nan") if loss is None else loss
    self.writer.write(step, {"eval_loss": loss,
                             **{k: v for k, v in (scores or {}).items() if v is not None and k != "heldout_loss"}})
    logging.info("step %d eval_loss %.4f", step, loss)

  def summary_value(self, name: str) -> float | None:
    return (self.last or {}).get(name)

  def summary(self) -> dict:
    first, last = self.first or {}, self.last or {}
    return {"first_loss": first.get("loss"), "last_loss": last.get("loss"),
            "first_text_ce": text_ce(first), "last_text_ce": text_ce(last),
            **self._median_speed()}

  def _median_speed(self) -> dict[str, float | None]:
    """Median tokens/s and MFU over the rows: a row's time also holds any eval or save before it (its step ran
    on the device meanwhile), so the last row alone can read far below the training speed."""
    if not self._speeds:
      return {"tokens_per_s": None, "mfu": None}
    tokens, mfu = np.median(np.asarray(self._speeds, float), axis=0)
    return {"tokens_per_s": float(tokens), "mfu": float(mfu)}

  def close(self) -> None:
    self.bar.close()
    self.writer.close()
    if self.ledger is not None:
      self.ledger.close()


def text_ce(scalars: dict[str, float]) -> float | None:
  """The text cross-entropy of a step's scalars (a text-only step without `ce_loss`: its loss)."""
  return scalars.get("ce_loss", scalars.get("loss"))


def console_line(step: int, scalars: dict[str, float]) -> str:
  """A step's log line: the text cross-entropy first; with other objectives, each one's loss and tuner weight,
  then their weighted total, labelled as such (text-only: the loss with z-loss and MTP)."""
  parts = [f"step {step}", f"text_ce {text_ce(scalars):.4f}"]
  others = [name for name in OBJECTIVES[1:] if f"loss_{name}" in scalars]
  if others:
    weight = lambda name: scalars.get(f"balance_weight_{name}", float("nan"))  # noqa: E731
    parts.append(f"(w {weight('text'):.2f})")
    parts += [f"{name} {scalars[f'loss_{name}']:.4g} (w {weight(name):.2f})" for name in others]
    parts.append(f"weighted total {scalars['loss']:.4f}")
  else:
    parts.append(f"loss {scalars['loss']:.4f}")
  parts.append(f"grad_norm {scalars['grad_norm']:.3f} lr {scalars['learning_rate']:.2e} "
               f"{scalars['tokens_per_s']:.0f} tok/s mfu {100 * scalars['mfu']:.1f}%")
  return " ".join(parts)


def summary_text(summary: dict) -> str:
  """The end of a run for a person (`codex train` without --json): what was trained, how it went, where it is."""
  if summary.get("finished"):
    return (f"Nothing to train: the run in {summary['workdir']} is finished at step {summary['final_step']}; "
            "raise --config.train.steps to continue it.")
  number = lambda value, spec: "n/a" if value is None else format(value, spec)  # noqa: E731
  steps = f"{summary['start_step']} -> {summary['final_step']}"
  if summary.get("preempted"):
    steps += f" (stopped; the same command resumes from step {summary['final_step']})"
  rows = [("steps", steps),
          ("text cross-entropy", f"{number(summary.get('first_text_ce'), '.4f')} -> "
                                 f"{number(summary.get('last_text_ce'), '.4f')}"),
          ("held-out loss", number(summary.get("eval_loss"), ".4f")),
          ("speed", f"{number(summary.get('tokens_per_s'), ',.0f')} tokens/s, MFU {number(summary.get('mfu'), '.1%')}"),
          ("goodput", summary_line(summary) if "time_s" in summary else "n/a"),
          ("checkpoints", ", ".join(str(s) for s in summary.get("checkpoints", [])) or "none"),
          ("workdir", f"{summary['workdir']} (metrics.jsonl, loss.png, eval.png, lineage.jsonl)")]
  width = max(len(name) for name, _ in rows)
  return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
