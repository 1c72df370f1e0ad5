"""Analytic parameter and FLOP counts for the decoder, and the FLOPs XLA counts for a compiled step."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from codex_jax.config.schema import OBJECTIVES, Config, ModelConfig
from codex_jax.model.heads import TAU_DIM


def param_counts(cfg: ModelConfig) -> dict[str, int]:
  """Exact parameter counts for the Llama-style layout (no biases).

  Per layer: RMSNorm [D] + q [D,H,K] + k,v [D,G,K] + o [H,K,D] + RMSNorm [D] + gate,up [D,F] + down [F,D];
  plus embedding [V,D], final RMSNorm [D], unless tied unembedding [D,V], and with non-text inputs
  (feature_dim E > 0) a feature projection [E,D] and a modality embedding [7,D] (counted as embedding).
  `non_embedding` is `total` less the input embedding table (Kaplan et al.'s N); an untied unembedding
  stays in it because it is a real matmul, and a tied one is the embedding table itself. `mtp` is the
  training-only multi-token-prediction modules (per depth: projection [2,D,D], one layer, 3 RMSNorms),
  kept out of `total`: they are not exported and the model is the same size without them.
  """
  d, v, f, k = cfg.d_model, cfg.vocab_size, cfg.mlp_dim, cfg.resolved_head_dim
  h, g = cfg.num_heads, cfg.num_kv_heads
  attention = d * h * k + 2 * d * g * k + h * k * d
  mlp = 3 * d * f
  per_layer = attention + mlp + 2 * d
  embedding = v * d
  unembedding = 0 if cfg.tie_embeddings else d * v
  feature_in = cfg.feature_dim * d
  embedding += 7 * d if cfg.feature_dim else 0
  total = embedding + cfg.num_layers * per_layer + d + unembedding + feature_in
  return {
      "total": total,
      "embedding": embedding,
      "non_embedding": total - embedding,
      "unembedding": unembedding,
      "per_layer": per_layer,
      "attention_per_layer": attention,
      "mlp_per_layer": mlp,
      "feature_in": feature_in,
      "mtp": cfg.mtp_depth * (2 * d * d + per_layer + 3 * d),
      "heads": sum(head_counts(cfg).values()),
  }


def head_counts(cfg: ModelConfig) -> dict[str, int]:
  """Parameters of each non-text objective's heads (model/heads.py), by objective; {} for a text-only model.

  Training only, like `mtp`: kept out of `total` (the exported model has none of them). Linear layers carry
  a bias. vision: mask embedding [D] + pixel head [D,X] + projection MLP [D,D],[D,D]; align: two
  projections [D,E] + (log scale, bias); world: action projection [F,D] + null action [D] + predictor MLP
  [2D,2D],[2D,D]; action: flow MLP [D + T*A + 32, 2D],[2D, T*A] (32: the flow-time embedding).
  """
  d, on = cfg.d_model, set(cfg.objectives)
  linear = lambda n_in, n_out: n_in * n_out + n_out  # noqa: E731
  ta = cfg.action_horizon * cfg.action_dim
  counts = {
      "vision": d + linear(d, cfg.pixel_dim) + 2 * linear(d, d),
      "align": 2 * linear(d, cfg.align_dim) + 2,
      "world": linear(cfg.feature_dim, d) + d + linear(2 * d, 2 * d) + linear(2 * d, d),
      "action": linear(d + ta + TAU_DIM, 2 * d) + linear(2 * d, ta),
  }
  return {name: n for name, n in counts.items() if name in on}


def matmul_params(cfg: ModelConfig) -> int:
  """Weights that take part in a matmul per token: every projection plus the output projection."""
  c = param_counts(cfg)
  # The output projection costs D*V per token whether or not it shares storage with the embedding;
  # the embedding lookup is a gather and costs nothing; norms are elementwise and ignored.
  return cfg.num_layers * (c["attention_per_layer"] + c["mlp_per_layer"]) + cfg.d_model * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Model FLOPs of one training step (forward + backward) per token.

    6 * N_matmul + 12 * num_layers * num_heads * head_dim * seq_len

  N_matmul is `matmul_params` (projections + output projection, no embedding lookup): 2 FLOPs per
  weight forward, 4 backward. The second term is QK^T and AV: 2 * 2 * H * K * T forward per token
  per layer, times 3 for training. This is the PaLM (appendix B) convention: the full T x T score
  matrix, not halved for the causal mask, so MFU stays comparable with published numbers; it
  ignores rematerialisation, which spends hardware FLOPs but no model FLOPs. The feature projection
  (non-text inputs) runs at every position and costs 4 * E * D: forward and weight gradient, no input
  gradient. Each MTP depth adds its projection [2D, D], one layer (matmuls and attention) and another
  pass through the output projection.
  """
  c = param_counts(cfg)
  attention = 12 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * seq_len
  mtp_matmul = 2 * cfg.d_model * cfg.d_model + c["attention_per_layer"] + c["mlp_per_layer"] + cfg.d_model * cfg.vocab_size
  mtp = cfg.mtp_depth * (6 * mtp_matmul + 12 * cfg.num_heads * cfg.resolved_head_dim * seq_len)
  return float(6 * matmul_params(cfg) + attention + 4 * cfg.feature_dim * cfg.d_model + mtp)


def layer_forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """One block's forward per token: 2 per weight, QK^T and AV."""
  c = param_counts(cfg)
  return float(2 * (c["attention_per_layer"] + c["mlp_per_layer"]) + 4 * cfg.num_heads * cfg.resolved_head_dim * seq_len)


def trunk_forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """One forward pass of the layer stack (no output projection) per token, the feature projection included:
  what the EMA target encoder and the tuner's zeroed-block trunk cost."""
  return cfg.num_layers * layer_forward_flops_per_token(cfg, seq_len) + 2 * cfg.feature_dim * cfg.d_model


def head_matmuls(cfg: Config) -> int:
  """Sum over the non-text heads of weights x slot rows they run on, per micro-batch: every head runs on its
  table's full capacity (objectives/slots.py), filled or not."""
  m, o = cfg.model, cfg.objectives
  D, on = m.d_model, set(o.enabled)
  patches = (cfg.data.image_size // cfg.data.patch_size) ** 2
  ta = m.action_horizon * m.action_dim
  rows = {
      "vision": o.vision.max_images * (patches * D * m.pixel_dim + 2 * D * D),  # Pixel head; projection MLP.
      "align": o.align.max_pairs * 2 * D * m.align_dim,  # Media and caption projections.
      "world": o.world.max_chunks * (m.feature_dim * D + 2 * D * 2 * D + 2 * D * D),  # Action in; predictor MLP.
      "action": o.action.max_chunks * ((D + ta + TAU_DIM) * 2 * D + 2 * D * ta),  # Flow MLP.
  }
  return sum(n for name, n in rows.items() if name in on)


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """FLOPs of one update by part. `mean` is what a step costs on average (MFU); `measuring` is a step that
  measures the tuner's norms, which is what XLA counts (its cost analysis takes a conditional's costlier
  branch)."""

  online: float   # Forward + backward of the model on the update's tokens (train_flops_per_token).
  target: float   # The EMA target encoder's forward (vision or world on).
  heads: float    # The non-text heads, forward + backward, on their slots.
  measure: float  # The tuner's measurement: a zeroed-block trunk forward (the text head's gradient made with
                  # it), then per objective a backward pass through the last block and the heads.
  measure_every: int = 1

  @property
  def mean(self) -> float:
    return self.online + self.target + self.heads + self.measure / self.measure_every

  @property
  def measuring(self) -> float:
    return self.online + self.target + self.heads + self.measure

  def mean_of(self, measuring_count: float) -> float:
    """Another count of a measuring step (XLA's) scaled to the mean step by this split."""
    return measuring_count * self.mean / self.measuring


def step_flops(cfg: Config, rows: int, micro_batches: int = 1) -> StepFlops:
  """The step's FLOPs for an update of `rows` rows in `micro_batches` micro-batches (each with its own heads
  and measurement). A text-only config is `online` alone: train_flops_per_token x tokens."""
  m, seq_len = cfg.model, cfg.data.seq_len
  tokens = rows * seq_len
  online = train_flops_per_token(m, seq_len) * tokens
  o = cfg.objectives
  if not o.multimodal:
    return StepFlops(online, 0.0, 0.0, 0.0)
  trunk = trunk_forward_flops_per_token(m, seq_len)
  target = trunk * tokens if ("vision" in o.enabled or "world" in o.enabled) else 0.0
  slots = head_matmuls(cfg) * micro_batches
  block = layer_forward_flops_per_token(m, seq_len)
  text_head = 2 * m.d_model * m.vocab_size
  # Forward: the zeroed-block trunk, then the last block, the heads, and the output projection with its own
  # gradients (the chunked cross-entropy makes them in its forward pass: 3x, objectives/text.py) once; backward,
  # once per objective: 2x the block's forward and the heads' input gradients (the text ones only scale).
  forward = (trunk + block + 3 * text_head) * tokens + 2 * slots
  backward = len(OBJECTIVES) * (2 * block * tokens + 2 * slots)
  return StepFlops(online, target, 6 * slots, forward + backward, o.balance.measure_every)


def xla_flops(compiled: Any) -> float | None:
  """FLOPs XLA's cost model counts for one call of a compiled executable, or None if unavailable.

  For an SPMD program this is the count for ONE device's partition (each device runs the same
  per-shard program); see `xla_flops_global`. Accepts `jax.jit(f).lower(...).compile()` or a lowered
  computation. XLA counts every floating-point op it emits, remat recomputation and elementwise ops
  included, so it is an upper bound on model FLOPs rather than equal to them.
  """
  try:
    cost = compiled.cost_analysis()
  except Exception:  # Some backends / versions do not implement it.
    return None
  # Older jax returned a list with one dict per executable (one per device program); newer a dict.
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  flops = float(cost["flops"])
  return flops if flops >= 0 else None  # XLA reports -1 for "unknown".


def num_devices(compiled: Any) -> int:
  """Devices the compiled SPMD program runs on (all hosts), read from its shardings."""
  shardings = []
  for attr in ("input_shardings", "output_shardings"):
    try:
      tree = getattr(compiled, attr)
      shardings.extend(jax.tree_util.tree_leaves(tree, is_leaf=lambda x: hasattr(x, "device_set")))
    except Exception:
      pass
  sizes = [len(s.device_set) for s in shardings if hasattr(s, "device_set")]
  if sizes:
    return max(sizes)
  try:  # A program with no array inputs or outputs: fall back to this host's devices.
    return len(compiled.runtime_executable().local_devices())
  except Exception:
    return 1


def xla_flops_global(compiled: Any, devices: int | None = None) -> float | None:
  """`xla_flops` summed over the devices of an SPMD program: per-device count * device count.

  Each device executes its own partition, so the program's total is the per-device count times the
  number of devices. Work that is replicated (every device computes the same thing) is counted once
  per device, so with replicated compute this exceeds the model FLOPs.
  """
  flops = xla_flops(compiled)
  if flops is None:
    return None
  return flops * (devices if devices is not None else num_devices(compiled))

