"""The data manifest: sources, licences, shares per phase and exchange rates, loaded and validated.

A manifest is a YAML or JSON file (see experiments/data/default.yaml). Every problem is reported at
once, each naming the file, the source and the field, before any data is read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import yaml

from codex_jax import atomic
from codex_jax.data.errors import DataError
from codex_jax.data.records import MODALITIES, cache_dir

KINDS = ("web", "code", "books", "video", "embodied", "synthetic")
FORMAT_NAMES = ("jsonl", "parquet", "wds", "episodes", "array_record")
# Effective tokens per raw position when a manifest sets none: an image patch carries roughly 0.3-0.6x
# the signal of a language token (the seed's range); the others are assumptions to be measured.
DEFAULT_EXCHANGE_RATES = {"text": 1.0, "image": 0.45, "video": 0.3, "audio": 0.4, "proprio": 0.5, "action": 0.5}
_SHARE_TOLERANCE = 1e-6

_TOP_KEYS = {"version", "name", "description", "root", "exchange_rates", "phases", "sources"}
_SOURCE_REQUIRED = ("name", "kind", "modalities", "format", "locations", "licence", "share")
_SOURCE_KEYS = {*_SOURCE_REQUIRED, "options", "exchange_rate", "eval_fraction", "origin", "description"}
_PHASE_KEYS = {"name", "start_step"}


@dataclasses.dataclass(frozen=True)
class Phase:
  name: str
  start_step: int


@dataclasses.dataclass(frozen=True)
class Source:
  name: str
  kind: str
  modalities: tuple[str, ...]
  format: str
  locations: tuple[str, ...]  # Absolute: resolved against the manifest's root.
  licence: str
  share: dict[str, float]  # Phase name -> share of effective tokens.
  exchange_rates: dict[str, float]  # Modality -> rate, the manifest's defaults with this source's overrides.
  options: dict[str, Any]
  origin: str = ""
  # Share of this source's records held out, instead of data.eval_fraction (None: that one). For sources with
  # few records whose held-out evals need more than 1% of them (the default corpus's captioned media).
  eval_fraction: float | None = None


@dataclasses.dataclass(frozen=True)
class Manifest:
  path: str
  name: str
  root: str
  phases: tuple[Phase, ...]
  sources: tuple[Source, ...]
  exchange_rates: dict[str, float]
  description: str = ""

  def phase_at(self, step: int) -> Phase:
    """The phase whose share table applies at `step` (phases are sorted by start_step)."""
    return [p for p in self.phases if p.start_step <= step][-1]

  def canonical(self) -> dict[str, Any]:
    """Everything that defines the mixture, in a stable form (paths relative to root)."""
    return {
        "name": self.name,
        "exchange_rates": dict(sorted(self.exchange_rates.items())),
        "phases": [dataclasses.asdict(p) for p in self.phases],
        "sources": [{
            "name": s.name, "kind": s.kind, "modalities": list(s.modalities), "format": s.format,
            "locations": [os.path.relpath(loc, self.root) for loc in s.locations], "licence": s.licence,
            "share": dict(sorted(s.share.items())), "exchange_rates": dict(sorted(s.exchange_rates.items())),
            "options": s.options,
            # Only when set, so that a manifest without overrides keeps its hash.
            **({"eval_fraction": s.eval_fraction} if s.eval_fraction is not None else {}),
        } for s in self.sources],
    }


def read_manifest_file(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise DataError(f"Manifest file not found: {path!r} (data.manifest).")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  try:
    raw = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
  except (json.JSONDecodeError, yaml.YAMLError) as e:
    raise DataError(f"{path}: not valid {'JSON' if path.endswith('.json') else 'YAML'}: {e}") from e
  if not isinstance(raw, dict):
    raise DataError(f"{path}: a manifest is a mapping with keys {sorted(_TOP_KEYS)}, got {type(raw).__name__}.")
  return raw


def first_phase(path: str) -> tuple[dict[str, Any], str]:
  """The manifest file at `path` (raw) cut to its first phase, from step 0, each source keeping only that
  phase's share; and the phase's name. For runs that must all see one mixture (planning's sweeps)."""
  raw = read_manifest_file(path)
  phase = raw["phases"][0]["name"]
  raw["phases"] = [{"name": phase, "start_step": 0}]
  for source in raw["sources"]:
    source["share"] = {phase: source["share"].get(phase, 0.0)}
  return raw, phase


def write_manifest_file(raw: dict[str, Any], out: str) -> str:
  """A raw manifest written as YAML (atomically), keys in their order."""
  return atomic.write_text(out, yaml.safe_dump(raw, sort_keys=False))


def load_manifest(path: str) -> Manifest:
  """Parses and validates a manifest file; raises DataError listing every problem found."""
  path = os.path.abspath(path)
  raw = read_manifest_file(path)
  problems: list[str] = []
  for key in sorted(set(raw) - _TOP_KEYS):
    problems.append(f"unknown key {key!r} (known: {', '.join(sorted(_TOP_KEYS))})")
  if raw.get("version", 1) != 1:
    problems.append(f"version: {raw.get('version')!r} is not supported (expected 1)")
  root = _resolve_root(path, raw.get("root", "."))
  rates = _rates(raw.get("exchange_rates", {}), "exchange_rates", DEFAULT_EXCHANGE_RATES, problems)
  phases = _phases(raw.get("phases", [{"name": "main", "start_step": 0}]), problems)
  phase_names = [p.name for p in phases]
  sources = []
  raw_sources = raw.get("sources")
  if not isinstance(raw_sources, list) or not raw_sources:
    problems.append("sources: expected a non-empty list of sources")
    raw_sources = []
  for i, entry in enumerate(raw_sources):
    source = _source(entry, i, root, rates, phase_names, problems)
    if source is not None:
      sources.append(source)
  names = [s.name for s in sources]
  for name in sorted({n for n in names if names.count(n) > 1}):
    problems.append(f"source {name!r}: the name is used more than once")
  if sources and len(sources) == len(raw_sources):
    for phase in phase_names:
      total = sum(s.share[phase] for s in sources)
      if abs(total - 1.0) > _SHARE_TOLERANCE:
        listing = ", ".join(f"{s.name}={s.share[phase]:g}" for s in sources)
        problems.append(f"phase {phase!r}: shares sum to {total:.6g}, expected 1 ({listing})")
  if problems:
    raise DataError(f"{path}: invalid manifest:\n  " + "\n  ".join(problems))
  return Manifest(path=path, name=str(raw.get("name", os.path.basename(path))), root=root,
                  phases=tuple(phases), sources=tuple(sources), exchange_rates=rates,
                  description=str(raw.get("description", "")))


def _resolve_root(path: str, root: Any) -> str:
  root = os.path.expanduser(str(root).replace("{cache_dir}", cache_dir()))
  return os.path.normpath(os.path.join(os.path.dirname(path), root))


def _rates(raw: Any, where: str, defaults: dict[str, float], problems: list[str]) -> dict[str, float]:
  if not isinstance(raw, dict):
    problems.append(f"{where}: expected a mapping modality -> rate, got {raw!r}")
    return dict(defaults)
  rates = dict(defaults)
  for modality, rate in raw.items():
    if modality not in MODALITIES:
      problems.append(f"{where}.{modality}: unknown modality (known: {', '.join(MODALITIES)})")
    elif not isinstance(rate, int | float) or isinstance(rate, bool) or not 0 < rate <= 10:
      problems.append(f"{where}.{modality}: rate {rate!r} must be a number in (0, 10]")
    else:
      rates[modality] = float(rate)
  return rates


def _phases(raw: Any, problems: list[str]) -> list[Phase]:
  if not isinstance(raw, list) or not raw:
    problems.append("phases: expected a non-empty list of {name, start_step}")
    return [Phase("main", 0)]
  phases = []
  for i, entry in enumerate(raw):
    if not isinstance(entry, dict) or set(entry) != _PHASE_KEYS:
      problems.append(f"phases[{i}]: expected exactly the keys name and start_step, got {entry!r}")
      continue
    step = entry["start_step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
      problems.append(f"phases[{i}].start_step: {step!r} must be an integer >= 0")
      continue
    phases.append(Phase(str(entry["name"]), step))
  if not phases:
    return [Phase("main", 0)]
  if phases[0].start_step != 0:
    problems.append(f"phases[0].start_step: the first phase must start at step 0, got {phases[0].start_step}")
  starts = [p.start_step for p in phases]
  if starts != sorted(set(starts)):
    problems.append(f"phases: start_step values must increase strictly, got {starts}")
  names = [p.name for p in phases]
  if len(set(names)) != len(names):
    problems.append(f"phases: names must be unique, got {names}")
  return phases


def _source(entry: Any, i: int, root: str, rates: dict[str, float], phase_names: list[str],
            problems: list[str]) -> Source | None:
  if not isinstance(entry, dict):
    problems.append(f"sources[{i}]: expected a mapping, got {entry!r}")
    return None
  where = f"source {entry.get('name', f'#{i}')!r}"
  before = len(problems)
  for key in sorted(set(entry) - _SOURCE_KEYS):
    problems.append(f"{where}: unknown field {key!r} (known: {', '.join(sorted(_SOURCE_KEYS))})")
  for key in _SOURCE_REQUIRED:
    if key not in entry or entry[key] in (None, "", [], {}):
      problems.append(f"{where}: missing field {key!r}" + (" (an SPDX licence id, e.g. MIT)" if key == "licence" else ""))
  if len(problems) > before:
    return None
  if entry["kind"] not in KINDS:
    problems.append(f"{where}: kind {entry['kind']!r} is not one of {', '.join(KINDS)}")
  if entry["format"] not in FORMAT_NAMES:
    problems.append(f"{where}: format {entry['format']!r} is not one of {', '.join(FORMAT_NAMES)}")
  modalities = entry["modalities"] if isinstance(entry["modalities"], list) else [entry["modalities"]]
  for m in modalities:
    if m not in MODALITIES:
      problems.append(f"{where}: modality {m!r} is not one of {', '.join(MODALITIES)}")
  locations = entry["locations"] if isinstance(entry["locations"], list) else [entry["locations"]]
  resolved = [os.path.normpath(os.path.join(root, os.path.expanduser(str(loc)))) for loc in locations]
  for j, (loc, path) in enumerate(zip(locations, resolved, strict=True)):
    if os.path.commonpath([path, root]) != root:  # `../..` or an absolute path elsewhere.
      problems.append(f"{where}: locations[{j}] {loc!r} resolves to {path}, outside the manifest's root {root}; "
                      "data is named under its root (set `root` to the folder that holds it)")
  share = entry["share"]
  if not isinstance(share, dict):
    share = {phase_names[0]: share} if len(phase_names) == 1 else {}
    if not share:
      problems.append(f"{where}: share must map each phase ({', '.join(phase_names)}) to a number")
  for phase in phase_names:
    value = share.get(phase)
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 1 or math.isnan(value):
      problems.append(f"{where}: share.{phase} is {value!r}; expected a number in [0, 1] for every phase")
  for phase in sorted(set(share) - set(phase_names)):
    problems.append(f"{where}: share.{phase} names no phase (phases: {', '.join(phase_names)})")
  options = entry.get("options") or {}
  if not isinstance(options, dict):
    problems.append(f"{where}: options must be a mapping, got {options!r}")
  source_rates = _rates(entry.get("exchange_rate") or {}, f"{where}: exchange_rate", rates, problems)
  eval_fraction = entry.get("eval_fraction")
  if eval_fraction is not None and (not isinstance(eval_fraction, int | float) or isinstance(eval_fraction, bool)
                                    or not 0 <= eval_fraction < 1):
    problems.append(f"{where}: eval_fraction {eval_fraction!r} must be a number in [0, 1)")
  if len(problems) > before:
    return None
  return Source(name=str(entry["name"]), kind=entry["kind"], modalities=tuple(modalities), format=entry["format"],
                locations=tuple(resolved),
                licence=str(entry["licence"]), share={p: float(share[p]) for p in phase_names},
                exchange_rates=source_rates, options=dict(options), origin=str(entry.get("origin", "")),
                eval_fraction=None if eval_fraction is None else float(eval_fraction))
