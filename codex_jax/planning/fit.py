"""Fit E, A, B, alpha, beta of L(N, D) to (N, D, loss) runs, as in Hoffmann et al.'s approach 3, with bootstrap CIs.

Objective: sum_i Huber_delta(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i), delta = 1e-3, with
A = exp(a), B = exp(b), E = exp(e); minimised by L-BFGS-B (analytic gradient, tight tolerances: Besiroglu et
al. 2024 found the original fit stopped early) from every start of a grid, the best taken. Confidence
intervals: percentile bootstrap, resampling the points with replacement (seeded) and refitting each resample
from the full fit.

RUNS files: JSON (an object, a list of objects, or {"runs": [...]}) or JSONL (one object per line); each
object has the parameter count `params` (or `N`), the training tokens `tokens` (or `D`) and the final
`loss` (or `eval_loss`); other keys are ignored.
"""

from __future__ import annotations

import itertools
import json
import math
import os

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp, softmax

from codex_jax.planning.laws import KEYS, Law

HUBER_DELTA = 1e-3
# Starts: (a, b, e, alpha, beta); a coarser version of Hoffmann et al.'s grid (theirs has 4,500 starts).
GRID = {"a": (0.0, 10.0, 20.0), "b": (0.0, 10.0, 20.0), "e": (-1.0, 1.0), "alpha": (0.2, 0.8), "beta": (0.2, 0.8)}
_BOUNDS = [(None, None), (None, None), (None, None), (1e-4, 5.0), (1e-4, 5.0)]
_ALIASES = {"params": ("params", "N"), "tokens": ("tokens", "D"), "loss": ("loss", "eval_loss")}


def read_runs(paths: list[str]) -> np.ndarray:
  """[n, 3] array of (N, D, loss) from RUNS files; errors name the file and line or entry."""
  rows = []
  for path in paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no such RUNS file")
    with open(path) as f:
      text = f.read()
    try:
      data = json.loads(text)
      entries = data.get("runs", [data]) if isinstance(data, dict) else data
      where = [f"{path}: entry {i}" for i in range(len(entries))]
    except ValueError:
      lines = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
      try:
        entries = [json.loads(line) for _, line in lines]
      except ValueError as e:
        raise ValueError(f"{path}: neither JSON nor JSONL: {e}") from e
      where = [f"{path}:{i}" for i, _ in lines]
    for entry, at in zip(entries, where, strict=True):
      row = []
      for names in _ALIASES.values():
        value = next((entry[k] for k in names if isinstance(entry, dict) and k in entry), None)
        if not isinstance(value, (int, float)) or not value > 0:
          raise ValueError(f"{at}: needs a positive number under {' or '.join(repr(k) for k in names)} "
                           f"(got {value!r})")
        row.append(float(value))
      rows.append(row)
  if len(rows) < 5:
    raise ValueError(f"{len(rows)} run(s) in {paths}: a fit of five constants needs at least 5")
  return np.array(rows)


def _objective(x: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray) -> tuple[float, np.ndarray]:
  a, b, e, alpha, beta = x
  terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
  r = logsumexp(terms, axis=0) - log_l
  small = np.abs(r) <= HUBER_DELTA
  value = np.where(small, 0.5 * r ** 2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA)).sum()
  dr = np.clip(r, -HUBER_DELTA, HUBER_DELTA)  # Huber'(r).
  w = softmax(terms, axis=0)
  grad = np.array([(dr * w[0]).sum(), (dr * w[1]).sum(), (dr * w[2]).sum(),
                   -(dr * w[0] * log_n).sum(), -(dr * w[1] * log_d).sum()])
  return float(value), grad


