"""Every rule a config must satisfy before anything is built; each problem names key, value, rule."""

from __future__ import annotations

import math

from codex_jax.config import schema

LICENCE_POLICIES = ("permissive", "copyleft", "research-only")  # Mirrors data/licences.py (no import upward).


def validate(cfg: schema.Config, num_devices: int | None = None, num_processes: int = 1) -> list[str]:
  """All problems with `cfg`, as one message each (empty when the config can run)."""
  problems: list[str] = []

  def need(ok: bool, key: str, value, rule: str):
    if not ok:
      problems.append(f"config.{key}={value!r}: {rule}")

  m, d, o, t, mesh, c, e = cfg.model, cfg.data, cfg.optimizer, cfg.train, cfg.mesh, cfg.checkpoint, cfg.eval
  for group, obj, keys in (
      ("model", m, ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim",
                    "attention_chunks", "loss_chunk")),
      ("data", d, ("seq_len", "image_size", "patch_size", "video_frames", "tubelet_frames", "audio_sample_rate",
                   "audio_mels", "audio_patch_frames")),
      ("train", t, ("steps", "global_batch", "log_every", "spike_sigmas", "max_consecutive_bad")),
      ("checkpoint", c, ("every", "max_to_keep", "average_count")),
      ("eval", e, ("every",)),
  ):
    for key in keys:
      need(getattr(obj, key) > 0, f"{group}.{key}", getattr(obj, key), "must be positive")
  for group, obj, keys in (
      ("model", m, ("head_dim", "feature_dim", "mtp_depth")),
      ("data", d, ("tokenizer_train_bytes", "num_workers", "shuffle_window", "shuffle_block", "shards")),
      ("optimizer", o, ("weight_decay", "min_lr_ratio")),
      ("train", t, ("z_loss", "seed", "spike_window", "max_update_ratio", "mtp_weight", "mtp_weight_final")),
      ("eval", e, ("batches", "task_examples")),
      ("checkpoint", c, ("average_every", "average_every_seconds")),
  ):
    for key in keys:
      need(getattr(obj, key) >= 0, f"{group}.{key}", getattr(obj, key), "must not be negative")

  # Model shape.
  if m.head_dim == 0 and m.d_model > 0 and m.num_heads > 0:
    need(m.d_model % m.num_heads == 0, "model.num_heads", m.num_heads,
         f"must divide model.d_model={m.d_model} (or set model.head_dim)")
  if m.num_heads > 0 and m.num_kv_heads > 0:
    need(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads", m.num_kv_heads,
         f"must divide model.num_heads={m.num_heads} (grouped-query attention)")
  if m.resolved_head_dim > 0:
    need(m.resolved_head_dim % 2 == 0, "model.head_dim", m.resolved_head_dim, "must be even (RoPE rotates pairs)")
  need(m.param_dtype in schema.DTYPES, "model.param_dtype", m.param_dtype, f"must be one of {schema.DTYPES}")
  need(m.compute_dtype in schema.DTYPES, "model.compute_dtype", m.compute_dtype, f"must be one of {schema.DTYPES}")
  need(m.remat in schema.REMAT_POLICIES, "model.remat", m.remat, f"must be one of {schema.REMAT_POLICIES}")
  need(m.attention_impl in schema.ATTENTION_IMPLS, "model.attention_impl", m.attention_impl,
       f"must be one of {schema.ATTENTION_IMPLS}")
  need(m.norm_eps > 0, "model.norm_eps", m.norm_eps, "must be positive")
  need(m.rope_theta > 0, "model.rope_theta", m.rope_theta, "must be positive")
  need(m.init_std > 0, "model.init_std", m.init_std, "must be positive")

  if m.mtp_depth > 0 and d.seq_len > 0:
    need(m.mtp_depth < d.seq_len - 1, "model.mtp_depth", m.mtp_depth,
         f"must be below data.seq_len - 1 = {d.seq_len - 1} (depth k predicts k + 1 tokens ahead)")
  # Gradient accumulation and the batch ramp; every batch rule below applies to one micro-batch's rows.
  need(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "must be at least 1 (1: no accumulation)")
  if t.grad_accum >= 1 and t.global_batch > 0:
    need(t.global_batch % t.grad_accum == 0, "train.global_batch", t.global_batch,
         f"must be divisible by train.grad_accum={t.grad_accum} (micro-batches of equal rows)")
  micro = t.micro_batch

  def divisible_by(what: str) -> str:  # The rule for the rows each step's forward sees.
    if t.grad_accum == 1:
      return f"must be divisible by {what}"
    return f"must make the micro-batch rows train.global_batch / train.grad_accum = {micro} divisible by {what}"

  need(t.batch_ramp_steps >= 0, "train.batch_ramp_steps", t.batch_ramp_steps, "must not be negative (0: off)")
  need(1 <= t.batch_ramp_start <= max(t.grad_accum, 1), "train.batch_ramp_start", t.batch_ramp_start,
       f"must be in [1, train.grad_accum={t.grad_accum}] (micro-batches in the first update)")
  need(not t.batch_ramp_noise_cap or t.noise_scale_every > 0, "train.batch_ramp_noise_cap", t.batch_ramp_noise_cap,
       "needs the noise probe on (train.noise_scale_every > 0): the cap is its B_simple estimate")
  need(t.noise_scale_every >= 0, "train.noise_scale_every", t.noise_scale_every, "must not be negative (0: off)")
  if t.noise_scale_every > 0:
    need(t.noise_scale_microbatches >= 2 and micro % t.noise_scale_microbatches == 0,
         "train.noise_scale_microbatches", t.noise_scale_microbatches,
         f"must be at least 2 and divide the micro-batch rows train.global_batch / train.grad_accum = {micro} "
         "(B_small < B_big)")
    need(0 <= t.noise_scale_ema < 1, "train.noise_scale_ema", t.noise_scale_ema, "must be in [0, 1)")
  need(0 <= t.mtp_weight_switch <= 1, "train.mtp_weight_switch", t.mtp_weight_switch,
       "must be in [0, 1] (a fraction of train.steps)")

  need(not (c.average_every and c.average_every_seconds), "checkpoint.average_every_seconds",
       c.average_every_seconds, f"snapshots are spaced by steps or by seconds, not both (checkpoint.average_every="
       f"{c.average_every}); set one of them to 0")
  need(0 <= c.ema_decay < 1, "checkpoint.ema_decay", c.ema_decay, "must be in [0, 1) (0: a plain mean)")
  if m.attention_chunks > 0 and d.seq_len > 0:
    need(d.seq_len % m.attention_chunks == 0, "model.attention_chunks", m.attention_chunks,
         f"must divide data.seq_len={d.seq_len}")

  # Data and optimisation.
  need(bool(d.manifest), "data.manifest", d.manifest, "must name a manifest file (YAML or JSON)")
  need(bool(d.phase), "data.phase", d.phase, "must name the run phase")
  need(d.licence_policy in LICENCE_POLICIES, "data.licence_policy", d.licence_policy,
       f"must be one of {LICENCE_POLICIES}")
  need(d.on_malformed in schema.MALFORMED_POLICIES, "data.on_malformed", d.on_malformed,
       f"must be one of {schema.MALFORMED_POLICIES}")
  if d.patch_size > 0:
    need(d.image_size % d.patch_size == 0, "data.image_size", d.image_size,
         f"must be a multiple of data.patch_size={d.patch_size}")
  if d.tubelet_frames > 0:
    need(d.video_frames % d.tubelet_frames == 0, "data.video_frames", d.video_frames,
         f"must be a multiple of data.tubelet_frames={d.tubelet_frames}")
  need(0 <= d.eval_fraction < 1, "data.eval_fraction", d.eval_fraction, "must be in [0, 1)")
  need(o.learning_rate > 0, "optimizer.learning_rate", o.learning_rate, "must be positive")
  need(0 <= o.warmup_fraction < 1, "optimizer.warmup_fraction", o.warmup_fraction, "must be in [0, 1)")
  need(o.min_lr_ratio <= 1, "optimizer.min_lr_ratio", o.min_lr_ratio, "must be at most 1")
  need(o.decay in ("cosine", "wsd"), "optimizer.decay", o.decay, "expected cosine or wsd")
  need(0 <= o.decay_fraction <= 1 - o.warmup_fraction, "optimizer.decay_fraction", o.decay_fraction,
       "must be in [0, 1 - optimizer.warmup_fraction]")
  need(0 <= o.b1 < 1, "optimizer.b1", o.b1, "must be in [0, 1)")
  need(0 <= o.b2 < 1, "optimizer.b2", o.b2, "must be in [0, 1)")
  need(o.eps > 0, "optimizer.eps", o.eps, "must be positive")
  need(o.clip_norm > 0, "optimizer.clip_norm", o.clip_norm, "must be positive")
  if t.spike_window > 0:
    # Below 2 losses the std is 0 and every later loss above the first would count as a spike; above
    # the window the count never gets there and detection would be silently off.
    need(2 <= t.spike_min_steps <= t.spike_window, "train.spike_min_steps", t.spike_min_steps,
         f"must be in [2, train.spike_window={t.spike_window}] (or set train.spike_window=0 to turn spikes off)")

  problems.extend(objective_problems(cfg))

  # Mesh and batch.
  sizes = {"data": mesh.data, "tensor": mesh.tensor, "pipeline": mesh.pipeline}
  for axis, size in sizes.items():
    need(size == -1 or size > 0, f"mesh.{axis}", size, "must be a positive size or -1 (fill in)")
  fills = [axis for axis, size in sizes.items() if size == -1]
  need(len(fills) <= 1, f"mesh.{fills[-1] if fills else 'data'}", -1, f"only one axis may be -1, got {fills}")
  need(mesh.schedule in schema.PIPELINE_SCHEDULES, "mesh.schedule", mesh.schedule,
       f"must be one of {schema.PIPELINE_SCHEDULES}")
  need(mesh.microbatches >= 0, "mesh.microbatches", mesh.microbatches, "must not be negative (0: 4 x stages)")
  need(mesh.repeats >= 1, "mesh.repeats", mesh.repeats, "must be at least 1")
  if mesh.schedule == "circular":
    need(mesh.repeats >= 2, "mesh.repeats", mesh.repeats,
         "must be at least 2 with mesh.schedule='circular' (one repeat is the gpipe schedule)")
  else:
    need(mesh.repeats == 1, "mesh.repeats", mesh.repeats,
         f"must be 1 with mesh.schedule={mesh.schedule!r}; layer chunks per stage need 'circular'")
  if problems:
    return problems
  resolved = resolve_mesh_shape(mesh, num_devices)
  if num_devices is not None:
    product = math.prod(resolved.values())
    need(product == num_devices, "mesh", dict(sizes),
         f"data*tensor*pipeline={product} must equal the {num_devices} available devices")
    if problems:
      return problems
  data_size, tensor_size, stages = resolved["data"], resolved["tensor"], resolved["pipeline"]
  need(micro % data_size == 0, "train.global_batch", t.global_batch,
       divisible_by(f"the data axis size {data_size}"))
  if stages > 1:
    microbatches = resolve_microbatches(mesh, stages)
    need(m.scan_layers, "model.scan_layers", m.scan_layers, "must be True with pipeline stages (the layers are stacked)")
    need(m.num_layers % (stages * mesh.repeats) == 0, "model.num_layers", m.num_layers,
         f"must be divisible by pipeline stages x mesh.repeats = {stages} x {mesh.repeats}")
    need(micro % (data_size * microbatches) == 0, "train.global_batch", t.global_batch,
         divisible_by(f"the data axis size x pipeline microbatches = {data_size} x {microbatches}"))
    if mesh.schedule == "circular":
      need(microbatches >= stages, "mesh.microbatches", microbatches,
           f"must be at least the {stages} pipeline stages with the circular schedule")
  if mesh.sequence_parallel:
    need(d.seq_len % tensor_size == 0, "data.seq_len", d.seq_len,
         f"must be divisible by the tensor axis size {tensor_size} when mesh.sequence_parallel is on")
  need(micro % num_processes == 0, "train.global_batch", t.global_batch,
       divisible_by(f"the {num_processes} JAX processes"))
  if d.shards > 0:
    need(micro % d.shards == 0, "data.shards", d.shards, f"must divide the micro-batch of {micro} rows")
    need(d.shards % num_processes == 0, "data.shards", d.shards,
         f"must be a multiple of the {num_processes} JAX processes (each feeds whole shards)")
  for key, value in (("num_heads", m.num_heads), ("num_kv_heads", m.num_kv_heads),
                     ("mlp_dim", m.mlp_dim), ("vocab_size", m.vocab_size)):
    need(value % tensor_size == 0, f"model.{key}", value, f"must be divisible by the tensor axis size {tensor_size}")
  if mesh.fsdp:
    for key, value in (("d_model", m.d_model),):
      need(value % data_size == 0, f"model.{key}", value,
           f"must be divisible by the data axis size {data_size} when mesh.fsdp is on")
  return problems


