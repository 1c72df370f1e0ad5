"""An IsoFLOP sweep of tiny models: plan the runs for each FLOP budget, train them, collect a RUNS file.

For each budget C a few model sizes N spaced evenly in log between `params_range` are trained for
steps = round(C / (6 N tokens_per_step)); the point recorded is the model's parameter count, the tokens it
actually saw (steps x tokens_per_step) and its final held-out loss. A CPU budget of tens of minutes holds
models of 20k-500k parameters, so the widths go far below shape.py's 128 (d_model 16 to 128, head_dim 16)
and every run uses a sweep-local vocabulary (`codex scaling sweep --sweep-vocab`, 512 by default: at the
base config's 4,096 the embedding tables were 55-89% of the models and every size sat past its IsoFLOP
minimum). N counts the embeddings, as Hoffmann et al. and `codex plan` do, so that a FIT.json from the sweep
plans in the same unit; at vocabulary 512 the input table is 8-41% of N. Every run trains on a one-phase
copy of the manifest, so that no run's held-out loss is measured on a different mixture than another's.

RUNS.jsonl gains one line per finished run; a rerun skips the runs it already holds, and a run cut off
midway resumes from its own workdir's checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable

import numpy as np

from codex_jax.config.schema import TEXT_ONLY
from codex_jax.data.manifest import first_phase, write_manifest_file
from codex_jax.planning import shape

WIDTHS = (16, 24, 32, 48, 64, 96, 128)
HEAD_DIM = 16  # 1-8 heads over WIDTHS.
MLP_MULTIPLE = 16  # SwiGLU width 8/3 d_model rounded to 16, not shape.py's 256 (16x d_model at width 16).
ASPECT = (16, 64)  # d_model / layers: shape.py's 64-128 would hold every width here to one layer.
MIN_STEPS = 10


@dataclasses.dataclass(frozen=True)
class PlannedRun:
  name: str
  flops: float
  shape: shape.Shape
  steps: int
  tokens: int
  vocab_size: int


def tiny_shape(target_params: float, vocab_size: int) -> shape.Shape:
  """The shape from WIDTHS x 1..8 layers nearest target_params, scored as shape.model_shape does (with ASPECT)."""
  candidates = (shape.shape_for(d, n, vocab_size, head_dim=HEAD_DIM, mlp_multiple=MLP_MULTIPLE)
                for d in WIDTHS for n in range(1, 9))
  return min(candidates, key=lambda s: shape.score(s, target_params, ASPECT))


def plan_runs(budgets: list[float], sizes_per_budget: int, params_range: tuple[float, float], vocab_size: int,
              tokens_per_step: int) -> list[PlannedRun]:
  """Runs per budget at sizes_per_budget distinct shapes; a size whose steps fall under MIN_STEPS is dropped."""
  runs = []
  for flops in budgets:
    targets = np.geomspace(*params_range, sizes_per_budget)
    shapes = {s.params: s for s in (tiny_shape(t, vocab_size) for t in targets)}.values()
    for s in shapes:
      steps = round(flops / (6 * s.params * tokens_per_step))
      if steps >= MIN_STEPS:
        runs.append(PlannedRun(f"C{flops:.0e}_d{s.d_model}_l{s.num_layers}".replace("+", ""), flops, s, steps,
                               steps * tokens_per_step, vocab_size))
  return runs


def one_phase_manifest(path: str, out: str) -> str:
  """A copy of the manifest at `path` with only its first phase (shares of the others dropped), written to out."""
  return write_manifest_file(first_phase(path)[0], out)


def finished(runs_file: str) -> dict[str, dict]:
  """Name -> record of the runs RUNS.jsonl already holds."""
  if not os.path.exists(runs_file):
    return {}
  with open(runs_file) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return {r["name"]: r for r in records}


def run_overrides(run: PlannedRun, manifest: str) -> dict:
  """Dotted config keys that turn the base experiment into this run (eval and checkpoint at the end only)."""
  model = {**run.shape.model_values(), "vocab_size": run.vocab_size}
  return {**{f"model.{k}": v for k, v in model.items()}, "data.manifest": manifest, "train.steps": run.steps,
          "train.log_every": max(1, run.steps // 10), "eval.every": run.steps, "checkpoint.every": run.steps,
          "eval.tasks": "",  # Held-out loss only: the task suite would cost more than a micro run.
          # The law is fitted to the text loss: the tiny experiment's other objectives would share the steps.
          "objectives.weights": TEXT_ONLY}


def sweep(out: str, runs: list[PlannedRun], train_one: Callable[[PlannedRun, str], dict],
          log: Callable[[str], None] = print) -> list[dict]:
  """Trains the runs RUNS.jsonl lacks (train_one(run, workdir) -> summary with eval_loss); returns all records."""
  os.makedirs(out, exist_ok=True)
  runs_file = os.path.join(out, "RUNS.jsonl")
  done = finished(runs_file)
  for i, run in enumerate(runs):
    if run.name in done:
      log(f"[{i + 1}/{len(runs)}] {run.name}: done already (loss {done[run.name]['loss']:.4f})")
      continue
    log(f"[{i + 1}/{len(runs)}] {run.name}: N={run.shape.params:,} D={run.tokens:,} ({run.steps} steps)")
    summary = train_one(run, os.path.join(out, "runs", run.name))
    loss = summary.get("eval_loss")
    if loss is None or not math.isfinite(loss):
      raise ValueError(f"run {run.name} ended without a finite held-out loss ({loss!r}); is data.eval_fraction > 0?")
    record = {"name": run.name, "flops": run.flops, "params": run.shape.params, "tokens": run.tokens,
              "steps": run.steps, "loss": float(loss),
              "shape": {**run.shape.model_values(), "vocab_size": run.vocab_size},
              "wall_s": summary.get("wall_s")}
    with open(runs_file, "a") as f:
      f.write(json.dumps(record) + "\n")
    done[run.name] = record
    log(f"    held-out loss {loss:.4f}")
  return [done[r.name] for r in runs]
