"""Measure a modality's exchange rate: paired short runs trading language tokens for (say) image tokens.

The manifest's exchange rate of a modality says how many language tokens one of its positions is worth
(data/manifest.py). To measure it for held-out text loss, three runs of the same model and seed:

  text-half  the manifest's text-only sources (shares renormalised), steps / 2
  text       the same, `steps`: with text-half, the text-only curve L(D) = c D^-k through two points
  mixed      the same text sources with `fraction` of the effective share moved to the sources that carry
             the modality (digits-captions for image), `steps`: the same positions, some traded

All three are scored on the text-only mixture's held-out split. The mixed run saw D_text language
tokens and D_mod positions of the modality (both read from its data accounting, metrics.jsonl); its
held-out loss L_mixed matches the text-only curve at D_eff = (L_mixed / c)^(-1/k), so

  rate = (D_eff - D_text) / D_mod

1 would mean a position of the modality is worth a text token for text loss, 0 that it is worth nothing,
below 0 that it costs text loss. A modality's sources can carry text too (captions); that text is counted
in D_text. With two points and one seed the number is rough: rerun at other steps / seeds to see spread.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable

from codex_jax import atomic
from codex_jax.config.schema import TEXT_ONLY
from codex_jax.data.manifest import first_phase, write_manifest_file
from codex_jax.data.tokenizer import pinned_path


def manifests(path: str, out: str, modality: str, fraction: float) -> tuple[str, str]:
  """(text-only, mixed) one-phase copies of the manifest at `path`, written under `out`."""
  raw, phase = first_phase(path)
  text = [s for s in raw["sources"] if s["modalities"] == ["text"] and s["share"][phase] > 0]
  carriers = [s for s in raw["sources"] if modality in s["modalities"] and s["share"][phase] > 0]
  if not text or not carriers:
    raise ValueError(f"{path}: needs text-only sources and sources with {modality!r} in phase {phase!r} "
                     f"(found {len(text)} and {len(carriers)})")
  paths = []
  for name, groups in (("text", [(text, 1.0)]), ("mixed", [(text, 1 - fraction), (carriers, fraction)])):
    sources = []
    for group, weight in groups:
      total = sum(s["share"][phase] for s in group)
      sources += [{**s, "share": {phase: weight * s["share"][phase] / total}} for s in group]
    paths.append(write_manifest_file({**raw, "name": f"{raw['name']}-{name}", "sources": sources},
                                     os.path.join(out, f"{name}.yaml")))
  return paths[0], paths[1]


def raw_tokens(workdir: str, modality: str) -> float:
  """Positions of `modality` a run trained on, summed from its metrics.jsonl data accounting."""
  key, total = f"data/modality/{modality}/raw_tokens", 0.0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      total += json.loads(line).get(key) or 0.0
  return total


def rate(half: tuple[float, float], full: tuple[float, float], mixed: tuple[float, float, float]) -> dict:
  """The rate from (D, loss) of the two text-only runs and (D_text, D_mod, loss) of the mixed one."""
  (d1, l1), (d2, l2), (d_text, d_mod, l_mixed) = half, full, mixed
  k = -math.log(l2 / l1) / math.log(d2 / d1)
  if not k > 0:
    raise ValueError(f"held-out loss did not fall with text tokens ({l1:.4f} at {d1:.0f}, {l2:.4f} at {d2:.0f}): "
                     f"train longer before reading a rate off these runs")
  c = l2 * d2 ** k
  d_eff = (l_mixed / c) ** (-1 / k)
  return {"rate": (d_eff - d_text) / d_mod, "effective_text_tokens": d_eff, "text_curve": {"c": c, "k": k}}


def measure(out: str, base_manifest: str, modality: str, fraction: float, steps: int,
            train: Callable[[str, dict], None], heldout: Callable[[str, str], float],
            log: Callable[[str], None] = print) -> dict:
  """Trains the three runs (train(workdir, overrides); a finished one resumes as a no-op), scores them with
  heldout(workdir, text_manifest) (in the run's own pinned tokenizer) and returns the rate and its inputs."""
  os.makedirs(out, exist_ok=True)
  text, mixed = manifests(base_manifest, out, modality, fraction)
  runs = {"text-half": (text, max(1, steps // 2)), "text": (text, steps), "mixed": (mixed, steps)}
  result = {"modality": modality, "fraction": fraction, "steps": steps, "runs": {}}
  tokenizer = {}  # Losses compare only in the same tokens: the first run's tokenizer is every later run's.
  for name, (manifest, n) in runs.items():
    workdir = os.path.join(out, name)
    log(f"{name}: {n} steps on {manifest}")
    train(workdir, {"data.manifest": manifest, "train.steps": n, "eval.every": n, "checkpoint.every": n,
                    "eval.tasks": "", "objectives.weights": TEXT_ONLY, **tokenizer})  # Text loss alone is compared.
    tokenizer = tokenizer or {"data.tokenizer_path": pinned_path(workdir)}
    result["runs"][name] = {"steps": n, "text_tokens": raw_tokens(workdir, "text"),
                            f"{modality}_tokens": raw_tokens(workdir, modality),
                            "heldout_text_loss": heldout(workdir, text)}
    log(f"  held-out text loss {result['runs'][name]['heldout_text_loss']:.4f}")
  r = result["runs"]
  result.update(rate((r["text-half"]["text_tokens"], r["text-half"]["heldout_text_loss"]),
                     (r["text"]["text_tokens"], r["text"]["heldout_text_loss"]),
                     (r["mixed"]["text_tokens"], r["mixed"][f"{modality}_tokens"], r["mixed"]["heldout_text_loss"])))
  atomic.write_json(os.path.join(out, "EXCHANGE_RATE.json"), result)
  return result
