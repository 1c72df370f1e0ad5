"""Typed, frozen configuration: the only form of the config that modules below the CLI see."""

from __future__ import annotations

import dataclasses

DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")


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
  scan_layers: bool = True
  remat: str = "none"
  attention_impl: str = "auto"
  attention_chunks: int = 1  # Query chunks that skip masked blocks; >1 pays where no fused kernel does.

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.num_heads


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the tokens come from and how they are packed."""

  corpus: str = "embedded"  # The documents that ship with Python (see data/corpus.py).
  corpus_max_bytes: int = 0  # 0: the whole corpus.
  tokenizer_path: str = ""  # "": train a byte-level BPE on the corpus (cached).
  seq_len: int = 256
  seed: int = 0
  eval_fraction: float = 0.01
  num_workers: int = 0  # Grain worker processes; 0 reads in the trainer process.
  packing_bins: int = 0  # First-fit packing bins; 0: the local batch size.
  shuffle_window: int = 1024  # Pieces shuffled together before packing; 0 or 1: off.


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with linear warmup then cosine decay."""

  learning_rate: float = 3e-3
  min_lr_ratio: float = 0.1
  warmup_fraction: float = 0.02
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  no_decay: tuple[str, ...] = ("norm", "bias", "embed")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Length of the run, batch, loss terms and cadence."""

  steps: int = 300
  global_batch: int = 16
  seed: int = 0
  z_loss: float = 1e-4
  log_every: int = 10


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh sizes; one of them may be -1 to take the remaining devices."""

  data: int = -1
  tensor: int = 1
  pipeline: int = 1
  fsdp: bool = False  # Shard parameters and optimizer state over `data` (ZeRO-3).


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Orbax checkpoint cadence and retention."""

  every: int = 100
  max_to_keep: int = 3
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Held-out loss cadence."""

  every: int = 100
  batches: int = 4


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig
  data: DataConfig
  optimizer: OptimizerConfig
  train: TrainConfig
  mesh: MeshConfig
  checkpoint: CheckpointConfig
  eval: EvalConfig


GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "train": TrainConfig,
    "mesh": MeshConfig,
    "checkpoint": CheckpointConfig,
    "eval": EvalConfig,
}

# Keys that may change when a run resumes from its workdir; any other change is refused.
RESUME_MUTABLE = frozenset({
    "train.steps",
    "train.log_every",
    "checkpoint.every",
    "checkpoint.max_to_keep",
    "checkpoint.async_save",
    "eval.every",
    "eval.batches",
    "data.num_workers",
})
