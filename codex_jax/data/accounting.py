"""Counts what each batch really holds: raw and effective tokens per source and modality, vs targets.

Computed on the host from the batch's `source_ids` and `modality_ids` (never sent to the device), so
the shares are measured on what the model trains on, after mixing, packing and padding.
"""

from __future__ import annotations

import numpy as np

from codex_jax.data.plan import DataPlan
from codex_jax.data.records import MODALITIES, MODALITY_IDS


class TokenAccountant:
  """Running totals since the current phase began; `metrics` gives the per-step and cumulative view."""

  def __init__(self, plan: DataPlan, phase: str, totals: dict | None = None):
    self.names = [s.source.name for s in plan.sources]
    self.phase = phase
    self.targets = plan.shares(phase)
    # rates[source id, modality id]; row 0 / column 0 are padding.
    self.rates = np.zeros((len(self.names) + 1, len(MODALITIES) + 1))
    for s in plan.sources:
      for m, i in MODALITY_IDS.items():
        self.rates[s.source_id, i] = s.source.exchange_rates[m]
    self.raw = np.zeros_like(self.rates)  # Cumulative positions per (source, modality).
    if totals and totals.get("phase") == phase and np.shape(totals.get("raw")) == self.raw.shape:
      self.raw = np.asarray(totals["raw"], np.float64)

  def count(self, batch: dict[str, np.ndarray]) -> np.ndarray:
    """Positions per (source id, modality id) in one batch."""
    counts = np.zeros_like(self.rates)
    np.add.at(counts, (np.asarray(batch["source_ids"]).ravel(), np.asarray(batch["modality_ids"]).ravel()), 1)
    return counts

  def update(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
    """Adds one batch; returns its metrics (per step) and the realised shares so far (cumulative)."""
    step_raw = self.count(batch)
    self.raw += step_raw
    step_eff, total_eff = step_raw * self.rates, self.raw * self.rates
    metrics: dict[str, float] = {}
    cumulative = total_eff[1:].sum(axis=1)
    all_eff = cumulative.sum()
    for i, name in enumerate(self.names, start=1):
      metrics[f"data/{name}/raw_tokens"] = float(step_raw[i].sum())
      metrics[f"data/{name}/effective_tokens"] = float(step_eff[i].sum())
      metrics[f"data/{name}/share"] = float(cumulative[i - 1] / all_eff) if all_eff else 0.0
      metrics[f"data/{name}/target_share"] = self.targets[name]
    for m, j in MODALITY_IDS.items():
      metrics[f"data/modality/{m}/raw_tokens"] = float(step_raw[1:, j].sum())
      metrics[f"data/modality/{m}/effective_tokens"] = float(step_eff[1:, j].sum())
    real = step_raw[1:].sum()
    metrics["data/padding_fraction"] = float(1.0 - real / step_raw.sum()) if step_raw.sum() else 0.0
    metrics["data/max_share_error"] = max(abs(metrics[f"data/{n}/share"] - self.targets[n]) for n in self.names)
    return metrics

  def state(self) -> dict:
    return {"phase": self.phase, "raw": self.raw.tolist()}
