"""A decoder shape whose parameter count is close to a target N, and the batch a compute budget calls for.

Shapes follow the Kaplan / Chinchilla tables: d_model a multiple of 128 with d_model / num_layers in 64-128,
head_dim 128 from d_model 2048 up (64 below), grouped-query attention with 4 query heads per kv head where
there are at least 8 heads, and a SwiGLU width of 8/3 d_model rounded to a multiple of 256. N is the total
count of `telemetry.flops.param_counts` (embeddings included, as Hoffmann et al. count).

The batch follows DeepSeek LLM (Bi et al. 2024, eq. 1): B_opt = 0.2920 C^0.3271 tokens and
lr_opt = 0.3118 C^-0.1250, with C in training FLOPs (their C is non-embedding FLOPs; close enough for a
plan), rounded down to a power of two sequences and capped at the critical batch size when one is given.
"""

from __future__ import annotations

import dataclasses
import math

from codex_jax.config.schema import ModelConfig
from codex_jax.telemetry.flops import param_counts

ASPECT = (64, 128)  # d_model / num_layers.


@dataclasses.dataclass(frozen=True)
class Shape:
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  params: int

  def model_values(self) -> dict[str, int]:
    return {"d_model": self.d_model, "num_layers": self.num_layers, "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads, "head_dim": 0, "mlp_dim": self.mlp_dim}


def shape_for(d_model: int, num_layers: int, vocab_size: int, *, head_dim: int = 0, mlp_multiple: int = 256) -> Shape:
  """The table's shape at this width and depth; head_dim 0 picks the table's (64, or 128 from 2048 up)."""
  head_dim = head_dim or (128 if d_model >= 2048 else 64)
  heads = max(1, d_model // head_dim)
  kv = heads // 4 if heads >= 8 and heads % 4 == 0 else heads
  mlp = max(mlp_multiple, round(8 * d_model / 3 / mlp_multiple) * mlp_multiple)
  cfg = ModelConfig(vocab_size=vocab_size, d_model=d_model, num_layers=num_layers, num_heads=heads,
                    num_kv_heads=kv, mlp_dim=mlp)
  return Shape(num_layers, d_model, heads, kv, mlp, param_counts(cfg)["total"])


def score(s: Shape, target_params: float, aspect: tuple[float, float] = ASPECT) -> float:
  """Distance of s from target_params in log count, plus half the log distance of d_model / layers from aspect."""
  ratio = s.d_model / s.num_layers
  off = max(0.0, math.log(aspect[0] / ratio), math.log(ratio / aspect[1]))
  return abs(math.log(s.params / target_params)) + 0.5 * off


def model_shape(target_params: float, vocab_size: int) -> Shape:
  """The shape closest to target_params in log count, aspect ratio penalised outside ASPECT.

  For each d_model the count is linear in num_layers, so only the two layer counts around the target are
  tried. d_model steps by 4 heads from 2048 up, so that grouped-query attention has whole kv heads.
  """
  if target_params <= 0:
    raise ValueError(f"target parameter count {target_params:g}: must be positive")
  best, best_score = None, math.inf
  widths = [*range(128, 2048, 128), *range(2048, 65536 + 1, 512)]
  for d_model in widths:
    one, two = shape_for(d_model, 1, vocab_size), shape_for(d_model, 2, vocab_size)
    per_layer = two.params - one.params
    layers = (target_params - one.params) / per_layer + 1
    for num_layers in {max(1, math.floor(layers)), max(1, math.ceil(layers))}:
      candidate = shape_for(d_model, num_layers, vocab_size)
      candidate_score = score(candidate, target_params)
      if candidate_score < best_score:
        best, best_score = candidate, candidate_score
  return best


def batch_tokens(flops: float, critical_batch_tokens: float | None = None) -> float:
  """DeepSeek LLM's compute-optimal batch in tokens, capped at the critical batch size."""
  tokens = 0.2920 * flops ** 0.3271
  return min(tokens, critical_batch_tokens) if critical_batch_tokens else tokens


def learning_rate(flops: float) -> float:
  """DeepSeek LLM's compute-optimal peak learning rate."""
  return 0.3118 * flops ** -0.1250


def global_batch(flops: float, seq_len: int, critical_batch_tokens: float | None = None) -> int:
  """Sequences per step: the batch in tokens over seq_len, rounded down to a power of two (at least 1)."""
  sequences = batch_tokens(flops, critical_batch_tokens) / seq_len
  return 2 ** max(0, math.floor(math.log2(sequences))) if sequences >= 1 else 1