def _fit(points: np.ndarray, starts: list[np.ndarray]) -> tuple[np.ndarray, float]:
  log_n, log_d, log_l = np.log(points[:, 0]), np.log(points[:, 1]), np.log(points[:, 2])
  best, best_value = None, math.inf
  for x0 in starts:
    res = minimize(_objective, x0, args=(log_n, log_d, log_l), jac=True, method="L-BFGS-B", bounds=_BOUNDS,
                   options={"maxiter": 300, "ftol": 1e-13, "gtol": 1e-9})
    if np.all(np.isfinite(res.x)) and res.fun < best_value:
      best, best_value = res.x, float(res.fun)
  return best, best_value


def _law(x: np.ndarray) -> Law:
  a, b, e, alpha, beta = (float(v) for v in x)
  return Law(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta, name="fit")


def fit(points: np.ndarray, *, bootstrap: int = 100, confidence: float = 0.95, seed: int = 0,
        grid: dict | None = None) -> dict:
  """The best fit from the grid of starts (GRID's keys), and percentile-bootstrap intervals of each constant."""
  grid = [np.array(s) for s in itertools.product(*(grid or GRID).values())]
  x, value = _fit(points, grid)
  rng = np.random.default_rng(seed)
  samples = []
  for _ in range(bootstrap):
    idx = rng.integers(0, len(points), size=len(points))
    xb, _ = _fit(points[idx], [x])
    if xb is not None:
      samples.append(_law(xb).constants())
  law = _law(x)
  tail = (1 - confidence) / 2 * 100
  intervals = {k: [float(np.percentile([s[k] for s in samples], tail)),
                   float(np.percentile([s[k] for s in samples], 100 - tail))] for k in KEYS} if samples else {}
  a_exp = law.beta / (law.alpha + law.beta)
  # A term under 0.1% of the predicted loss at every point (e.g. the N term when no budget's sizes bracket
  # its minimum) leaves its constants undetermined: resamples do not move them, so their near-zero-width
  # intervals mean "not measured", not "certain".
  terms = {("E",): np.full(len(points), law.E), ("A", "alpha"): law.A / points[:, 0] ** law.alpha,
           ("B", "beta"): law.B / points[:, 1] ** law.beta}
  total = sum(terms.values())
  flat = [k for keys, term in terms.items() if np.all(term < 1e-3 * total) for k in keys]
  return {"constants": law.constants(), "intervals": intervals, "unidentified": flat, "confidence": confidence,
          "points": len(points),
          "bootstrap": len(samples), "seed": seed, "huber_delta": HUBER_DELTA, "objective": value,
          "n_opt_exponent": a_exp, "d_opt_exponent": 1 - a_exp,
          "method": "Hoffmann et al. approach 3: Huber on log loss, L-BFGS-B from a grid, percentile bootstrap"}


def plot(points: np.ndarray, result: dict, path: str) -> str:
  """Points and the fitted law along each IsoFLOP group (runs binned by 6 N D to a quarter decade)."""
  import matplotlib
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  law = Law(**result["constants"])
  fig = Figure(figsize=(7, 5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  log_c = np.round(np.log10(6 * points[:, 0] * points[:, 1]) * 4) / 4
  groups = sorted(set(log_c.tolist()))
  cmap = matplotlib.colormaps["viridis"]
  for i, g in enumerate(groups):
    colour = cmap(i / max(1, len(groups) - 1))
    sel = log_c == g
    flops = float(np.exp(np.log(6 * points[sel, 0] * points[sel, 1]).mean()))  # The group's own budget.
    ax.scatter(points[sel, 0], points[sel, 2], color=colour, s=14, label=f"C = {flops:.2g}")
    n = np.geomspace(points[sel, 0].min() / 1.5, points[sel, 0].max() * 1.5, 100)
    ax.plot(n, [law.loss(v, flops / (6 * v)) for v in n], color=colour, lw=1)
  c = result["constants"]
  ax.set(xscale="log", xlabel="parameters N", ylabel="loss",
         title=f"L = {c['E']:.3g} + {c['A']:.4g}/N^{c['alpha']:.3g} + {c['B']:.4g}/D^{c['beta']:.3g}")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path