def resolve_microbatches(mesh: schema.MeshConfig, stages: int) -> int:
  """Pipeline microbatches per step: mesh.microbatches, or 4 per stage by default; 1 without a pipeline."""
  if stages <= 1:
    return 1
  return mesh.microbatches or 4 * stages


def resolve_mesh_shape(mesh: schema.MeshConfig, num_devices: int | None) -> dict[str, int]:
  """Axis sizes with a -1 filled from the device count (left as 1 when the count is unknown)."""
  sizes = {"data": mesh.data, "tensor": mesh.tensor, "pipeline": mesh.pipeline}
  known = math.prod(size for size in sizes.values() if size != -1)
  for axis, size in sizes.items():
    if size == -1:
      sizes[axis] = max(1, (num_devices or known) // known)
  return sizes


def weight_problems(weights: tuple[float, ...], objectives: tuple[str, ...], key: str) -> list[str]:
  """Loss weights, one per objective (here and in objectives/balance.py); `key` names them in the message."""
  if len(weights) == len(objectives) and all(w >= 0 for w in weights) and sum(weights) > 0:
    return []
  return [f"{key}={weights!r}: must be {len(objectives)} weights >= 0 with a positive sum, in the order "
          f"{objectives} (0 switches one off)"]


def share_problems(b, objectives: tuple[str, ...], prefix: str) -> list[str]:
  """The loss-weight tuner's rules: share bounds and dual ascent settings. One set for config.objectives.balance
  (schema.BalanceSettings) and objectives/balance.py's BalanceConfig, whose fields they share; `prefix` names
  the keys in the messages."""
  problems, n = [], len(objectives)

  def need(ok: bool, key: str, value, rule: str):
    if not ok:
      problems.append(f"{prefix}{key}={value!r}: {rule}")

  need(b.mode in schema.BALANCE_MODES, "mode", b.mode, f"must be one of {schema.BALANCE_MODES}")
  for key in ("low", "high"):
    value = getattr(b, key)
    need(len(value) == n and all(0 <= v <= 1 for v in value), key, value,
         f"must be {n} shares in [0, 1], in the order {objectives}")
  need(b.measure_every >= 1, "measure_every", b.measure_every, "must be at least 1")
  need(b.dual_lr > 0, "dual_lr", b.dual_lr, "must be positive")
  need(0 <= b.ema_decay < 1, "ema_decay", b.ema_decay, "must be in [0, 1)")
  need(b.slack >= 0, "slack", b.slack, "must not be negative")
  need(b.max_multiplier > 0, "max_multiplier", b.max_multiplier, "must be positive")
  if problems:
    return problems
  for i, name in enumerate(objectives):
    need(b.low[i] + b.slack <= b.high[i] - b.slack, f"low[{i}]", b.low[i],
         f"must be at most {prefix}high[{i}]={b.high[i]} - 2 * slack={b.slack} ({name})")
  need(sum(b.low) <= 1, "low", b.low, f"must sum to at most 1, not {sum(b.low):g}: no shares could meet every "
       "lower bound")
  need(sum(b.high) >= 1, "high", b.high, f"must sum to at least 1, not {sum(b.high):g}: no shares could meet "
       "every upper bound")
  return problems


def objective_problems(cfg: schema.Config) -> list[str]:
  """The objectives group: weights per objective (and phase), the tuner, each objective's settings."""
  o, problems = cfg.objectives, []

  def need(ok: bool, key: str, value, rule: str):
    if not ok:
      problems.append(f"config.objectives.{key}={value!r}: {rule}")

  tables = {"weights": o.weights, **{f"phase_weights.{k}": v for k, v in o.phase_weights.items()}}
  for key, weights in tables.items():
    problems.extend(weight_problems(weights, schema.OBJECTIVES, f"config.objectives.{key}"))
  # A switched-off objective's lower bound is dropped where the tuner is built (runtime/multimodal.py spec_of).
  problems.extend(share_problems(o.balance, schema.OBJECTIVES, "config.objectives.balance."))

  v, a, w, act = o.vision, o.align, o.world, o.action
  need(0 < v.mask_ratio < 1, "vision.mask_ratio", v.mask_ratio, "must be in (0, 1)")
  need(0 <= v.masked_fraction <= 1, "vision.masked_fraction", v.masked_fraction, "must be in [0, 1]")
  need(v.temperature > 0, "vision.temperature", v.temperature, "must be positive")
  need(a.kind in schema.ALIGN_KINDS, "align.kind", a.kind, f"must be one of {schema.ALIGN_KINDS}")
  need(a.pool in schema.ALIGN_POOLS, "align.pool", a.pool, f"must be one of {schema.ALIGN_POOLS}")
  need(0 <= a.blind_fraction <= 1, "align.blind_fraction", a.blind_fraction, "must be in [0, 1]")
  need(0 <= w.ema_decay < 1, "world.ema_decay", w.ema_decay, "must be in [0, 1)")
  need(act.sample_steps >= 1, "action.sample_steps", act.sample_steps, "must be at least 1")
  for key, value in (("vision.max_images", v.max_images), ("align.dim", a.dim), ("align.max_pairs", a.max_pairs),
                     ("world.max_chunks", w.max_chunks), ("action.horizon", act.horizon), ("action.dim", act.dim),
                     ("action.max_chunks", act.max_chunks)):
    need(value >= 1, key, value, "must be at least 1")
  m, d = cfg.model, cfg.data
  enabled = o.enabled
  if o.multimodal:
    need(m.feature_dim > 0, "weights", o.weights,
         "turn on non-text objectives only with model.feature_dim > 0 (the model must see non-text positions)")
    if cfg.mesh.pipeline > 1:
      need(cfg.mesh.schedule != "1f1b", "weights", o.weights,
           "non-text objectives need mesh.schedule gpipe or circular with mesh.pipeline > 1: the 1f1b "
           "schedule's hand-written backward only knows the text (and MTP) loss")
  if "action" in enabled and m.feature_dim > 0:
    need(act.dim <= m.feature_dim, "action.dim", act.dim,
         f"must be at most model.feature_dim={m.feature_dim} (an action position's values)")
  if "vision" in enabled and m.feature_dim > 0:
    pixels = d.patch_size * d.patch_size * 3
    need(pixels <= m.feature_dim, "weights", o.weights,
         f"vision needs image patches of {pixels} values to fit model.feature_dim={m.feature_dim}")
  return problems
