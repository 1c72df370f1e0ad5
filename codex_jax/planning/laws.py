"""The parametric loss law L(N, D) = E + A/N^alpha + B/D^beta, its named constants, and the compute-optimal split.

Training compute is C = 6 N D (N parameters, D tokens). Minimising L subject to 6 N D = C has a closed form
(Hoffmann et al. 2022, eq. 4): N_opt = G (C/6)^(beta/(alpha+beta)), D_opt = C / (6 N_opt),
with G = (alpha A / (beta B))^(1/(alpha+beta)).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

KEYS = ("E", "A", "B", "alpha", "beta")


@dataclasses.dataclass(frozen=True)
class Law:
  E: float
  A: float
  B: float
  alpha: float
  beta: float
  name: str = ""

  def loss(self, n: float, d: float) -> float:
    return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

  def tokens_for_loss(self, n: float, target: float) -> float:
    """D with L(n, D) = target; inf when n alone cannot reach it (E + A/n^alpha >= target)."""
    room = target - self.E - self.A / n ** self.alpha
    return math.inf if room <= 0 else (self.B / room) ** (1.0 / self.beta)

  def compute_optimal(self, flops: float) -> tuple[float, float]:
    """(N, D) minimising L(N, D) subject to 6 N D = flops."""
    a, b = self.alpha, self.beta
    g = (a * self.A / (b * self.B)) ** (1.0 / (a + b))
    n = g * (flops / 6.0) ** (b / (a + b))
    return n, flops / (6.0 * n)

  def constants(self) -> dict[str, float]:
    return {k: getattr(self, k) for k in KEYS}


def training_flops(n: float, d: float) -> float:
  return 6.0 * n * d


# Hoffmann et al. 2022 ("Chinchilla"), approach 3, as printed in the paper body. Rounded as printed, these
# give 32.2B parameters / 2.98T tokens at Gopher's 5.76e23 FLOPs, not the 70B / 1.4T of approaches 1-2
# (Besiroglu et al. 2024 trace this to the rounding and to an unconverged fit).
CHINCHILLA = Law(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, name="chinchilla")
# Besiroglu, Erdil, Barnett, You 2024, "Chinchilla Scaling: A replication attempt" (Epoch AI): approach 3
# refitted on data read off Hoffmann et al.'s plots; consistent with approaches 1-2 (72B / 1.33T at 5.76e23).
EPOCH = Law(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658, name="epoch")
NAMED = {"chinchilla": CHINCHILLA, "epoch": EPOCH}


def load_law(spec: str, flag: str = "--law") -> Law:
  """A named law (chinchilla | epoch) or a FIT.json written by `codex scaling fit` (its five constants)."""
  if spec in NAMED:
    return NAMED[spec]
  if not os.path.isfile(spec):
    raise FileNotFoundError(f"{flag}={spec}: no such file; expected one of {sorted(NAMED)} or a FIT.json "
                            "written by `codex scaling fit`")
  try:
    with open(spec) as f:
      raw = json.load(f)
  except ValueError as e:
    raise ValueError(f"{flag}={spec}: not valid JSON: {e}") from e
  constants = raw.get("constants", raw) if isinstance(raw, dict) else None
  if not isinstance(constants, dict):
    raise ValueError(f"{flag}={spec}: expected a JSON object with keys {list(KEYS)}")
  missing = [k for k in KEYS if not isinstance(constants.get(k), (int, float)) or isinstance(constants.get(k), bool)]
  if missing:
    raise ValueError(f"{flag}={spec}: missing or non-numeric key(s) {missing}; a FIT.json holds {list(KEYS)} "
                     "(under 'constants' or at the top level)")
  values = {k: float(constants[k]) for k in KEYS}
  bad = [k for k, v in values.items() if not (math.isfinite(v) and (v > 0 or k == "E" and v >= 0))]
  if bad:
    raise ValueError(f"{flag}={spec}: key(s) {bad} must be positive finite numbers")
  return Law(**values, name=os.path.basename(spec))
