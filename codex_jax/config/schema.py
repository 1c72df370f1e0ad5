"""Typed, frozen configuration: the only form of the config that modules below the CLI see."""

from __future__ import annotations

import dataclasses

DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
PIPELINE_SCHEDULES = ("gpipe", "circular", "1f1b")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
MALFORMED_POLICIES = ("fail", "skip")
# The modalities of a packed row's positions and their ids (0: padding): the data encodes them, the model
# embeds them (one row per id), the objectives find their examples by them.
MODALITIES: tuple[str, ...] = ("text", "image", "video", "audio", "proprio", "action")
MODALITY_IDS: dict[str, int] = {name: i + 1 for i, name in enumerate(MODALITIES)}
PAD_MODALITY = 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder-only transformer shape and numerics."""

  vocab_size: int = 4096
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 0  # 0: d_model // num_heads.
  mlp_dim: int = 512
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  init_std: float = 0.02
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  scan_layers: bool = True  # One compiled block, scanned: compile time flat in depth.
  remat: str = "none"  # none | full | dots | dots_no_batch: what the backward recomputes instead of storing.
  # The training cross-entropy runs over this many positions of every row at a time (objectives/text.py): only
  # [B, loss_chunk, V] logits exist at once; a divisor of the row length is used.
  loss_chunk: int = 128
  # auto: jax.nn.dot_product_attention's choice, plain XLA attention in the pinned jax | xla | cudnn (GPU).
  attention_impl: str = "auto"
  attention_chunks: int = 1  # Query chunks that skip masked blocks; >1 pays where no fused kernel does.
  feature_dim: int = 0  # Values per non-text position (patches, audio, proprio, action); 0: text only.
  mtp_depth: int = 0  # Multi-token prediction modules (DeepSeek-V3), depth k predicts token t+k+1; 0: off.
  # Derived at the config boundary (config/load.py) from `objectives`, never set by hand: the non-text
  # objectives whose heads exist, and the heads' widths.
  objectives: tuple[str, ...] = ()
  pixel_dim: int = 0  # Values of one image patch (patch_size^2 * 3): the MAE pixel head's output.
  align_dim: int = 0
  action_dim: int = 0
  action_horizon: int = 0

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.num_heads


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which manifest, under which licence policy, and how records become packed rows."""

  manifest: str = "experiments/data/default.yaml"  # YAML/JSON mixture manifest (see data/manifest.py).
  phase: str = "pretrain"  # Run phase; a resume under another manifest hash must name a new phase.
  licence_policy: str = "permissive"  # permissive | copyleft | research-only (each admits the ones before).
  licence_allow: tuple[str, ...] = ()  # SPDX ids admitted whatever the policy.
  licence_deny: tuple[str, ...] = ()  # SPDX ids refused whatever the policy.
  on_malformed: str = "fail"  # fail: stop naming file:record; skip: drop it, count it, log it to quarantine.
  tokenizer_path: str = ""  # "": train a byte-level BPE on the manifest's text (cached).
  tokenizer_train_bytes: int = 8_000_000  # Text the tokenizer is trained on, drawn from every text source.
  seq_len: int = 256
  seed: int = 0
  eval_fraction: float = 0.01  # Share of each source's records held out for evals.
  num_workers: int = 0  # Grain worker processes per source; 0 decodes in the trainer process.
  shuffle_window: int = 256  # Packed rows shuffled together before batching; 0 or 1: off.
  shuffle_block: int = 64  # Consecutive records read together; blocks are shuffled per epoch.
  # Shards of the data stream, fixed for the life of a run; 0: the JAX process count at the first start.
  # Each process feeds whole shards, so a resume may use any process count that divides it (elastic).
  shards: int = 0
  image_size: int = 16  # Pictures and frames are resized to image_size x image_size.
  patch_size: int = 4  # Square patches of patch_size^2 * 3 values, one position each.
  video_frames: int = 8  # Frames sampled per clip.
  tubelet_frames: int = 2  # Frames per video position.
  audio_sample_rate: int = 8000
  audio_mels: int = 16  # Log-mel bins per 10 ms frame.
  audio_patch_frames: int = 4  # 10 ms mel frames per audio position.


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with linear warmup then cosine or warmup-stable-decay (WSD)."""

  learning_rate: float = 3e-3
  min_lr_ratio: float = 0.1  # The schedule ends at this share of the peak.
  warmup_fraction: float = 0.02  # Share of train.steps of linear warmup.
  decay: str = "cosine"  # cosine | wsd (hold the peak, decay linearly over the last decay_fraction).
  decay_fraction: float = 0.2  # wsd only; 0: no anneal (evaluate an average of snapshots instead).
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  no_decay: tuple[str, ...] = ("norm", "bias", "embed")  # Parameter-path substrings spared weight decay.


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Length of the run, batch, loss terms and cadence."""

  steps: int = 300
  global_batch: int = 16
  seed: int = 0
  z_loss: float = 1e-4
  log_every: int = 10
  # Also count one step's FLOPs with XLA's cost analysis at the start (the step lowered again, unscanned: seconds
  # to minutes) to cross-check the analytic count: `mfu_xla` in metrics. `codex bench` always does.
  xla_flop_check: bool = False
  spike_window: int = 100  # Recent accepted losses a spike is judged against; 0: spike detection off.
  spike_sigmas: float = 6.0  # A loss above mean + spike_sigmas * std of the window skips its update.
  spike_min_steps: int = 20  # Losses the window must hold before it judges spikes.
  # An update larger than this fraction of the weights (|update| / |params|, global norms) skips the step, whatever
  # the loss says (a learning rate set 1e6 too high); AdamW steps are typically 1e-4..1e-2. 0: off.
  max_update_ratio: float = 0.5
  max_consecutive_bad: int = 5  # Skipped steps in a row (non-finite, spike or oversized update) that stop the run.
  mtp_weight: float = 0.3  # MTP loss weight lambda (loss += lambda / mtp_depth * sum_k CE_k) ...
  mtp_weight_final: float = 0.1  # ... and from mtp_weight_switch * steps on (DeepSeek-V3: 0.3 -> 0.1).
  mtp_weight_switch: float = 0.68  # Fraction of train.steps at which mtp_weight becomes mtp_weight_final.
  noise_scale_every: int = 0  # Log the gradient noise scale B_simple every this many steps; 0: off.
  noise_scale_microbatches: int = 4  # k: rows split in k micro-batches (B_small = global_batch / k, B_big).
  noise_scale_ema: float = 0.9  # Decay of the moving averages of |G|^2 and tr(Sigma) before their ratio.
  # Gradient accumulation: an update of global_batch rows is fed as grad_accum micro-batches of
  # global_batch // grad_accum rows (the data pipeline's batch), their gradients averaged inside the step,
  # so activation memory is that of one micro-batch.
  grad_accum: int = 1
  # Batch-size ramp (train/batch_ramp.py): micro-batches per update grow linearly from batch_ramp_start
  # to grad_accum over the first batch_ramp_steps updates; 0: every update takes grad_accum of them.
  batch_ramp_steps: int = 0
  batch_ramp_start: int = 1
  # Also cap micro-batches per update at max(1, B_simple // micro-batch rows), B_simple being the noise
  # probe's current estimate (needs train.noise_scale_every > 0): the batch grows no larger than useful.
  batch_ramp_noise_cap: bool = False

  @property
  def micro_batch(self) -> int:
    """Rows of one micro-batch: the data pipeline's global batch, and the step's unit of work."""
    return self.global_batch // max(self.grad_accum, 1)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The parallel layout: mesh sizes (one may be -1 to take the remaining devices) and how each is used."""

  data: int = -1  # -1: every device left after tensor and pipeline.
  tensor: int = 1
  pipeline: int = 1
  fsdp: bool = False  # Shard parameters and optimizer state over `data` (ZeRO-3).
  sequence_parallel: bool = False  # Shard the residual stream's length over `tensor` between blocks.
  schedule: str = "gpipe"  # Pipeline schedule: gpipe | circular | 1f1b (activation memory bounded by stages).
  microbatches: int = 0  # Pipeline microbatches per step; 0: 4 x pipeline stages (1 when not pipelined).
  repeats: int = 1  # Circular schedule: layer chunks per stage (each microbatch goes round `repeats` times).
  auto: bool = False  # Let the topology adapter choose data/tensor/pipeline/fsdp/microbatches (`codex mesh`).


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Orbax checkpoint cadence and retention."""

  every: int = 100
  max_to_keep: int = 3
  async_save: bool = True
  allow_dtype_change: bool = False  # Restore tensors saved in another dtype, converting them.
  # Checkpoint averaging: snapshots every `average_every` steps before each eval (and the last step), the
  # newest `average_count` kept whatever max_to_keep says, their parameter mean evaluated (checkpoint/average.py).
  average_count: int = 4
  average_every: int = 0  # Steps between snapshots; 0: no snapshots, no in-loop average.
  # Or by wall-clock: a snapshot once this many seconds have passed since the last save; the average at a
  # step takes the newest average_count - 1 saved checkpoints and the live params. Exclusive with average_every.
  average_every_seconds: float = 0.0
  ema_decay: float = 0.0  # 0: plain mean; else snapshot i (0 = newest) weighs ema_decay**i.


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Held-out loss and task cadence (codex_jax/eval)."""

  every: int = 100
  batches: int = 4  # Held-out batches of one micro-batch each (train.global_batch / train.grad_accum rows).
  tasks: str = "builtin"  # Comma-separated: "builtin" and/or folders of *.jsonl task files; "": none.
  task_examples: int = 64  # Examples per task in the training loop (`codex eval` scores all).
  at_start: bool = False  # Also evaluate the initial parameters, before the first update of a fresh run (step 0).


