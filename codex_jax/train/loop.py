"""The training loop: setup, resume, a step loop with periodic log / eval / checkpoint, and a summary."""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
from absl import logging

from codex_jax.checkpoint import average
from codex_jax.checkpoint.load import committed_steps
from codex_jax.checkpoint.manager import Checkpointer, roots, state_leaf_hashes
from codex_jax.config.schema import Config
from codex_jax.config.workdir import check_config, config_hash, write_config
from codex_jax.data.sample_ids import batch_samples
from codex_jax.eval import report as eval_report
from codex_jax.eval.suite import Suite
from codex_jax.parallel.mesh import build_mesh
from codex_jax.runtime import feed
from codex_jax.runtime.inputs import RunInputs
from codex_jax.telemetry import flops, params_table, peak, plot
from codex_jax.telemetry.goodput import Goodput
from codex_jax.telemetry.profile import StepProfiler
from codex_jax.telemetry.progress import Progress
from codex_jax.telemetry.writer import MetricsWriter
from codex_jax.train import batch_ramp, guard, noise_scale
from codex_jax.train.ledger import SampleLedger
from codex_jax.train.preemption import Preemption
from codex_jax.train.report import Reporter
from codex_jax.train.setup import build_trainer, xla_model_flops
from codex_jax.workdir import writer_lock


def train(cfg: Config, config_dict: dict[str, Any], workdir: str, *, progress: bool = True,
          profile_steps: tuple[int, int] | None = None) -> dict[str, Any]:
  """Trains `cfg` in `workdir`, resuming from its latest checkpoint; returns a run summary. Process 0, the one
  that writes, holds the workdir's writer lock throughout (a second writer is refused: codex_jax/workdir.py).
  `profile_steps` (first, last) traces those steps with jax.profiler (telemetry/profile.py)."""
  if jax.process_index() != 0:
    return _train(cfg, config_dict, workdir, progress=progress, profile_steps=profile_steps)
  with writer_lock(workdir):
    return _train(cfg, config_dict, workdir, progress=progress, profile_steps=profile_steps)


