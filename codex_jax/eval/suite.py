"""Everything evaluated for one set of parameters: held-out loss per source and domain, and the tasks.

Built once per run (tasks loaded and checked, the scoring step jitted with the run's shardings); in the
training loop `evaluate` returns one flat score vector per eval step, with the average of the snapshot
window under `avg/` when one is ready. `codex eval` builds the same suite on one device.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from codex_jax.cache import cache_dir
from codex_jax.checkpoint import average
from codex_jax.config.schema import Config
from codex_jax.data.batches import encode_spec
from codex_jax.data.encode import Encoder
from codex_jax.data.tokenizer import pinned_path
from codex_jax.eval import builtin, heldout, score
from codex_jax.eval.objective_scores import ObjectiveEval
from codex_jax.eval.tasks import Task, TaskError, load_tasks
from codex_jax.objectives import mtp as mtp_objective
from codex_jax.runtime import feed, forward
from codex_jax.runtime.engine import Engine, one_device
from codex_jax.runtime.inputs import RunInputs


def builtin_folder() -> str:
  """Where the built-in task files live (per Python version: code and facts come from its stdlib)."""
  py = "".join(platform.python_version_tuple()[:2])
  return os.path.join(cache_dir(), f"eval-tasks-v{builtin.VERSION}-py{py}")


def task_folders(spec: str, images: bool) -> list[str]:
  """eval.tasks -> folders: "builtin" (written on first use) and user folders, comma-separated."""
  folders = []
  for part in (p.strip() for p in spec.split(",") if p.strip()):
    if part == "builtin":
      folders.append(builtin.write_builtin(builtin_folder(), images=images))
    elif not os.path.isdir(part):
      raise TaskError(f"config.eval.tasks: {part!r} is neither 'builtin' nor a folder of *.jsonl task files")
    else:
      folders.append(part)
  return folders


def make_runner(cfg: Config, engine: Engine, to_global) -> Callable[..., dict[str, np.ndarray]]:
  """(params, host batch, mtp=False) -> score.token_scores as numpy, one jit on the run's engine.

  With mtp=True and model.mtp_depth > 0 the same forward also gives the MTP depths' held-out sums
  (objectives/mtp.py `mtp_*` keys); task scoring leaves them out.
  """
  def scores(params, batch, mtp: bool):
    if not mtp:
      logits = forward.logits_fn(params, batch, model=engine.model, pipeline=engine.pipeline)
      return score.token_scores(logits, batch["targets"])
    logits, mtp_logits = forward.outputs_fn(params, batch, model=engine.model, pipeline=engine.pipeline)
    return score.token_scores(logits, batch["targets"]) | mtp_objective.mtp_sums(mtp_logits, logits, batch)

  jitted = {mtp: engine.jit(functools.partial(scores, mtp=mtp), in_shardings=(engine.param_shardings,
                                                                              engine.data_sharding))
            for mtp in (False, True)}
  with_mtp = cfg.model.mtp_depth > 0
  return lambda params, batch, mtp=False: jax.device_get(jitted[mtp and with_mtp](params, to_global(batch)))


def _local_rows(batch: dict) -> dict:
  """This process's rows of a batch every process built whole (task batches)."""
  n, i = jax.process_count(), jax.process_index()
  rows = len(batch["inputs"]) // n
  return {k: v[i * rows:(i + 1) * rows] for k, v in batch.items()}