OBJECTIVES = ("text", "vision", "align", "world", "action")  # The order of every per-objective tuple.
TEXT_ONLY = (1.0, 0.0, 0.0, 0.0, 0.0)  # objectives.weights of a text-only run (the stack before issue 6).
BALANCE_MODES = ("fixed", "lagrangian")
ALIGN_KINDS = ("clip", "siglip")
ALIGN_POOLS = ("mean", "last")


@dataclasses.dataclass(frozen=True)
class BalanceSettings:
  """The loss-weight tuner (objectives/balance.py): share-of-trunk-gradient bounds and its dual ascent."""

  mode: str = "lagrangian"  # fixed: the configured weights throughout | lagrangian: tuned within the bounds.
  low: tuple[float, ...] = (0.05, 0.05, 0.05, 0.05, 0.05)  # Least share of the trunk gradient norm, per objective.
  high: tuple[float, ...] = (0.6, 0.6, 0.6, 0.6, 0.6)  # Most share.
  measure_every: int = 10  # k: steps between measurements (a forward, then a last-block backward per objective).
  dual_lr: float = 0.5  # eta: multiplier step per measurement, in log-share units.
  ema_decay: float = 0.9  # Of the measured trunk gradient norms; per measurement, not per step.
  slack: float = 0.01  # The dual aims at [low + slack, high - slack] so shares settle inside [low, high].
  max_multiplier: float = 20.0  # Box on the multipliers: weight ratios stay within exp(+-2 * this).


