"""The run's data, resolved once: manifest + licence policy + validated file indexes + tokenizer + hash.

Order: load and validate the manifest; exclude sources the licence policy refuses (each with its
reason); expand every included source's locations; fingerprint and index (fully validate) each file;
apply data.on_malformed; split records into train / eval; train or load the tokenizer; hash it all.
Everything that can be wrong with the data fails here, before a step or a file of the run is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import tokenizers
from absl import logging

from codex_jax.config.schema import DataConfig
from codex_jax.data import fingerprint, licences
from codex_jax.data import tokenizer as tokenizer_lib
from codex_jax.data.errors import DataError
from codex_jax.data.formats import get_format, validate_options
from codex_jax.data.formats.index import FileIndex, index_file
from codex_jax.data.manifest import Manifest, Source, load_manifest

SPLITS = ("train", "eval")
_MAX_LISTED = 5  # Malformed records named in a failure message; the rest are counted.


@dataclasses.dataclass(frozen=True)
class SourcePlan:
  source: Source
  source_id: int  # 1-based position among the included sources; 0 marks padding in a batch.
  paths: tuple[str, ...]
  file_hashes: tuple[str, ...]
  records: dict[str, list[tuple[int, Any]]]  # split -> [(file number, locator)], in file order.
  malformed: tuple[dict[str, str], ...]


@dataclasses.dataclass(frozen=True)
class DataPlan:
  manifest: Manifest
  policy: licences.LicencePolicy
  sources: tuple[SourcePlan, ...]
  exclusions: tuple[licences.Exclusion, ...]
  tokenizer: tokenizers.Tokenizer
  tokenizer_sha256: str
  manifest_hash: str

  def shares(self, phase: str) -> dict[str, float]:
    return licences.effective_shares(tuple(s.source for s in self.sources), phase)

  @property
  def malformed(self) -> list[dict[str, str]]:
    return [m for s in self.sources for m in s.malformed]

  def record(self) -> dict[str, Any]:
    """What a checkpoint and the workdir keep about the data: enough to audit and to compare."""
    root = self.manifest.root
    return {
        "manifest_hash": self.manifest_hash,
        "manifest_path": self.manifest.path,
        "manifest": self.manifest.canonical(),
        "included": [s.source.name for s in self.sources],
        "excluded": [dataclasses.asdict(e) for e in self.exclusions],
        "effective_shares": {p.name: self.shares(p.name) for p in self.manifest.phases},
        "tokenizer_sha256": self.tokenizer_sha256,
        "files": {s.source.name: [[os.path.relpath(p, root), h] for p, h in zip(s.paths, s.file_hashes, strict=True)]
                  for s in self.sources},
        "records": {s.source.name: {split: len(r) for split, r in s.records.items()} for s in self.sources},
        "malformed": len(self.malformed),
    }


def split_of(record_key: str, eval_fraction: float) -> str:
  """"train" or "eval", by a hash of the record's key ("<file relative to root>:<record name>")."""
  h = int.from_bytes(hashlib.sha256(record_key.encode("utf-8")).digest()[:8], "big")
  return "eval" if h < eval_fraction * 2**64 else "train"


def policy_of(cfg: DataConfig) -> licences.LicencePolicy:
  return licences.LicencePolicy(cfg.licence_policy, tuple(cfg.licence_allow), tuple(cfg.licence_deny))


def _expand(source: Source) -> list[str]:
  fmt = get_format(source.format)
  paths: list[str] = []
  for location in source.locations:
    try:
      paths.extend(fmt.files(location))
    except DataError as e:
      raise DataError(f"source {source.name!r}: locations: {e} (run `codex data build-default` if this is the "
                      "embedded corpus)") from e
  return sorted(set(paths))


def _index_source(source: Source, source_id: int, root: str, cfg: DataConfig) -> SourcePlan:
  fmt = get_format(source.format)
  try:
    options = validate_options(source.format, source.options)
  except DataError as e:
    raise DataError(f"source {source.name!r}: options: {e}") from e
  paths = _expand(source)
  records: dict[str, list[tuple[int, Any]]] = {split: [] for split in SPLITS}
  malformed = []
  # A source's own eval_fraction (manifest) overrides data.eval_fraction, unless that is 0: no held-out split.
  fraction = source.eval_fraction if source.eval_fraction is not None and cfg.eval_fraction > 0 else cfg.eval_fraction
  hashes = tuple(fingerprint.file_sha256(p) for p in paths)
  for file_no, (path, digest) in enumerate(zip(paths, hashes, strict=True)):
    index: FileIndex = index_file(fmt, path, options, digest)
    rel = os.path.relpath(path, root)
    for name, reason in index.malformed:
      malformed.append({"source": source.name, "file": path, "record": name, "reason": reason})
    for name, locator in index.records:
      records[split_of(f"{rel}:{name}", fraction)].append((file_no, locator))
  if malformed and cfg.on_malformed == "fail":
    listed = "\n  ".join(f"{m['file']}:{m['record']}: {m['reason']}" for m in malformed[:_MAX_LISTED])
    more = f"\n  ... and {len(malformed) - _MAX_LISTED} more" if len(malformed) > _MAX_LISTED else ""
    raise DataError(f"source {source.name!r}: {len(malformed)} malformed record(s) (data.on_malformed='fail'; "
                    f"'skip' drops them and logs them to the quarantine file):\n  {listed}{more}")
  if not records["train"]:
    raise DataError(f"source {source.name!r}: no usable training records in {len(paths)} file(s) "
                    f"({len(malformed)} malformed, {len(records['eval'])} held out by the eval fraction {fraction:g}).")
  return SourcePlan(source, source_id, tuple(paths), hashes, records, tuple(malformed))


