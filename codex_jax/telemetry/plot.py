"""Training curves from `metrics.jsonl` as a PNG, one quantity per panel: the text cross-entropy (train and held
out), each other objective's own loss, the weighted total when there are several, learning rate, gradient norm."""

from __future__ import annotations

import io
import json
import os

# The Figure/Agg canvas pair needs no GUI and leaves pyplot's global state (and backend) untouched.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from codex_jax import atomic

OBJECTIVES = ("vision", "align", "world", "action")  # Beside text: their `loss_<name>` metrics (runtime/multimodal.py).


def panels(records: list[dict]) -> list[tuple[str, tuple[tuple[str, ...], ...]]]:
  """(panel title, series) for what the records hold; a series is a tuple of spellings, the first found wins.
  Different quantities never share an axis: the weighted total of several objectives gets its own panel."""
  has = lambda key: any(key in r for r in records)  # noqa: E731
  own = [name for name in OBJECTIVES if has(f"loss_{name}")]
  text = ("text cross-entropy", (("ce_loss", "loss", "train_loss"), ("eval_loss",)))
  if not own:  # Text only: the loss is the cross-entropy (plus a z-loss 1e-4 of it).
    return [text, ("learning rate", (("learning_rate", "lr"),)), ("grad norm", (("grad_norm", "gnorm"),))]
  return [text, *((f"{name} loss", ((f"loss_{name}",),)) for name in own),
          ("weighted total loss", (("loss",),)), ("learning rate", (("learning_rate", "lr"),)),
          ("grad norm", (("grad_norm", "gnorm"),))]


def read_metrics(metrics_jsonl: str) -> list[dict]:
  """Parsed lines of a metrics file; a torn or non-object line is skipped."""
  records = []
  with open(metrics_jsonl) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
        records.append(record)
  return records


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
  """(steps, values) of `key`, leaving out records without it and nulls (NaN/inf when written)."""
  points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
  return [p[0] for p in points], [float(p[1]) for p in points]


def plot_metrics(metrics_jsonl: str, out_png: str) -> str:
  """Writes the curves of `metrics_jsonl` to `out_png` (atomically) and returns its path."""
  records = read_metrics(metrics_jsonl)
  chosen = panels(records)
  fig = Figure(figsize=(6, 2.2 * len(chosen)), dpi=100, layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(len(chosen), 1, sharex=True, squeeze=False)[:, 0]
  for ax, (title, spellings) in zip(axes, chosen, strict=True):
    drawn = False
    for names in spellings:
      key = next((k for k in names if any(k in r for r in records)), None)
      if key is None:
        continue
      steps, values = series(records, key)
      if steps:
        # Markers when sparse: eval loss has few points and a lone point draws no line.
        ax.plot(steps, values, label=key, marker="o" if len(steps) < 30 else None, markersize=3)
        drawn = True
    if drawn:
      ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")  # Beside the data, never on it.
    else:
      ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_ylabel(title)
    ax.grid(alpha=0.3)
  axes[-1].set_xlabel("step")
  fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(metrics_jsonl))) or "metrics")

  return save_png(fig, out_png)


def save_png(fig, out_png: str) -> str:
  """Writes `fig` to `out_png` atomically (a reader never sees half a file); returns the path."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png")
  return atomic.write_bytes(out_png, buffer.getvalue())