@dataclasses.dataclass(frozen=True)
class VisionObjective:
  mask_ratio: float = 0.75  # Share of an MAE image's patches replaced by the mask embedding.
  masked_fraction: float = 0.5  # Share of the batch's images masked for MAE (the rest stay clean for captions).
  temperature: float = 0.1  # Of the two-view image InfoNCE.
  max_images: int = 128  # Image slots per global batch; more are dropped (and counted).


@dataclasses.dataclass(frozen=True)
class AlignObjective:
  kind: str = "clip"  # clip: symmetric InfoNCE, learned temperature | siglip: sigmoid loss, learned t and b.
  blind_fraction: float = 0.5  # Share of media+caption pairs whose caption cannot attend to its media.
  dim: int = 64  # Width of the shared embedding space.
  max_pairs: int = 128  # Pair slots per global batch.
  # mean: the mean trunk output over the media's / the caption's positions | last: the output at the last
  # position of each, the one that has attended to all of it in a causal trunk (CLIP's text tower takes EOS).
  pool: str = "mean"


@dataclasses.dataclass(frozen=True)
class WorldObjective:
  ema_decay: float = 0.99  # Of the target encoder (shared with vision's second view).
  max_chunks: int = 128  # Video chunk slots per global batch.


@dataclasses.dataclass(frozen=True)
class ActionObjective:
  horizon: int = 4  # Actions per predicted chunk.
  dim: int = 1  # Leading action values predicted (of the zero-padded feature vector).
  sample_steps: int = 10  # Euler steps of the flow sampler.
  max_chunks: int = 128  # Action position slots per global batch.


