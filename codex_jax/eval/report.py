"""Score histories from metrics.jsonl, the stage-aware report, and the PNG of every eval metric over steps.

The PNG has one row per task (and one for held-out loss): the continuous metric on the left (bits per
byte), accuracy and probability on the right; the snapshot average (`avg/`) is drawn dashed beside the
latest checkpoint. A multimodal run adds two rows for its per-objective evals (eval/objective_scores.py): held-out
losses (and the normalised world loss) and retrieval accuracy (exact pair and caption match, each with its
chance), then the model / baseline MSE ratios and the MSEs themselves (log scale).
"""

from __future__ import annotations

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from codex_jax.eval import selection
from codex_jax.telemetry.plot import read_metrics, save_png, series

PREFIXES = ("heldout/", "task/", "avg/", "objectives/")


def history(records: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
  """key -> (steps, values) for every eval key in the records."""
  keys = sorted({k for r in records for k in r if k.startswith(PREFIXES)})
  return {k: series(records, k) for k in keys}


def task_names(keys) -> list[str]:
  return sorted({k.split("/")[1] for k in keys if k.startswith("task/")})


def build_report(records: list[dict], scores: dict[str, float], step: int) -> dict:
  """The report at `step`: every task's scores with its selection, the weighted summary, held-out per source."""
  hist = history(records)
  names = task_names(list(hist) + list(scores))
  chosen = selection.select(hist, names)
  tasks = {n: {**{k.rsplit("/", 1)[1]: v for k, v in scores.items() if k.startswith(f"task/{n}/")}, **chosen[n]}
           for n in names}
  out = {"step": step, "tasks": tasks, "summary": {**selection.summary(scores, chosen),
                                                     **selection.summary(scores, chosen, "avg/")},
         "informative": [n for n in names if chosen[n]["informative"]],
         "heldout": {k: v for k, v in scores.items() if k.startswith(("heldout/", "avg/heldout/"))},
         "objectives": {k.split("/", 1)[1]: v for k, v in scores.items() if k.startswith("objectives/")}}
  return out


# (what, model key, baseline key, the baseline in words, ratio key, count key, unit): one report line each.
COMPARISONS = (
    ("reconstruction", "recon_mse", "recon_zero_mse", "predicting zero", "recon_ratio", "recon_patches", "patches"),
    ("world model", "world_mse", "world_copy_last_mse", "copy-last-chunk", "world_ratio", "world_transitions",
     "transitions"),
    ("world model / target variance", "world_nmse", "world_copy_last_nmse", "copy-last-chunk", "world_ratio",
     "world_transitions", "transitions"),
    ("sampled actions", "action_mse", "action_mean_mse", "mean action", "action_ratio", "action_chunks", "chunks"),
    ("mean of 8 sampled actions", "action_samples_mean_mse", "action_mean_mse", "mean action",
     "action_samples_mean_ratio", "action_chunks", "chunks"),
)


# (how a hit is counted, image->text key, text->image key, chance key, count key, unit): one line each.
RETRIEVALS = (
    ("top-1, exact pair", "retrieval_i2t", "retrieval_t2i", "retrieval_chance", "retrieval_pairs", "pairs"),
    ("top-1, caption match", "retrieval_caption_i2t", "retrieval_caption_t2i", "retrieval_caption_chance",
     "retrieval_captions", "distinct captions"),
    ("recall@10", "retrieval_i2t_r10", "retrieval_t2i_r10", "retrieval_r10_chance", "retrieval_pairs", "pairs"),
)


def objective_lines(o: dict) -> list[str]:
  """The per-objective evals (eval/objective_scores.py), one line per question, each beside its baseline."""
  if not o:
    return []
  g = lambda k: o.get(k) if o.get(k) is not None else float("nan")  # noqa: E731
  losses = ", ".join(f"{k[:-5]} {g(k):.4f}" for k in o if k.endswith("_loss"))
  if "align_chance" in o:
    losses += f" (align at chance {g('align_chance'):.4f})"
  if "world_nmse" in o:
    losses += f" (world / target variance {g('world_nmse'):.4f})"
  lines = [f"objectives held-out loss: {losses}"]
  for how, i2t, t2i, chance, count, unit in RETRIEVALS:
    if i2t in o:
      lines.append(f"retrieval {how}: image->text {g(i2t):.3f}, text->image {g(t2i):.3f} "
                   f"(chance {g(chance):.3f}, {g(count):.0f} {unit})")
  if "retrieval_i2t_rank" in o:
    lines.append(f"retrieval mean rank of the true partner (0 first, 0.5 chance): image->text "
                 f"{g('retrieval_i2t_rank'):.3f}, text->image {g('retrieval_t2i_rank'):.3f}")
  if "retrieval_cos_pair" in o:
    lines.append(f"align cosine: matched pairs {g('retrieval_cos_pair'):.3f} vs pairs of different captions "
                 f"{g('retrieval_cos_other'):.3f}")
  for what, model, baseline, against, ratio, count, unit in COMPARISONS:
    if count in o and model in o:
      lines.append(f"{what} MSE {g(model):.4f} vs {g(baseline):.4f} {against} "
                   f"(ratio {g(ratio):.3g}, {g(count):.0f} {unit})")
  return lines


def format_report(report: dict) -> str:
  lines = [f"step {report['step']}", f"{'task':22s} {'acc':>6s} {'acc_norm':>8s} {'prob':>6s} {'bpb':>7s} "
           f"{'snr':>6s} {'acc_snr':>7s} {'sat':>5s}  informative"]
  fmt = lambda v, w, p: f"{v:{w}.{p}f}" if isinstance(v, (int, float)) else f"{'-':>{w}s}"  # noqa: E731
  for name, t in report["tasks"].items():
    lines.append(f"{name:22s} {fmt(t.get('acc'), 6, 3)} {fmt(t.get('acc_norm'), 8, 3)} {fmt(t.get('prob'), 6, 3)} "
                 f"{fmt(t.get('bpb'), 7, 3)} {fmt(t.get('snr'), 6, 2)} {fmt(t.get('acc_snr'), 7, 2)} "
                 f"{fmt(t.get('saturation'), 5, 2)}  "
                 f"{'yes' if t['informative'] else 'no'} (weight {t['weight']:.2f})")
  for k, v in report["summary"].items():
    lines.append(f"{k}: {v:.4f}")
  for k in ("heldout/loss", "heldout/bpb", "avg/heldout/loss", "avg/heldout/bpb"):
    if report["heldout"].get(k) is not None:
      lines.append(f"{k}: {report['heldout'][k]:.4f}")
  lines += objective_lines(report.get("objectives", {}))
  return "\n".join(lines)


def _draw(ax, hist, keys: list[str], title: str) -> None:
  drawn = False
  for key in keys:
    color = None
    for name, style in ((key, "-"), (f"avg/{key}", "--")):  # The average in its checkpoint's colour, dashed.
      steps, values = hist.get(name, ([], []))
      if steps:
        label = key.rsplit("/", 1)[1] if key.startswith(("task/", "objectives/")) else key.replace("heldout/", "")
        line, = ax.plot(steps, values, style, color=color, marker="o", markersize=3,
                        label=label if style == "-" else f"{label} (avg)")
        color, drawn = line.get_color(), True
  if drawn:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="x-small")  # Beside the data, never on it.
  else:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
  ax.set_title(title, fontsize="small")
  ax.grid(alpha=0.3)


