"""The training loop: setup, resume, a step loop with periodic log / eval / checkpoint, and a summary."""

from __future__ import annotations

import math
import os
import time
from typing import Any

import jax
from absl import logging

from codex_jax.checkpoint.manager import Checkpointer
from codex_jax.config.schema import Config
from codex_jax.data import corpus, pipeline, tokenizer
from codex_jax.parallel.mesh import build_mesh
from codex_jax.telemetry import flops, params_table, peak, plot
from codex_jax.telemetry.progress import Progress
from codex_jax.telemetry.writer import MetricsWriter
from codex_jax.train import feed
from codex_jax.train.setup import build_trainer
from codex_jax.train.workdir import check_or_write_config


def train(cfg: Config, config_dict: dict[str, Any], workdir: str, *, progress: bool = True) -> dict[str, Any]:
  """Trains `cfg` in `workdir`, resuming from its latest checkpoint; returns a run summary."""
  is_main = jax.process_index() == 0
  total_steps, seq_len = cfg.train.steps, cfg.data.seq_len
  local_batch = cfg.train.global_batch // jax.process_count()

  # 1. Workdir: a rerun must mean the same run (config diff refused outside the allow-list).
  for change in check_or_write_config(workdir, config_dict):
    logging.info("Config change accepted on resume: %s", change)

  # 2. Mesh and the logical-axis rules.
  mesh = build_mesh(cfg.mesh)
  logging.info("Mesh %s over %d %s device(s), %d process(es)", dict(mesh.shape), mesh.size,
               jax.devices()[0].device_kind, jax.process_count())

  # 3. Data: the embedded corpus, its tokenizer, a train and a held-out Grain pipeline.
  documents = corpus.embedded_documents(cfg.data.corpus_max_bytes)
  tok = tokenizer.load_or_train_tokenizer(cfg.data, cfg.model.vocab_size, documents,
                                          workdir if is_main else None)
  def data_iterator(split, num_epochs=None):
    return pipeline.make_iterator(cfg.data, tok, documents, split=split, local_batch=local_batch,
                                  seed=cfg.data.seed, process_index=jax.process_index(),
                                  process_count=jax.process_count(), num_epochs=num_epochs)
  train_data = data_iterator("train")

  # 4. Model, optimizer, the state's shardings and the jitted steps (nothing allocated yet).
  trainer = build_trainer(cfg, mesh)
  data_sharding = trainer.data_sharding

  # 5. Resume: (a) latest committed checkpoint, (b) state into its shardings, (c) iterator position.
  checkpointer = Checkpointer(workdir, cfg.checkpoint)
  start = checkpointer.latest_step()
  if start is not None:
    train_state = checkpointer.restore(start, trainer.restore_target(), train_data)
    logging.info("Resumed from step %d in %s", start, checkpointer.directory)
  else:
    start = 0
    train_state = trainer.init_state()
  if is_main:
    logging.info("Parameters:\n%s", params_table.param_table(train_state.params))

  # 6. Compile once, ahead of time, and count FLOPs both ways.
  first = next(train_data)
  feed.check_batch(first, local_batch, seq_len, cfg.model.vocab_size)
  compiled = trainer.train_step.lower(train_state, feed.to_global(first, data_sharding)).compile()
  tokens_per_step = cfg.train.global_batch * seq_len
  model_flops = flops.train_flops_per_token(cfg.model, seq_len) * tokens_per_step
  xla_flops = flops.xla_flops_global(compiled)
  peak_flops = peak.peak_flops(cfg.model.compute_dtype)
  logging.info("Model FLOPs/step %.3e (analytic), %s (XLA); peak %.3e FLOP/s (%s)", model_flops,
               f"{xla_flops:.3e}" if xla_flops else "n/a", peak_flops.total, peak_flops.source)

  # 7. The step loop. Step i+1 is dispatched before step i's metrics are fetched.
  writer = MetricsWriter(workdir, enabled=is_main, resume_step=start)
  bar = Progress(total_steps, start, tokens_per_step, enabled=is_main and progress)
  summary = {"start_step": start, "first_loss": None, "last_loss": None, "eval_loss": None}
  pending, batch, last_time = None, first, time.perf_counter()
  for step in range(start, total_steps):
    train_state, metrics = compiled(train_state, feed.to_global(batch, data_sharding))
    if pending is not None:
      last_time = _report(pending, writer, bar, summary, last_time, model_flops, xla_flops, peak_flops,
                          tokens_per_step, cfg.train.log_every)
    pending = (step + 1, metrics)
    done = step + 1
    if done % cfg.checkpoint.every == 0 or done == total_steps:
      checkpointer.save(done, train_state, train_data)
    if done % cfg.eval.every == 0 or done == total_steps:
      summary["eval_loss"] = _evaluate(trainer.eval_step, train_state.params, data_iterator, cfg, data_sharding)
      writer.write(done, {"eval_loss": summary["eval_loss"]})
    if done < total_steps:
      batch = next(train_data)
  if pending is not None:
    _report(pending, writer, bar, summary, last_time, model_flops, xla_flops, peak_flops, tokens_per_step,
            cfg.train.log_every)

  # 8. Finish: wait for the last save, draw the curves, summarise.
  checkpointer.close()
  bar.close()
  writer.close()
  summary.update(final_step=int(jax.device_get(train_state.step)), workdir=os.path.abspath(workdir),
                 checkpoints=checkpointer.all_steps(), params=flops.param_counts(cfg.model)["total"],
                 model_flops_per_step=model_flops, xla_flops_per_step=xla_flops, peak_flops=peak_flops.total)
  if is_main and os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    summary["plot"] = plot.plot_metrics(os.path.join(workdir, "metrics.jsonl"),
                                        os.path.join(workdir, "loss.png"))
  return summary