@dataclasses.dataclass(frozen=True)
class ObjectivesConfig:
  """The pretraining objectives (text, vision, align, world, action), their weights and settings."""

  weights: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 0.0)  # Per objective, in OBJECTIVES order; 0: off.
  # Per manifest phase (e.g. "anneal"): the weights from that phase's start step; a phase not named uses `weights`.
  phase_weights: dict[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)
  balance: BalanceSettings = BalanceSettings()
  vision: VisionObjective = VisionObjective()
  align: AlignObjective = AlignObjective()
  world: WorldObjective = WorldObjective()
  action: ActionObjective = ActionObjective()

  def phase_table(self) -> dict[str, tuple[float, ...]]:
    return {name: tuple(w) for name, w in self.phase_weights.items()}

  @property
  def enabled(self) -> tuple[str, ...]:
    """Objectives with a positive weight in some phase."""
    tables = [self.weights, *self.phase_weights.values()]
    return tuple(name for i, name in enumerate(OBJECTIVES) if any(w[i] > 0 for w in tables if len(w) > i))

  @property
  def multimodal(self) -> bool:
    return any(name != "text" for name in self.enabled)


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig
  data: DataConfig
  optimizer: OptimizerConfig
  train: TrainConfig
  mesh: MeshConfig
  checkpoint: CheckpointConfig
  eval: EvalConfig
  objectives: ObjectivesConfig = ObjectivesConfig()


GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "train": TrainConfig,
    "mesh": MeshConfig,
    "checkpoint": CheckpointConfig,
    "eval": EvalConfig,
    "objectives": ObjectivesConfig,
}

# Keys filled at the config boundary (config/load.py `derive`) from other groups, never set by hand.
DERIVED = frozenset({"model.objectives", "model.pixel_dim", "model.align_dim", "model.action_dim",
                     "model.action_horizon"})

# Keys that may change when a run resumes from its workdir; any other change is refused.
RESUME_MUTABLE = frozenset({
    "train.steps",
    "train.log_every",
    "train.xla_flop_check",
    "checkpoint.every",
    "checkpoint.max_to_keep",
    "checkpoint.async_save",
    "eval.every",
    "eval.batches",
    "eval.tasks",
    "eval.task_examples",
    "eval.at_start",
    # The noise-scale probe only measures and logs; it never touches the state. (Under
    # train.batch_ramp_noise_cap its estimate also caps the batch of the updates after the resume.)
    "train.noise_scale_every",
    "train.noise_scale_microbatches",
    "train.noise_scale_ema",
    # The ramp only decides how many of the pipeline's micro-batches each later update draws: no state, and
    # no data position, depends on it. train.grad_accum is not here: it sets the pipeline's batch shape
    # (the Grain iterator's state, the ledger's rows per batch).
    "train.batch_ramp_steps",
    "train.batch_ramp_start",
    "train.batch_ramp_noise_cap",
    "checkpoint.average_count",
    "checkpoint.average_every",
    "checkpoint.average_every_seconds",
    "checkpoint.ema_decay",
    "data.num_workers",
    # The layout: the state is restored into the new mesh's shardings and the math is the same to f32
    # rounding (tests/test_parallel.py); the lineage record of each checkpoint names its layout.
    "mesh.data",
    "mesh.tensor",
    "mesh.pipeline",
    "mesh.fsdp",
    "mesh.sequence_parallel",
    "mesh.schedule",
    "mesh.microbatches",
    "mesh.repeats",
    "mesh.auto",
    # The data may change only with a new data.phase; the manifest hash in the checkpoint enforces it.
    "data.manifest",
    "data.phase",
    "data.licence_policy",
    "data.licence_allow",
    "data.licence_deny",
    "data.on_malformed",
})
