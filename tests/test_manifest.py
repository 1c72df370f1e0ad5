"""Manifests: validation errors, licence exclusion with reasons, fingerprints and the manifest hash."""

import dataclasses
import os

import pytest
import yaml

from codex_jax.config.schema import DataConfig
from codex_jax.data import fingerprint, licences
from codex_jax.data.errors import DataError
from codex_jax.data.manifest import load_manifest
from codex_jax.data.plan import build_plan, split_of
from tests.data_fixtures import SHARES, write_corpus

VOCAB = 400


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("corpus"))
  write_corpus(root)
  return root


@pytest.fixture(scope="module")
def plan(corpus_dir):
  return build_plan(DataConfig(eval_fraction=0.1), vocab_size=VOCAB, feature_dim=96,
                    manifest_path=os.path.join(corpus_dir, "manifest.yaml"))


def edited(corpus_dir, tmp_path, edit) -> str:
  """A copy of the fixture manifest (same data root) after `edit(raw dict)`."""
  with open(os.path.join(corpus_dir, "manifest.yaml")) as f:
    raw = yaml.safe_load(f)
  raw["root"] = corpus_dir
  edit(raw)
  path = str(tmp_path / "m.yaml")
  with open(path, "w") as f:
    yaml.safe_dump(raw, f)
  return path


def source(raw, name):
  return next(s for s in raw["sources"] if s["name"] == name)


@pytest.mark.parametrize("edit,expected", [
    (lambda r: r.update(colour="red"), r"unknown key 'colour'"),
    (lambda r: source(r, "code").update(licence_url="x"), r"source 'code': unknown field 'licence_url'"),
    (lambda r: source(r, "code").pop("licence"), r"source 'code': missing field 'licence'"),
    (lambda r: source(r, "clips").update(kind="movies"), r"source 'clips': kind 'movies' is not one of"),
    (lambda r: source(r, "clips").update(modalities=["smell"]), r"source 'clips': modality 'smell'"),
    (lambda r: source(r, "code").update(format="csv"), r"source 'code': format 'csv'"),
    (lambda r: source(r, "code")["share"].update(main=0.5), r"phase 'main': shares sum to 1.2"),
    (lambda r: source(r, "code")["share"].pop("late"), r"source 'code': share.late is None"),
    (lambda r: source(r, "code")["share"].update(early=0.1), r"source 'code': share.early names no phase"),
    (lambda r: source(r, "clips").update(name="code"), r"source 'code': the name is used more than once"),
    (lambda r: source(r, "code").update(exchange_rate={"image": -1}), r"source 'code': exchange_rate.image"),
    (lambda r: r["phases"][1].update(start_step=0), r"start_step values must increase"),
    (lambda r: source(r, "clips").update(eval_fraction=1.0), r"source 'clips': eval_fraction 1.0 must be"),
    (lambda r: source(r, "clips").update(locations=["clips/*.tar", "../../../etc/*.tar"]),
     r"source 'clips': locations\[1\] '\.\./\.\./\.\./etc/\*\.tar' resolves to \S*/etc/\*\.tar, outside the manifest's root"),
    (lambda r: source(r, "clips").update(locations=["/etc/passwd"]), r"locations\[0\] '/etc/passwd' resolves to /etc/passwd, "
                                                                     r"outside the manifest's root"),
])
def test_manifest_errors_name_the_source_and_field(corpus_dir, tmp_path, edit, expected):
  with pytest.raises(DataError, match=expected) as info:
    load_manifest(edited(corpus_dir, tmp_path, edit))
  assert "m.yaml" in str(info.value)


def test_manifest_reports_every_problem_at_once(corpus_dir, tmp_path):
  def edit(r):
    source(r, "code").pop("licence")
    source(r, "clips").update(kind="movies")
  with pytest.raises(DataError) as info:
    load_manifest(edited(corpus_dir, tmp_path, edit))
  assert "missing field 'licence'" in str(info.value) and "kind 'movies'" in str(info.value)


def test_missing_files_and_bad_yaml_are_named(corpus_dir, tmp_path):
  path = edited(corpus_dir, tmp_path, lambda r: source(r, "clips").update(locations=["nowhere/*.tar"]))
  with pytest.raises(DataError, match=r"source 'clips': locations:.*nowhere"):
    build_plan(DataConfig(), vocab_size=VOCAB, feature_dim=96, manifest_path=path)
  bad = tmp_path / "bad.yaml"
  bad.write_text("sources: [\n")
  with pytest.raises(DataError, match="bad.yaml: not valid YAML"):
    load_manifest(str(bad))
  with pytest.raises(DataError, match="Manifest file not found"):
    load_manifest(str(tmp_path / "absent.yaml"))


