"""Planned tokens through the manifest's exchange rates: D in effective tokens, and the raw positions it implies.

D from a scaling law is in language-equivalent (effective) tokens: one text token is one, an image patch
`rate` of one (data/manifest.py). A phase's shares are shares of effective tokens, so source s gets
share_s * D effective tokens. How those split across a multimodal source's modalities depends on its records;
without reading them the plan assumes equal raw positions per modality, so the source's raw positions are
share_s * D / mean(rates_s), split evenly. A training run's data accounting (data/accounting.py) measures
the real split; this is for sizing a corpus before there is one.
"""

from __future__ import annotations

from codex_jax.data.manifest import load_manifest


def raw_tokens(manifest_path: str, effective_tokens: float, phase: str | None = None) -> dict:
  manifest = load_manifest(manifest_path)
  names = [p.name for p in manifest.phases]
  phase = phase or names[0]
  if phase not in names:
    raise ValueError(f"phase {phase!r} is not in {manifest.path}; its phases are {names}")
  sources, by_modality = {}, {}
  for s in manifest.sources:
    effective = s.share[phase] * effective_tokens
    rates = [s.exchange_rates[m] for m in s.modalities]
    raw_total = effective / (sum(rates) / len(rates)) if effective else 0.0
    raw = {m: raw_total / len(s.modalities) for m in s.modalities}
    sources[s.name] = {"share": s.share[phase], "effective_tokens": effective, "raw_tokens": raw,
                       "exchange_rates": {m: s.exchange_rates[m] for m in s.modalities}}
    for m, count in raw.items():
      by_modality[m] = by_modality.get(m, 0.0) + count
  return {"manifest": manifest.path, "phase": phase, "effective_tokens": effective_tokens,
          "raw_tokens": by_modality, "raw_total": sum(by_modality.values()), "sources": sources,
          "assumption": "equal raw positions per modality within a multimodal source"}