@dataclasses.dataclass
class Suite:
  cfg: Config
  run: Callable[[Any, dict], dict]     # make_runner's function.
  tasks: list[Task]
  encode: Callable[[str], list[int]]
  media_fn: Callable[[np.ndarray], np.ndarray]
  byte_table: np.ndarray
  names: dict[int, str]                # source id -> name
  domains: dict[int, str]              # source id -> kind
  eval_batches: Callable[[int], Any] | None  # step -> held-out batch iterator
  prepared: list | None = None         # score.prepare: the tasks' requests, tokenized and checked once.
  objectives: ObjectiveEval | None = None  # Per-objective evals (eval/objective_scores.py) of a multimodal run.

  @classmethod
  def create(cls, cfg: Config, plan, engine: Engine, to_global, eval_batches, *, limit: int | None) -> Suite:
    images = cfg.model.feature_dim > 0
    tasks = load_tasks(task_folders(cfg.eval.tasks, images), limit)
    encoder = Encoder(plan.tokenizer, encode_spec(cfg.data, cfg.model.feature_dim), 0, {})
    media_fn = lambda image: encoder.spans({"image": image})[0][1]  # noqa: E731
    encode = lambda text: plan.tokenizer.encode(text).ids  # noqa: E731
    prepared = score.prepare(tasks, encode, cfg.data.seq_len, media_fn)  # Fails before training, naming the file.
    objectives = (ObjectiveEval.create(cfg, engine, to_global)
                  if engine.spec is not None and eval_batches is not None else None)
    return cls(cfg, make_runner(cfg, engine, to_global), tasks, encode, media_fn,
               heldout.token_bytes(plan.tokenizer, cfg.model.vocab_size),
               {s.source_id: s.source.name for s in plan.sources}, {s.source_id: s.source.kind for s in plan.sources},
               eval_batches, prepared, objectives)

  def scores(self, params, step: int) -> dict[str, float]:
    """The flat score vector of `params`: heldout/... and task/<name>/<metric>."""
    out: dict[str, float] = {}
    if self.eval_batches is not None:
      run = functools.partial(self.run, params, mtp=True)
      out.update(heldout.heldout_scores(self.eval_batches(step), run, num_batches=self.cfg.eval.batches,
                                        byte_table=self.byte_table, names=self.names, domains=self.domains))
    rows, seq_len = self.cfg.train.micro_batch, self.cfg.data.seq_len  # One micro-batch: the memory trained in.
    out.update(score.score_tasks(self.tasks, self.encode, lambda b: self.run(params, _local_rows(b)), rows=rows,
                                 seq_len=seq_len, feature_dim=self.cfg.model.feature_dim, media_fn=self.media_fn,
                                 prepared=self.prepared))
    return out

  def evaluate(self, step: int, params, checkpointer=None, restore_target=None,
               target_params=None) -> dict[str, float]:
    """Scores of `params` at `step`; with a checkpointer, also the snapshot average ending here (`avg/...`).

    A multimodal run's per-objective evals (`objectives/...`) are of `params` and `target_params` (the EMA
    target encoder's, from the same state) alone: an average has no target encoder to go with it.
    """
    out = self.scores(params, step)
    if self.objectives is not None:
      # One pass for every eval of a run: the first mixture phase's batches. Align and vision are contrastive
      # within a batch, so a later phase's mix (other pairs per batch) would move their losses by itself.
      out.update(self.objectives.scores(params, target_params, lambda: self.eval_batches(0)))
    if checkpointer is not None and average.enabled(self.cfg.checkpoint):
      averaged = self.average_params(step, params, checkpointer, restore_target)
      if averaged is not None:
        out.update({f"avg/{k}": v for k, v in self.scores(averaged, step).items()})
    out = {k: (float(v) if np.isfinite(v) else None) for k, v in out.items()}  # JSON and lineage records: null.
    return {"heldout_loss": out.get("heldout/loss"), **out}

  def average_params(self, step: int, params, checkpointer, restore_target):
    """The weighted mean of the snapshots before `step` (restored from disk) and `params`; None if not all saved."""
    checkpointer.wait_for_saves()
    steps = average.window(step, self.cfg.checkpoint, checkpointer.all_steps())
    if not steps:
      return None
    missing = [s for s in steps[:-1] if s not in checkpointer.all_steps()]
    if missing:
      logging.info("Step %d: no snapshot average (snapshots %s are not on disk)", step, missing)
      return None
    trees = [checkpointer.restore_params(s, restore_target.params, meta=checkpointer.read_meta(s),
                                         allow_dtype_change=self.cfg.checkpoint.allow_dtype_change)
             for s in steps[:-1]]
    return average.mean_params([*trees, params], self.cfg.checkpoint)


def offline(loaded, workdir: str, *, limit: int | None, tasks: str | None = None) -> Suite:
  """The suite for a loaded checkpoint (checkpoint/load.py) on one device: `codex eval`, `codex average`."""
  cfg = loaded.cfg
  data = cfg.data if cfg.data.tokenizer_path else dataclasses.replace(
      cfg.data, tokenizer_path=pinned_path(workdir))  # The run's own, pinned at its start.
  cfg = dataclasses.replace(cfg, data=data, eval=dataclasses.replace(cfg.eval, tasks=cfg.eval.tasks if tasks is None
                                                                       else tasks))
  engine = one_device(cfg)
  inputs = RunInputs.create(cfg, workdir, is_main=False)
  eval_batches = inputs.eval_iterator if cfg.data.eval_fraction > 0 and cfg.eval.batches > 0 else None
  return Suite.create(cfg, inputs.plan, engine, lambda b: feed.to_global(b, engine.data_sharding), eval_batches,
                      limit=limit)