def test_licence_policy_excludes_with_a_recorded_reason(plan, corpus_dir):
  assert [e.source for e in plan.exclusions] == ["gpl-text"]
  reason = plan.exclusions[0].reason
  assert "GPL-3.0-only is copyleft" in reason and "permissive" in reason
  record = plan.record()
  assert record["excluded"] == [{"source": "gpl-text", "licence": "GPL-3.0-only", "reason": reason}]
  assert "gpl-text" not in record["included"] and "gpl-text" not in record["files"]
  # The excluded share is spread pro rata over the rest.
  kept = 1 - SHARES["gpl-text"]
  for name, share in plan.shares("main").items():
    assert share == pytest.approx(SHARES[name] / kept)
  manifest = load_manifest(os.path.join(corpus_dir, "manifest.yaml"))
  copyleft = licences.LicencePolicy("copyleft")
  included, excluded = licences.apply_policy(manifest, copyleft)
  assert "gpl-text" in [s.name for s in included] and not excluded
  denied = licences.LicencePolicy("copyleft", deny=("MIT",))
  _, excluded = licences.apply_policy(manifest, denied)
  assert [(e.source, e.reason) for e in excluded] == [("control", "licence MIT is listed in data.licence_deny")]


def test_unknown_spdx_id_is_an_error_unless_allowed(corpus_dir, tmp_path):
  path = edited(corpus_dir, tmp_path, lambda r: source(r, "code").update(licence="Made-Up-1.0"))
  manifest = load_manifest(path)
  with pytest.raises(DataError, match=r"source 'code': licence 'Made-Up-1.0' is not a known SPDX id"):
    licences.apply_policy(manifest, licences.LicencePolicy())
  included, _ = licences.apply_policy(manifest, licences.LicencePolicy(allow=("Made-Up-1.0",)))
  assert "code" in [s.name for s in included]


def test_file_hash_sees_a_content_edit_that_keeps_size_and_modification_time(tmp_path):
  """Hashes used to be cached by path, size and mtime, so this edit kept the old manifest hash."""
  path = tmp_path / "data.jsonl"
  path.write_bytes(b'{"text": "abcdef"}\n' * 1000)
  first = fingerprint.file_sha256(str(path))
  stat = os.stat(path)
  data = bytearray(path.read_bytes())
  data[9000] ^= 1
  path.write_bytes(bytes(data))
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
  assert fingerprint.file_sha256(str(path)) != first


def test_manifest_hash_covers_data_shares_licences_and_tokenizer(plan, corpus_dir, tmp_path):
  cfg = DataConfig(eval_fraction=0.1)
  rebuilt = build_plan(cfg, vocab_size=VOCAB, feature_dim=96, manifest_path=os.path.join(corpus_dir, "manifest.yaml"))
  assert rebuilt.manifest_hash == plan.manifest_hash  # Deterministic.

  def shifted(r):
    source(r, "code")["share"]["main"] = 0.25
    source(r, "captions")["share"]["main"] = 0.30
  other = build_plan(cfg, vocab_size=VOCAB, feature_dim=96, manifest_path=edited(corpus_dir, tmp_path, shifted))
  assert other.manifest_hash != plan.manifest_hash
  copyleft = build_plan(dataclasses.replace(cfg, licence_policy="copyleft"), vocab_size=VOCAB, feature_dim=96,
                        manifest_path=os.path.join(corpus_dir, "manifest.yaml"))
  assert copyleft.manifest_hash != plan.manifest_hash
  bigger = build_plan(cfg, vocab_size=VOCAB + 64, feature_dim=96,
                      manifest_path=os.path.join(corpus_dir, "manifest.yaml"))
  assert bigger.tokenizer_sha256 != plan.tokenizer_sha256 and bigger.manifest_hash != plan.manifest_hash


def test_one_changed_byte_in_a_data_file_changes_the_manifest_hash(tmp_path):
  root = str(tmp_path / "corpus")
  manifest = write_corpus(root)
  cfg = DataConfig(eval_fraction=0.1, tokenizer_path="")
  before = build_plan(cfg, vocab_size=VOCAB, feature_dim=96, manifest_path=manifest)
  path = os.path.join(root, "code", "part-1.jsonl")
  data = bytearray(open(path, "rb").read())
  at = data.index(b"e", 100)
  data[at] = ord("E")  # One byte of a text, same size, still valid JSON.
  stat = os.stat(path)
  with open(path, "wb") as f:
    f.write(bytes(data))
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
  after = build_plan(cfg, vocab_size=VOCAB, feature_dim=96, manifest_path=manifest)
  assert after.manifest_hash != before.manifest_hash
  changed = [f for f, h in after.record()["files"]["code"] if [f, h] not in before.record()["files"]["code"]]
  assert changed == ["code/part-1.jsonl"]