def _tokenizer_texts(sources: tuple[SourcePlan, ...], budget_bytes: int, phase: str) -> list[str]:
  """Distinct texts from every text source's train split, each source's byte budget by its share."""
  shares = licences.effective_shares(tuple(s.source for s in sources), phase)
  texts: list[str] = []
  for plan in sources:
    if "text" not in plan.source.modalities:
      continue
    fmt, options = get_format(plan.source.format), validate_options(plan.source.format, plan.source.options)
    budget, seen = max(1, int(budget_bytes * shares[plan.source.name])), set()
    for file_no, locator in plan.records["train"]:
      text = fmt.read(plan.paths[file_no], locator, options).get("text")
      if text and text not in seen:
        seen.add(text)
        texts.append(text)
        budget -= len(text.encode("utf-8"))
        if budget <= 0:
          break
  return texts


def _tokenizer(cfg: DataConfig, vocab_size: int, manifest: Manifest, sources: tuple[SourcePlan, ...],
               workdir: str | None) -> tokenizers.Tokenizer:
  if cfg.tokenizer_path:
    return tokenizer_lib.load_or_train_tokenizer(cfg, vocab_size, lambda: [], "", workdir)
  key = fingerprint.sha256_bytes(fingerprint.canonical_json({
      "manifest": manifest.canonical(), "files": [s.file_hashes for s in sources],
      "included": [s.source.name for s in sources], "budget": cfg.tokenizer_train_bytes,
      "eval_fraction": cfg.eval_fraction}))
  phase = manifest.phases[0].name
  return tokenizer_lib.load_or_train_tokenizer(
      cfg, vocab_size, lambda: _tokenizer_texts(sources, cfg.tokenizer_train_bytes, phase), key, workdir)


def build_plan(cfg: DataConfig, *, vocab_size: int, feature_dim: int | None, workdir: str | None = None,
               manifest_path: str | None = None) -> DataPlan:
  """Resolves the data of a run; with a workdir the tokenizer is pinned there (see tokenizer.py).

  feature_dim=0 (a text-only model) refuses sources with other modalities; None skips that check.
  """
  manifest = load_manifest(manifest_path or cfg.manifest)
  policy = policy_of(cfg)
  included, exclusions = licences.apply_policy(manifest, policy)
  for e in exclusions:
    logging.info("Data source %s excluded: %s", e.source, e.reason)
  if feature_dim == 0:
    for source in included:
      media = [m for m in source.modalities if m != "text"]
      if media:
        raise DataError(f"source {source.name!r} has {', '.join(media)} positions but model.feature_dim is 0 "
                        "(a text-only model); set model.feature_dim (e.g. 96) or exclude the source.")
  plans = tuple(_index_source(s, i + 1, manifest.root, cfg) for i, s in enumerate(included))
  tok = _tokenizer(cfg, vocab_size, manifest, plans, workdir)
  tok_sha = fingerprint.sha256_bytes(fingerprint.canonical_json(json.loads(tok.to_str())))
  files = {p.source.name: [[os.path.relpath(path, manifest.root), h] for path, h in zip(p.paths, p.file_hashes,
                                                                                        strict=True)]
           for p in plans}
  digest = fingerprint.manifest_hash(manifest.canonical(), [p.source.name for p in plans],
                                     [dataclasses.asdict(e) for e in exclusions], tok_sha, files)
  return DataPlan(manifest, policy, plans, exclusions, tok, tok_sha, digest)


def write_data_record(plan: DataPlan, workdir: str) -> str:
  """workdir/data/manifest.json (what the run trains on) and quarantine.jsonl (what it skipped)."""
  folder = os.path.join(workdir, "data")
  os.makedirs(folder, exist_ok=True)
  for name, lines in (("manifest.json", [json.dumps(plan.record(), indent=2, sort_keys=True)]),
                      ("quarantine.jsonl", [json.dumps(m, sort_keys=True) for m in plan.malformed])):
    tmp = os.path.join(folder, f".{name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      f.write("\n".join(lines) + ("\n" if lines else ""))
    os.replace(tmp, os.path.join(folder, name))
  return folder
