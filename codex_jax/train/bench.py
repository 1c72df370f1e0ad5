"""Throughput of the compiled train step on synthetic batches: tokens/s, model TFLOP/s and MFU."""

from __future__ import annotations

import statistics
import time

import grain
import jax
import numpy as np

from codex_jax.config.schema import Config
from codex_jax.parallel.mesh import build_mesh
from codex_jax.runtime import feed
from codex_jax.telemetry import flops, peak
from codex_jax.train.setup import build_trainer, xla_model_flops


def synthetic_batch(cfg: Config, local_batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Full-length random rows: the step's cost without the data pipeline's.

  With model.feature_dim > 0 the first quarter of every row is image positions (random values in
  [-1, 1]) and the rest text, so the non-text input path is exercised and timed as well.
  """
  rng = np.random.default_rng(seed)
  length = cfg.data.seq_len
  tokens = rng.integers(2, cfg.model.vocab_size, (local_batch, length + 1), dtype=np.int32)
  shape = (local_batch, length)
  media = length // 4 if cfg.model.feature_dim else 0
  is_media = np.broadcast_to(np.arange(length) < media, shape)
  modality_ids = np.where(is_media, 2, 1).astype(np.int32)  # records.MODALITY_IDS: image 2, text 1.
  features = rng.uniform(-1, 1, (*shape, cfg.model.feature_dim)).astype(np.float32) * is_media[..., None]
  return {"inputs": np.where(is_media, 0, tokens[:, :-1]).astype(np.int32), "targets": tokens[:, 1:],
          "segment_ids": np.ones(shape, np.int32),
          "positions": np.broadcast_to(np.arange(length, dtype=np.int32), shape).copy(),
          "loss_mask": (np.arange(length) >= media - 1).astype(np.float32)[None].repeat(local_batch, 0),
          "modality_ids": modality_ids, "source_ids": np.ones(shape, np.int32), "features": features,
          "example_ids": np.ones(shape, np.int64), "example_positions": np.broadcast_to(
              np.arange(length, dtype=np.int32), shape).copy()}


def timed_steps(compiled, state, batch, n: int):
  """Runs `n` steps one at a time; (state, last metrics, wall seconds of each step)."""
  metrics, times = None, []
  for _ in range(n):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return state, metrics, times


def benchmark(cfg: Config, steps: int, warmup: int = 2) -> dict:
  """Compiles once, runs `warmup` steps, then times `steps` steps one by one (median step time)."""
  mesh = build_mesh(cfg.mesh)
  trainer = build_trainer(cfg, mesh)
  state = trainer.init_state()
  batch = feed.to_global(synthetic_batch(cfg, cfg.train.global_batch // jax.process_count()),
                         trainer.engine.data_sharding)
  start = time.perf_counter()
  compiled = trainer.train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  state, metrics, _ = timed_steps(compiled, state, batch, warmup)
  state, metrics, times = timed_steps(compiled, state, batch, steps)
  step_s = statistics.median(times)
  tokens = cfg.train.global_batch * cfg.data.seq_len
  cost = flops.step_flops(cfg, cfg.train.global_batch, cfg.train.grad_accum)
  model_flops = cost.mean
  xla_counted = xla_model_flops(cfg, mesh, batch)  # A tuner-measuring step: scaled to the mean step below.
  xla_flops = cost.mean_of(xla_counted) if xla_counted else None
  peak_dtype, mfu, peak_note = peak.checked_peak(cfg.model.compute_dtype, model_flops / step_s)
  f32 = cfg.model.compute_dtype in ("float32", "f32")
  peak_f32, mfu_f32, _ = (peak_dtype, mfu, "") if f32 else peak.checked_peak("float32", model_flops / step_s)
  memory = compiled.memory_analysis()
  return {
      "compute_dtype": cfg.model.compute_dtype,
      "params": flops.param_counts(cfg.model)["total"],
      "global_batch": cfg.train.global_batch,
      "seq_len": cfg.data.seq_len,
      "devices": mesh.size,
      "device_kind": jax.devices()[0].device_kind,
      "mesh": dict(mesh.shape),
      "compile_s": round(compile_s, 2),
      "step_s_median": step_s,
      "step_s_min": min(times),
      "step_s_max": max(times),
      "tokens_per_s": tokens / step_s,
      "model_flops_per_step": model_flops,
      "xla_flops_per_step": xla_flops,
      "model_tflops_per_s": model_flops / step_s / 1e12,
      "mfu": mfu,  # None when even a fresh peak gives an MFU above 1 (peak_note says why).
      "mfu_xla": peak.mfu(xla_flops / step_s, peak_dtype) if xla_flops and mfu is not None else None,
      "mfu_vs_f32_peak": mfu_f32,
      "peak_flops": peak_dtype.total,
      "peak_f32_flops": peak_f32.total,
      "peak_source": peak_dtype.source,
      "peak_measured_at": peak_dtype.measured_at and time.strftime("%Y-%m-%d %H:%M:%S %Z",
                                                                   time.localtime(peak_dtype.measured_at)),
      "peak_note": peak_note,
      "temp_bytes_per_device": getattr(memory, "temp_size_in_bytes", None),
      "loss": float(metrics["loss"]),
  }


def benchmark_checkpoint(cfg: Config, workdir: str, steps: int = 3) -> dict:
  """Save / restore throughput of the real state, and how long an async save stalls the step loop.

  The stall is what `Checkpointer.save` blocks for (hashing every tensor on the host, the non-finite
  check, Orbax's device-to-host copy); the write itself runs behind the next steps, whose time is
  compared with the median step time.
  """
  import dataclasses as dc

  from codex_jax.checkpoint.manager import Checkpointer, roots, state_leaf_hashes
  mesh = build_mesh(cfg.mesh)
  trainer = build_trainer(cfg, mesh)
  state = trainer.init_state()
  batch = feed.to_global(synthetic_batch(cfg, cfg.train.global_batch // jax.process_count()), trainer.engine.data_sharding)
  compiled = trainer.train_step.lower(state, batch).compile()
  state, _, _ = timed_steps(compiled, state, batch, 1)
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
  state, _, times = timed_steps(compiled, state, batch, steps)
  plain = statistics.median(times)
  start_record = {"kind": "init", "seed": 0, "content_root": roots(state_leaf_hashes(state))["content_root"]}
  # Throughput: a synchronous save (hash + copy + write + commit), then a verified restore.
  checkpointer = Checkpointer(workdir, dc.replace(cfg.checkpoint, async_save=False, max_to_keep=3))
  checkpointer.start_fresh(start_record)
  start = time.perf_counter()
  checkpointer.save(1, state, iterator, {}, {})
  save_s = time.perf_counter() - start
  meta = checkpointer.read_meta(1)
  start = time.perf_counter()
  checkpointer.restore(1, trainer.restore_target(), meta=meta)
  restore_s = time.perf_counter() - start
  checkpointer.close()
  # Stall: what an asynchronous save blocks the loop for, and the step that runs beside its write.
  checkpointer = Checkpointer(workdir, dc.replace(cfg.checkpoint, async_save=True, max_to_keep=3))
  checkpointer.start_fresh(start_record)
  start = time.perf_counter()
  checkpointer.save(2, state, iterator, {}, {})
  stall = time.perf_counter() - start
  state, _, (during,) = timed_steps(compiled, state, batch, 1)
  checkpointer.close()
  gb = state_bytes / 1e9
  return {"state_gb": gb, "save_s": save_s, "save_gb_per_s": gb / save_s, "restore_verified_s": restore_s,
          "restore_gb_per_s": gb / restore_s, "async_save_stall_s": stall, "step_s_median": plain,
          "step_s_during_async_write": during}
