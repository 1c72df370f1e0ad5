"""Stage-aware task selection: which scores still move faster than they wobble, and which have saturated.

Over the last `window` evaluations of a metric, a least-squares line gives the trend; the signal is the
line's change across the window, the noise the standard deviation of the points around it (step-to-step
noise), and SNR = signal / noise. An accuracy whose recent mean is at least SATURATED is saturated. A task
is informative at this stage when its continuous metric (bpb) has SNR >= MIN_SNR and its accuracy has not
saturated; the summary weighs tasks by min(SNR, CAP) when informative and 0 otherwise (all equally while
the history is shorter than 3 evaluations, or when no task is informative).
"""

from __future__ import annotations

import math

import numpy as np

MIN_SNR = 2.0
CAP = 10.0
SATURATED = 0.95
WINDOW = 8


def trend_snr(steps: list[float], values: list[float], window: int = WINDOW) -> float | None:
  """|fitted change over the window| / residual std; None with fewer than 3 points."""
  x, y = np.asarray(steps[-window:], np.float64), np.asarray(values[-window:], np.float64)
  if len(x) < 3 or np.ptp(x) == 0:
    return None
  slope, intercept = np.polyfit(x, y, 1)
  residual = y - (slope * x + intercept)
  noise = math.sqrt(float(np.sum(residual ** 2)) / (len(x) - 2))
  signal = abs(slope) * float(np.ptp(x))
  if noise == 0:  # A perfect line: all signal, or (a constant) none.
    return CAP * 100 if signal > 0 else 0.0
  return float(signal / noise)  # A Python float: a numpy one makes numpy bools that json refuses (codex eval).


def select(history: dict[str, tuple[list[float], list[float]]], tasks: list[str]) -> dict[str, dict]:
  """Per task: snr (of bpb and of acc), saturation (recent acc), informative, weight."""
  out = {}
  for name in tasks:
    bpb, acc = history.get(f"task/{name}/bpb", ([], [])), history.get(f"task/{name}/acc", ([], []))
    snr = trend_snr(*bpb)
    saturation = float(np.mean(acc[1][-3:])) if acc[1] else None
    saturated = saturation is not None and saturation >= SATURATED
    informative = snr is not None and snr >= MIN_SNR and not saturated
    out[name] = {"snr": snr, "acc_snr": trend_snr(*acc), "saturation": saturation, "informative": informative,
                 "weight": min(snr, CAP) if informative else 0.0, "points": len(bpb[0])}
  if not any(v["weight"] for v in out.values()):
    for v in out.values():
      v["weight"] = 1.0
  return out


def summary(scores: dict[str, float], selected: dict[str, dict], prefix: str = "") -> dict[str, float]:
  """summary/acc and summary/bpb: the tasks' scores weighted by selection."""
  out = {}
  for metric in ("acc", "bpb"):
    pairs = [(v["weight"], scores.get(f"{prefix}task/{name}/{metric}")) for name, v in selected.items()]
    pairs = [(w, s) for w, s in pairs if s is not None and w > 0]
    if pairs:
      out[f"{prefix}summary/{metric}"] = sum(w * s for w, s in pairs) / sum(w for w, _ in pairs)
  return out