def test_text_only_model_refuses_media_sources(corpus_dir):
  with pytest.raises(DataError, match=r"source 'captions' has image positions but model.feature_dim is 0"):
    build_plan(DataConfig(), vocab_size=VOCAB, feature_dim=0, manifest_path=os.path.join(corpus_dir, "manifest.yaml"))


# split_of(f"code/part-{i % 3}.jsonl:line {i}", 0.5) for i in range(16): a change here reshuffles every
# run's held-out set. Regenerate only on purpose, with the expression above.
GOLDEN_SPLIT = "tteteeeteetteett"


def test_record_split_is_stable_and_the_fraction_is_right():
  got = "".join(split_of(f"code/part-{i % 3}.jsonl:line {i}", 0.5)[0] for i in range(16))
  assert got == GOLDEN_SPLIT
  held_out = sum(split_of(f"f.jsonl:line {i}", 0.1) == "eval" for i in range(20000)) / 20000
  assert abs(held_out - 0.1) < 0.01
  assert split_of("a.jsonl:line 3", 0.5) != split_of("b.jsonl:line 3", 0.5) or split_of(
      "c.jsonl:line 3", 0.5) != split_of("d.jsonl:line 3", 0.5)  # The file is part of the key.
  assert {split_of(f"x:{i}", 0.0) for i in range(100)} == {"train"}


def test_a_source_eval_fraction_overrides_the_config_and_only_adds_held_out_records(plan, corpus_dir, tmp_path):
  cfg = DataConfig(eval_fraction=0.1)
  path = edited(corpus_dir, tmp_path, lambda r: source(r, "code").update(eval_fraction=0.5))
  more = build_plan(cfg, vocab_size=VOCAB, feature_dim=96, manifest_path=path)
  by_name = lambda p: {s.source.name: s.records for s in p.sources}  # noqa: E731
  before, after = by_name(plan), by_name(more)
  assert len(after["code"]["eval"]) > len(before["code"]["eval"])
  assert all(r in after["code"]["eval"] for r in before["code"]["eval"])  # The same hash, a higher threshold.
  assert all(after[n] == before[n] for n in before if n != "code")  # Other sources keep data.eval_fraction.
  assert more.manifest_hash != plan.manifest_hash
  assert "eval_fraction" not in load_manifest(os.path.join(corpus_dir, "manifest.yaml")).canonical()["sources"][0]
  off = build_plan(DataConfig(eval_fraction=0.0), vocab_size=VOCAB, feature_dim=96, manifest_path=path)
  assert all(not s.records["eval"] for s in off.sources)  # data.eval_fraction 0: nothing held out anywhere.


def test_json_manifests_load_like_yaml(corpus_dir, tmp_path):
  import json
  with open(os.path.join(corpus_dir, "manifest.yaml")) as f:
    raw = yaml.safe_load(f)
  raw["root"] = corpus_dir
  path = tmp_path / "m.json"
  path.write_text(json.dumps(raw))
  assert load_manifest(str(path)).canonical() == load_manifest(edited(corpus_dir, tmp_path, lambda r: None)).canonical()
  bad = tmp_path / "bad.json"
  bad.write_text("{")
  with pytest.raises(DataError, match="bad.json: not valid JSON"):
    load_manifest(str(bad))


def test_cli_data_manifest_lists_sources_exclusions_and_the_hash(plan, corpus_dir):
  import json
  import subprocess
  import sys

  from tests.helpers import ROOT
  path = os.path.join(corpus_dir, "manifest.yaml")
  run = lambda *args: subprocess.run([sys.executable, "-m", "codex_jax", "data", "manifest", path, *args],
                                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  result = run("--json", "--config=experiments/codex.py:tiny", "--config.model.vocab_size=400",
               "--config.data.eval_fraction=0.1")
  assert result.returncode == 0, result.stderr[-2000:]
  listing = json.loads(result.stdout)
  assert listing["manifest_hash"] == plan.manifest_hash  # The hash a run with this config records.
  by_name = {s["name"]: s for s in listing["sources"]}
  assert not by_name["gpl-text"]["included"] and "copyleft" in by_name["gpl-text"]["excluded_reason"]
  assert by_name["code"]["effective_share"]["main"] == pytest.approx(SHARES["code"] / (1 - SHARES["gpl-text"]))
  text = run("--licence_policy=copyleft")
  assert text.returncode == 0 and "excluded" not in text.stdout and "manifest hash:" in text.stdout
  missing = run("--nojson", "--licence_policy=whatever")
  assert missing.returncode == 2 and "whatever" in missing.stderr.strip().splitlines()[-1]
