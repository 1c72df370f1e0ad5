"""`codex data manifest FILE` and `codex data build-default`: inspect a mixture, build the embedded corpus."""

from __future__ import annotations

import dataclasses

from absl import flags

from codex_jax.cli import common

USAGE = ("codex data manifest FILE [--config=...] [--licence_policy=...] | codex data build-default [--out=DIR] | "
         "codex data bench --config=... [--batches=N]")
flags.DEFINE_string("licence_policy", None, "Override data.licence_policy: permissive | copyleft | research-only.")
flags.DEFINE_string("out", None, "build-default: where to write the corpus (default: the cache dir).")
flags.DEFINE_bool("force", False, "build-default: rebuild even if the corpus is already there.")
flags.DEFINE_integer("batches", 50, "bench: timed batches after warm-up.")


def run(flag_values, args: list[str]):
  if args[:1] == ["manifest"] and len(args) == 2:
    return _manifest(flag_values, args[1])
  if args == ["build-default"]:
    return _build_default(flag_values)
  if args == ["bench"]:
    return _bench(flag_values)
  raise flags.ValidationError(f"expected `{USAGE}`, got `codex data {' '.join(args)}`")


def _data_config(flag_values):
  """The data (and model) config the listing uses: --config's if given, else the defaults."""
  from codex_jax.config.schema import DataConfig, ModelConfig
  if flag_values.config is not None:
    cfg, _ = common.load_config(flag_values, num_devices=None)
    data_cfg, model_cfg = cfg.data, cfg.model
  else:
    data_cfg, model_cfg = DataConfig(), ModelConfig()
  if flag_values.licence_policy:
    data_cfg = dataclasses.replace(data_cfg, licence_policy=flag_values.licence_policy)
  return data_cfg, model_cfg


def _manifest(flag_values, path: str) -> dict:
  from codex_jax.data import licences
  from codex_jax.data.plan import build_plan
  data_cfg, model_cfg = _data_config(flag_values)
  plan = build_plan(data_cfg, vocab_size=model_cfg.vocab_size, feature_dim=None, manifest_path=path)
  record = plan.record()
  excluded = {e.source: e.reason for e in plan.exclusions}
  sources = []
  for source in plan.manifest.sources:
    counts = record["records"].get(source.name, {})
    sources.append({
        "name": source.name, "kind": source.kind, "modalities": list(source.modalities), "format": source.format,
        "licence": source.licence, "licence_class": licences.licence_class(source.licence),
        "included": source.name not in excluded, "excluded_reason": excluded.get(source.name),
        "share": source.share, "effective_share": {p: s.get(source.name, 0.0)
                                                   for p, s in record["effective_shares"].items()},
        "files": len(record["files"].get(source.name, [])), "records": counts,
        "exchange_rates": source.exchange_rates})
  result = {"manifest": plan.manifest.path, "name": plan.manifest.name, "manifest_hash": plan.manifest_hash,
            "licence_policy": data_cfg.licence_policy, "phases": [dataclasses.asdict(p) for p in plan.manifest.phases],
            "sources": sources, "excluded": record["excluded"], "malformed": record["malformed"],
            "tokenizer_sha256": plan.tokenizer_sha256}
  if not flag_values.json:
    _print_manifest(result)
  return result


def _print_manifest(result: dict) -> None:
  phases = [p["name"] for p in result["phases"]]
  print(f"manifest {result['manifest']} ({result['name']}), licence policy {result['licence_policy']}")
  header = f"{'source':24s} {'kind':9s} {'licence':14s} {'class':13s} {'files':>5s} {'train':>7s}"
  print(header + "".join(f" {p + ' share':>14s} {'effective':>9s}" for p in phases))
  for s in result["sources"]:
    row = (f"{s['name']:24s} {s['kind']:9s} {s['licence']:14s} {s['licence_class'] or '?':13s} {s['files']:5d} "
           f"{s['records'].get('train', 0):7d}")
    print(row + "".join(f" {s['share'][p]:14.3f} {s['effective_share'][p]:9.3f}" for p in phases))
  for e in result["excluded"]:
    print(f"excluded {e['source']}: {e['reason']}")
  print(f"malformed records: {result['malformed']}")
  print(f"manifest hash: {result['manifest_hash']}")


def _build_default(flag_values) -> dict:
  from codex_jax.data.default_corpus.build import build_default_corpus
  summary = build_default_corpus(flag_values.out, force=flag_values.force, progress=print)
  if not flag_values.json:
    for name, s in summary["sources"].items():
      print(f"{name:24s} {s['licence']:14s} {s['files']:4d} files {s['records']:7d} records {s['bytes']:>11,d} bytes")
  return summary


def _bench(flag_values) -> dict:
  import json

  from ml_collections import config_flags

  from codex_jax.data.bench import benchmark_batches
  cfg, _ = common.load_config(flag_values, num_devices=None)
  label = config_flags.get_config_filename(flag_values["config"])
  result = {"config": f"{label}:data", **benchmark_batches(cfg, flag_values.batches)}
  if not flag_values.json:
    print(json.dumps(result, sort_keys=True))
  return result
