"""A decoder shape whose parameter count is close to a target N, and the batch a compute budget calls for.

Shapes follow the Kaplan / Chinchilla tables: d_model a multiple of 128 with d_model / num_layers in 64-128,
head_dim 128 from d_model 2048 up (64 below), grouped-query attention with 4 query heads per kv head where
there are at least 8 heads, and a SwiGLU width of 8/3 d_model rounded to a multiple of 256. N is the total
count of `telemetry.flops.param_counts` (embeddings included, as Hoffmann et al. count).

The batch follows DeepSeek LLM (Bi et al. 2024, eq. 1): B_opt = 0.2920 C^0.3271 tokens and
lr_opt = 0.3118 C^-0.1250, with C = M D as they define it: M the non-embedding training FLOPs per token
(6 x parameters outside the embedding and unembedding + 6 n_layer l_seq d_model of attention), D the
training tokens. They fitted it on budgets of 1e17 to 3e20 FLOPs; outside that a plan says it extrapolates. The batch is rounded to the nearest
multiple of the sequences one step needs per data-parallel group (so it divides the mesh), at least one of
them, and capped at the critical batch size when one is given.
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
  non_vocab: int  # Parameters outside the embedding and unembedding (DeepSeek's M counts these).

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
  counts = param_counts(cfg)
  return Shape(num_layers, d_model, heads, kv, mlp, counts["total"],
               counts["total"] - counts["embedding"] - counts["unembedding"])


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


DEEPSEEK_FITTED = (1e17, 3e20)  # The budgets (C = M D) DeepSeek LLM fitted its batch and learning-rate rule on.


def rule_flops(s: Shape, seq_len: int, tokens: float) -> float:
  """DeepSeek's C = M D: M = 6 x non-vocabulary parameters + 6 n_layer seq_len d_model per token."""
  return (6 * s.non_vocab + 6 * s.num_layers * seq_len * s.d_model) * tokens


def extrapolation(flops: float) -> str | None:
  """A warning when the batch rule is applied outside the budgets it was fitted on, else None."""
  low, high = DEEPSEEK_FITTED
  if low <= flops <= high:
    return None
  decades = math.log10(flops / high) if flops > high else math.log10(low / flops)
  side = "above" if flops > high else "below"
  return (f"the batch and learning-rate rule is extrapolated {decades:.1f} decades {side} the budgets DeepSeek LLM "
          f"fitted it on ({low:.0e}-{high:.0e} non-embedding FLOPs); treat them as a starting point for a sweep")


def batch_tokens(flops: float, critical_batch_tokens: float | None = None) -> float:
  """DeepSeek LLM's compute-optimal batch in tokens for C = M D (`rule_flops`), capped at the critical batch."""
  tokens = 0.2920 * flops ** 0.3271
  return min(tokens, critical_batch_tokens) if critical_batch_tokens else tokens


def learning_rate(flops: float) -> float:
  """DeepSeek LLM's compute-optimal peak learning rate for C = M D."""
  return 0.3118 * flops ** -0.1250


def global_batch(flops: float, seq_len: int, critical_batch_tokens: float | None = None, multiple: int = 1) -> int:
  """Sequences per step: the batch in tokens over seq_len, to the nearest multiple of `multiple` (the data-parallel
  width), at least one multiple, and not above the critical batch unless one multiple already is."""
  if multiple < 1:
    raise ValueError(f"batch multiple {multiple}: must be a positive sequence count")
  sequences = batch_tokens(flops, critical_batch_tokens) / seq_len
  batch = max(1, round(sequences / multiple)) * multiple
  if critical_batch_tokens and batch * seq_len > critical_batch_tokens:
    batch = max(1, math.floor(critical_batch_tokens / seq_len / multiple)) * multiple
  return batch