def plot_scores(metrics_jsonl: str, out_png: str) -> str | None:
  """Every eval metric over steps (see the module docstring); None when the run has no eval rows."""
  hist = history(read_metrics(metrics_jsonl))
  if not hist:
    return None
  names = task_names(hist)
  domains = sorted({k.split("/")[2] for k in hist if k.startswith("heldout/domain/") and k.endswith("/bpb")})
  objective_losses = [k for k in hist if k.startswith("objectives/") and k.endswith("_loss")]
  rows = 1 + len(names) + 2 * bool(objective_losses)
  fig = Figure(figsize=(13, 2.4 * rows), dpi=90, layout="constrained")  # Wider: legends sit beside each panel.
  FigureCanvasAgg(fig)
  axes = fig.subplots(rows, 2, squeeze=False)
  _draw(axes[0, 0], hist, ["heldout/bpb"], "held-out bits per byte (nats per token: heldout/loss in metrics.jsonl)")
  _draw(axes[0, 1], hist, [f"heldout/domain/{d}/bpb" for d in domains],
        "held-out bits per byte per domain (per source: metrics.jsonl)")
  for row, name in enumerate(names, start=1):
    _draw(axes[row, 0], hist, [f"task/{name}/bpb"], f"{name}: bits per byte of the gold continuation")
    mc = f"task/{name}/acc_norm" in hist  # A cloze task's prob is of a whole line: not on this scale.
    _draw(axes[row, 1], hist, [f"task/{name}/{m}" for m in (("acc", "acc_norm", "prob") if mc else ("acc",))],
          f"{name}: accuracy" + (" and p(gold)" if mc else " (greedy exact match)"))
  if objective_losses:
    o = lambda *keys: [f"objectives/{k}" for k in keys]  # noqa: E731
    _draw(axes[-2, 0], hist, objective_losses + o("align_chance", "world_nmse"), "held-out loss per objective")
    _draw(axes[-2, 1], hist, o("retrieval_i2t", "retrieval_t2i", "retrieval_chance", "retrieval_caption_i2t",
                               "retrieval_caption_t2i", "retrieval_caption_chance", "retrieval_i2t_rank",
                               "retrieval_t2i_rank"),
          "retrieval: top-1 exact / caption match with chances; mean rank (chance 0.5)")
    _draw(axes[-1, 0], hist, o("recon_ratio", "world_ratio", "action_ratio"),
          "model / baseline MSE (< 1 beats the baseline)")
    _draw(axes[-1, 1], hist, o("recon_mse", "recon_zero_mse", "world_mse", "world_copy_last_mse", "action_mse",
                               "action_mean_mse"), "MSE of each model and its baseline")
    for ax in axes[-1]:
      if ax.has_data():
        ax.set_yscale("log")  # Ratios and errors span decades early in a run.
  for ax in axes[-1]:
    ax.set_xlabel("step")
  return save_png(fig, out_png)
