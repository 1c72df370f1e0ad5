"""The inference-adjusted choice (Sardana & Frankle 2024, "Beyond Chinchilla-Optimal").

A model served for T lifetime tokens costs 6 N D to train plus 2 N T to run. Holding the predicted loss at the
compute-optimal point's L*, D becomes a function of N on the iso-loss curve (D(N) from L(N, D) = L*), and the
total cost 6 N D(N) + 2 N T is minimised over log N by a bounded 1-D search. It is convex enough in log N that
golden-section search on a bracket from the smallest N that can reach L* up to the compute-optimal N converges;
more inference always moves the choice to a smaller N trained on more tokens.
"""

from __future__ import annotations

import math

from codex_jax.planning.laws import Law, training_flops

_GOLDEN = (math.sqrt(5) - 1) / 2


def total_flops(law: Law, n: float, target_loss: float, inference_tokens: float) -> float:
  return lifetime_flops(n, law.tokens_for_loss(n, target_loss), inference_tokens)


def lifetime_flops(n: float, d: float, inference_tokens: float) -> float:
  """Training (6ND) plus serving `inference_tokens` (2N each)."""
  return training_flops(n, d) + 2.0 * n * inference_tokens


def inference_adjusted(law: Law, flops: float, inference_tokens: float, iters: int = 200) -> dict[str, float]:
  """(N, D) at the compute-optimal loss for `flops` that minimise training + inference FLOPs."""
  if inference_tokens < 0:
    raise ValueError(f"--inference-tokens={inference_tokens:g}: must be >= 0")
  n_opt, d_opt = law.compute_optimal(flops)
  target = law.loss(n_opt, d_opt)
  # The smallest N that can reach the target at all (D -> inf), then a hair above it so D stays finite.
  n_min = (law.A / (target - law.E)) ** (1.0 / law.alpha) * (1 + 1e-9)
  lo, hi = math.log(n_min), math.log(n_opt) + 1.0  # The optimum lies below n_opt; the margin keeps it inside.

  def cost(log_n: float) -> float:
    return total_flops(law, math.exp(log_n), target, inference_tokens)

  a, b = lo, hi
  c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
  fc, fd = cost(c), cost(d)
  for _ in range(iters):
    if fc <= fd:
      b, d, fd = d, c, fc
      c = b - _GOLDEN * (b - a)
      fc = cost(c)
    else:
      a, c, fc = c, d, fd
      d = a + _GOLDEN * (b - a)
      fd = cost(d)
    if b - a < 1e-10:
      break
  n = math.exp((a + b) / 2)
  d_tokens = law.tokens_for_loss(n, target)
  return {"params": n, "tokens": d_tokens, "loss": law.loss(n, d_tokens),
          "training_flops": training_flops(n, d_tokens), "inference_flops": 2.0 * n * inference_tokens,
          "total_flops": lifetime_flops(n, d_tokens, inference_tokens),
          "compute_optimal_total_flops": lifetime_flops(n_opt, d_opt, inference_tokens),
          "params_ratio": n / n_opt, "smaller_by": 1.0 - n / n_opt}
