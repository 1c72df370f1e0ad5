"""`codex eval --workdir=W [--step=N] [--average=K]`: score a checkpoint (or an average) and report by stage."""

from __future__ import annotations

import json
import os

from absl import flags

from codex_jax.cli import common  # noqa: F401  (--json)


def _define(kind, name, default, text):
  if name not in flags.FLAGS:  # `codex export` defines the same names; one command runs per process.
    getattr(flags, f"DEFINE_{kind}")(name, default, text)


_define("string", "workdir", None, "The run to evaluate.")
_define("integer", "step", None, "Checkpoint step (default: the latest).")
_define("integer", "average", None, "Evaluate the parameter average of the last K checkpoints up to --step.")
_define("integer", "examples", 0, "Examples per task (0: every example of every task file).")
_define("string", "tasks", None, "Task folders, comma-separated, and/or 'builtin' (default: the run's eval.tasks).")


def check(flag_values) -> None:
  if not flag_values.workdir:
    raise flags.ValidationError("--workdir is required, e.g. codex eval --workdir=runs/tiny")
  if flag_values.average is not None and flag_values.average < 1:
    raise flags.ValidationError(f"--average={flag_values.average}: expected a checkpoint count >= 1")
  if flag_values.examples < 0:
    raise flags.ValidationError(f"--examples={flag_values.examples}: expected 0 (all) or a positive count")


def run(flag_values):
  check(flag_values)
  from codex_jax.checkpoint.average import load_average
  from codex_jax.checkpoint.load import load_step
  from codex_jax.eval import report, suite
  from codex_jax.telemetry.plot import read_metrics

  workdir = flag_values.workdir
  count = flag_values.average or 1
  loaded = (load_average(workdir, count, flag_values.step) if count > 1
            else load_step(workdir, flag_values.step, with_target=True))
  evaluation = suite.offline(loaded, workdir, limit=flag_values.examples or None, tasks=flag_values.tasks)
  # A multimodal run's objective evals also need the EMA target encoder (None for an average: none kept).
  scores = evaluation.evaluate(loaded.step, loaded.params, target_params=loaded.target_params)
  metrics = os.path.join(workdir, "metrics.jsonl")
  records = read_metrics(metrics) if os.path.exists(metrics) else []
  result = report.build_report(records, scores, loaded.step)
  folder = os.path.join(workdir, "eval")
  os.makedirs(folder, exist_ok=True)
  name = f"step_{loaded.step}" + (f"_avg{count}" if count > 1 else "")
  with open(os.path.join(folder, f"{name}.json"), "w") as f:
    json.dump({"step": loaded.step, "average": loaded.record.get("steps"), "lineage_hash": loaded.record["lineage_hash"],
               "scores": scores, "report": result}, f, indent=1, sort_keys=True)
  result["path"] = os.path.join(folder, f"{name}.json")
  result["plot"] = report.plot_scores(metrics, os.path.join(folder, "eval.png")) if records else None
  if not flag_values.json:
    what = f"average of steps {loaded.record['steps']}" if count > 1 else f"step {loaded.step}"
    print(f"{workdir}: {what}\n{report.format_report(result)}\nwrote {result['path']}")
  return {"scores": scores, **result}