def _train(cfg: Config, config_dict: dict[str, Any], workdir: str, *, progress: bool,
           profile_steps: tuple[int, int] | None) -> dict[str, Any]:
  is_main = jax.process_index() == 0
  total_steps, seq_len = cfg.train.steps, cfg.data.seq_len
  clock = Goodput()  # Where the wall-clock goes from here (telemetry/goodput.py).

  # 1. Workdir: a rerun must mean the same run (config diff refused outside the allow-list). Nothing
  #    is written into the workdir until every check below has passed.
  for change in check_config(workdir, config_dict):
    logging.info("Config change accepted on resume: %s", change)
  # 1b. A finished run has nothing to do: said before anything is built or compiled.
  committed = committed_steps(workdir)
  if committed and committed[-1] >= total_steps:
    logging.info("Nothing to train: the run in %s is finished (its last checkpoint is step %d, train.steps=%d); "
                 "raise --config.train.steps to continue it.", workdir, committed[-1], total_steps)
    return {"start_step": committed[-1], "final_step": committed[-1], "finished": True,
            "workdir": os.path.abspath(workdir), "checkpoints": committed}

  # 2. Mesh, and the layout each checkpoint's lineage record names.
  mesh = build_mesh(cfg.mesh)
  layout = {"mesh": dict(mesh.shape), "devices": mesh.size, "processes": jax.process_count(),
            "device_kind": jax.devices()[0].device_kind}
  logging.info("Mesh %s", describe_layout(layout))

  # 3. Data: manifest, licence policy, validated file indexes, tokenizer, manifest hash (fails early).
  inputs = RunInputs.create(cfg, workdir, is_main)
  evaluating = cfg.data.eval_fraction > 0 and cfg.eval.batches > 0
  if evaluating:
    inputs.eval_iterator(0).close()  # Fails now, not at the first eval, if no source holds eval records.

  # 4. Model on the mesh, optimizer, the state's shardings and the jitted step (nothing allocated yet).
  trainer = build_trainer(cfg, mesh, phase_starts={p.name: p.start_step for p in inputs.plan.manifest.phases})
  engine = trainer.engine
  to_global = lambda batch: feed.to_global(batch, engine.data_sharding)  # noqa: E731
  if engine.pipeline is not None:
    s = engine.pipeline.schedule
    logging.info("Pipeline: %s schedule, %d stages x %d repeat(s), %d microbatches, %d ticks, bubble %.1f%%",
                 s.kind, s.stages, s.repeats, s.microbatches, s.ticks, 100 * s.bubble_fraction)

  # 4b. Eval suite: held-out loss per source and domain, and the task files (checked now, scored at evals).
  suite = Suite.create(cfg, inputs.plan, engine, to_global, inputs.eval_iterator,
                       limit=cfg.eval.task_examples) if evaluating else None

  # 5. Resume: (a) latest committed checkpoint, (b) its data record checked (process count, manifest
  #    hash, run phase), (c) state into this mesh's shardings (the layout may have changed), (d) the iterator.
  checkpointer = Checkpointer(workdir, cfg.checkpoint)
  start = checkpointer.latest_step()
  meta = None if start is None else checkpointer.read_meta(start)
  inputs.start(start or 0, meta)
  if start is not None:
    train_state = checkpointer.restore(start, trainer.restore_target(),
                                       inputs.batches if inputs.restore_iterator else None,
                                       meta=meta, allow_dtype_change=cfg.checkpoint.allow_dtype_change)
    logging.info("Resumed from step %d in %s (lineage %s)", start, checkpointer.directory, checkpointer.parent)
    _log_layout_change(meta["lineage"].get("layout"), layout)
  else:
    start, train_state = 0, trainer.init_state()
    checkpointer.start_fresh({"kind": "init", "seed": cfg.train.seed,
                              "content_root": roots(state_leaf_hashes(train_state))["content_root"]})
  if is_main:
    write_config(workdir, config_dict)
    inputs.write_record(workdir)
  if is_main:
    logging.info("Parameters:\n%s", params_table.param_table(train_state.params))

  # 6. Telemetry, and the noise probe with its moving averages as the checkpoint left them (the batch
  #    ramp's cap reads them, so a resumed run draws the uninterrupted run's batch sizes).
  writer = MetricsWriter(workdir, enabled=is_main, resume_step=start)
  noise = noise_scale.Probe.create(cfg, engine, writer.write)  # Off: a no-op.
  noise.restore((meta or {}).get("noise_scale"))

  def next_update(step: int) -> tuple[dict, dict, int]:
    """Update `step`'s rows on this process, its data metrics and k, its micro-batches (train/batch_ramp.py)."""
    k = batch_ramp.micro_batches(cfg.train, step, noise.b_simple)
    with clock.timing("data"):
      batch, data_metrics = inputs.next_update(step, k)
    feed.check_batch(batch, k * inputs.local_batch, seq_len, cfg.model.vocab_size, cfg.model.feature_dim)
    return batch, data_metrics, k

  # 7. Compile ahead of time, once per k (one k unless the batch ramps), and count FLOPs both ways.
  batch, data_metrics, k = next_update(start)
  compiled: dict[int, Any] = {}

  def compiled_for(k: int, state, global_batch):
    if k not in compiled:
      with clock.timing("compile"):
        compiled[k] = trainer.train_step.lower(state, global_batch).compile()
      logging.info("Compiled the train step for %d micro-batch(es) of %d rows per update", k, cfg.train.micro_batch)
    return compiled[k]

  compiled_for(k, train_state, to_global(batch))
  cost = flops.step_flops(cfg, cfg.train.global_batch, cfg.train.grad_accum)  # Of a whole update.
  model_flops, flops_per_token = cost.mean, cost.mean / (cfg.train.global_batch * seq_len)
  # Of the first update's rows, on a measuring step; only when asked (it lowers the step again).
  xla_counted = xla_model_flops(cfg, mesh, to_global(batch)) if cfg.train.xla_flop_check else None
  xla_per_row = cost.mean_of(xla_counted) / (k * cfg.train.micro_batch) if xla_counted else None
  xla_flops = xla_per_row * cfg.train.global_batch if xla_per_row else None
  peak_flops = peak.peak_flops(cfg.model.compute_dtype)
  logging.info("Model FLOPs/step %.3e (analytic; %.3e on a tuner-measuring step), %s (XLA); peak %.3e FLOP/s (%s)",
               model_flops, cost.measuring, f"{xla_flops:.3e}" if xla_flops else "n/a", peak_flops.total,
               peak_flops.source)
  reporter = Reporter(writer, Progress(total_steps, start, cfg.train.global_batch * seq_len, enabled=is_main and progress),
                      seq_len=seq_len, flops_per_token=flops_per_token, xla_flops_per_row=xla_per_row,
                      peak_flops=peak_flops, log_every=cfg.train.log_every, clock=clock,
                      ledger=SampleLedger(workdir, jax.process_index(), resume_step=start,
                                          process_count=jax.process_count()))

  # 8. The step loop. Each update is k micro-batches (the ramp's k for that step); steps count updates. Step
  #    i+1 is dispatched before step i's metrics are fetched. Eval comes before the save of the same step, so
  #    its score goes into the lineage record. On any error the checkpointer still finishes the save in
  #    flight, so the last committed step stays usable.
  eval_loss, evaluated_at, pending, preempted = None, None, None, False
  preemption, snapshot_clock = Preemption(), average.SnapshotClock(cfg.checkpoint)
  profiler = StepProfiler(profile_steps, workdir, enabled=is_main)
  try:
    if evaluating and cfg.eval.at_start and start == 0:  # The untrained model's scores: every curve's origin.
      with clock.timing("eval"):
        scores = suite.evaluate(0, train_state.params, target_params=getattr(train_state, "target_params", None))
      reporter.eval(0, scores["heldout_loss"], scores)
    for step in range(start, total_steps):
      global_batch = to_global(batch)
      noise.maybe_measure(step, train_state.params, global_batch)  # Before the update donates the params.
      profiler.before(step + 1)
      step_fn = compiled_for(k, train_state, global_batch)
      with clock.timing("step"):
        train_state, metrics = step_fn(train_state, global_batch)
      profiler.after(step + 1, train_state)
      noise.collect()  # The update is queued behind the probe: waiting for the probe leaves the device busy.
      if pending is not None:
        reporter.step(*pending)
        guard.check_consecutive(reporter.last, cfg.train.max_consecutive_bad, pending[0])
      done = step + 1
      pending = (done, metrics, data_metrics, batch_samples(batch), k * cfg.train.micro_batch, k)
      if evaluating and (done % cfg.eval.every == 0 or done == total_steps):
        with clock.timing("eval"):
          scores = suite.evaluate(done, train_state.params, checkpointer, trainer.restore_target(),
                                  target_params=getattr(train_state, "target_params", None))
        eval_loss = scores["heldout_loss"]
        reporter.eval(done, eval_loss, scores)
        evaluated_at = done
      preempted = done < total_steps and preemption.stop_at(done)
      snapshot = average.is_snapshot(done, total_steps, cfg.eval.every, cfg.checkpoint) or snapshot_clock.due()
      if done % cfg.checkpoint.every == 0 or done == total_steps or preempted or snapshot:
        snapshot_clock.saved()
        scores = scores if evaluated_at == done else {"heldout_loss": None}
        with clock.timing("checkpoint"):
          checkpointer.save(done, train_state, inputs.batches, {**inputs.meta(), "noise_scale": noise.state()},
                            {"manifest_hash": inputs.plan.manifest_hash, "config_hash": config_hash(config_dict),
                             "eval": scores, "layout": layout})
      if preempted:
        logging.warning("Stopped: checkpointed step %d in %s; rerun the same command to resume from step %d.",
                        done, checkpointer.directory, done)
        break
      if done < total_steps:
        batch, data_metrics, k = next_update(done)
    if pending is not None:
      reporter.step(*pending)
  finally:
    with clock.timing("checkpoint"):  # The saves still in flight.
      _close_all(profiler.close, preemption.close, checkpointer.close, reporter.close, inputs.close)

  # 9. Finish: draw the curves, summarise.
  summary = {"start_step": start, "final_step": int(jax.device_get(train_state.step)),
             "eval_loss": eval_loss, "preempted": preempted, **reporter.summary(), **clock.summary(),
             "workdir": os.path.abspath(workdir),
             "checkpoints": checkpointer.all_steps(), "params": flops.param_counts(cfg.model)["total"],
             "model_flops_per_step": model_flops, "xla_flops_per_step": xla_flops,
             "peak_flops": peak_flops.total, "manifest_hash": inputs.plan.manifest_hash,
             "data_sources": [s.source.name for s in inputs.plan.sources],
             "data_excluded": {e.source: e.reason for e in inputs.plan.exclusions},
             "data_share_error": reporter.summary_value("data/max_share_error"),
             "mesh": layout["mesh"],
             "pipeline_bubble": None if engine.pipeline is None else engine.pipeline.schedule.bubble_fraction}
  metrics_file = os.path.join(workdir, "metrics.jsonl")
  if is_main and os.path.exists(metrics_file):
    summary["plot"] = plot.plot_metrics(metrics_file, os.path.join(workdir, "loss.png"))
    summary["eval_plot"] = eval_report.plot_scores(metrics_file, os.path.join(workdir, "eval.png"))
  return summary


def _close_all(*closers) -> None:
  """Calls every closer even when one fails (a full disk fails several); raises the first failure, unless an error
  is already on its way out (it is the one to report)."""
  failures = []
  for close in closers:
    try:
      close()
    except Exception as e:
      failures.append(e)
  raising = sys.exc_info()[1] is None
  for extra in failures[1 if raising else 0:]:
    logging.warning("also failed while closing: %s: %s", type(extra).__name__, extra)
  if failures and raising:
    raise failures[0]


def describe_layout(layout: dict[str, Any]) -> str:
  mesh = " x ".join(f"{axis}={size}" for axis, size in layout["mesh"].items() if size > 1) or "data=1"
  return f"{mesh} over {layout['devices']} {layout['device_kind']} device(s), {layout['processes']} process(es)"


def _log_layout_change(saved: dict[str, Any] | None, layout: dict[str, Any]) -> None:
  if saved is not None and saved != layout:
    logging.warning("Layout changed on resume: %s -> %s; the state is restored into the new shardings.",
                    describe_layout(saved), describe_layout(layout))