def _report(pending, writer, bar, summary, last_time, model_flops, xla_flops, peak_flops, tokens_per_step,
            log_every):
  """Fetches one step's metrics (the step after it is already running), logs them; returns the time."""
  step, metrics = pending
  scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
  now = time.perf_counter()
  step_time = now - last_time
  scalars.update(step_time=step_time, tokens_per_s=tokens_per_step / step_time,
                 model_tflops_per_s=model_flops / step_time / 1e12,
                 mfu=peak.mfu(model_flops / step_time, peak_flops))
  if xla_flops:
    scalars["mfu_xla"] = peak.mfu(xla_flops / step_time, peak_flops)
  if not math.isfinite(scalars["loss"]):
    logging.warning("Step %d: non-finite loss %s", step, scalars["loss"])
  writer.write(step, scalars)
  bar.update(step, loss=scalars["loss"])
  if summary["first_loss"] is None:
    summary["first_loss"] = scalars["loss"]
  summary["last_loss"] = scalars["loss"]
  summary["tokens_per_s"], summary["mfu"] = scalars["tokens_per_s"], scalars["mfu"]
  if step % log_every == 0 or step <= 3:
    logging.info("step %d loss %.4f grad_norm %.3f lr %.2e %.0f tok/s mfu %.1f%%", step, scalars["loss"],
                 scalars["grad_norm"], scalars["learning_rate"], scalars["tokens_per_s"], 100 * scalars["mfu"])
  return now


def _evaluate(eval_step, params, data_iterator, cfg: Config, data_sharding) -> float:
  """Mean next-token loss on the first `eval.batches` held-out batches (the same ones every time)."""
  ce_sum, tokens = 0.0, 0.0
  for i, batch in enumerate(data_iterator("eval", num_epochs=1)):
    if i >= cfg.eval.batches:
      break
    out = jax.device_get(eval_step(params, feed.to_global(batch, data_sharding)))
    ce_sum, tokens = ce_sum + float(out["ce_sum"]), tokens + float(out["tokens"])
  return ce_sum / tokens if tokens else float("nan")
