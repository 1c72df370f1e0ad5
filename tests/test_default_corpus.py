"""The default corpus: each source's layout, idempotent atomic builds, determinism, captions, controllers, manifest."""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
import tarfile
import time
import wave

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
import zstandard
from PIL import Image

from codex_jax.data import records
from codex_jax.data.default_corpus import build, clips, digits, embodied, pyexpr, pygame_docs, synthetic_tasks, writers
from codex_jax.data.errors import DataError

MANIFEST = os.path.join(os.path.dirname(__file__), "..", "experiments", "data", "default.yaml")
NAMES = [s.name for s in build.SOURCES]


@pytest.fixture(scope="session")
def corpus() -> tuple[str, dict]:
  """The one full build of the session, shared (and kept between sessions) in the test cache dir."""
  info = build.build_default_corpus()  # Locked inside: a second xdist worker waits, then reads BUILD_INFO.
  return build.default_dir(), info


def _tar_samples(path: str) -> dict[str, dict[str, bytes]]:
  samples: dict[str, dict[str, bytes]] = {}
  with tarfile.open(path) as tar:
    for member in tar.getmembers():
      assert member.isfile() and member.mtime == 0 and member.uid == 0 and member.uname == ""
      key, ext = member.name.split(".", 1)
      samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
  return samples


def _jsonl(data: bytes) -> list[dict]:
  return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def test_build_info_matches_the_files(corpus):
  root, info = corpus
  assert info["version"] == build.CORPUS_VERSION and sorted(info["sources"]) == sorted(NAMES)
  assert os.path.isfile(os.path.join(root, "README.md"))
  for source in build.SOURCES:
    entry = info["sources"][source.name]
    assert entry["licence"] == source.licence and entry["origin"]
    assert entry["files"] > 0 and entry["records"] > 0 and entry["bytes"] > 0, source.name


def test_second_call_is_a_no_op(corpus):
  root, info = corpus
  start = time.monotonic()
  again = build.build_default_corpus()
  assert time.monotonic() - start < 2.0
  assert again == info


def test_stdlib_code_parquet(corpus):
  root, info = corpus
  paths = sorted(glob.glob(os.path.join(root, "code", "stdlib-code-*.parquet")))
  assert paths and os.path.basename(paths[0]) == "stdlib-code-00000.parquet"
  tables = [pq.read_table(p) for p in paths]
  assert all(t.column_names == ["text", "path"] for t in tables)
  files = [f for t in tables for f in t.column("path").to_pylist()]
  texts = [x for t in tables for x in t.column("text").to_pylist()]
  assert files == sorted(files) and len(set(files)) == len(files) == info["sources"]["python-stdlib-code"]["records"]
  assert all(x.strip() for x in texts) and 5e6 < sum(len(x.encode()) for x in texts) < 7e6


def test_stdlib_docs_and_pygame_docs_jsonl(corpus):
  root, _ = corpus
  rows = []
  for path in sorted(glob.glob(os.path.join(root, "docs", "stdlib-docs-*.jsonl.zst"))):
    with open(path, "rb") as f:
      rows += _jsonl(zstandard.ZstdDecompressor().stream_reader(f).read())
  assert rows and all(r["text"].strip() and r["path"] for r in rows)
  assert any(r["path"] == "docstrings/json/__init__.py" for r in rows)
  assert any(r["path"].startswith("topics/") for r in rows)
  with gzip.open(os.path.join(root, "pygame-docs", "pygame-docs-00000.jsonl.gz")) as f:
    pages = _jsonl(f.read())
  assert len(pages) == len(glob.glob(os.path.join(pygame_docs.docs_root(), "**", "*.rst.txt"), recursive=True))
  assert any(p["path"] == "ref/surface.rst.txt" for p in pages)


def test_digits_shards_and_captions_name_the_digit(corpus):
  root, _ = corpus
  _, labels = digits.load()
  shards = sorted(glob.glob(os.path.join(root, "digits", "digits-*.tar")))
  samples = {k: v for path in shards for k, v in _tar_samples(path).items()}
  assert len(shards) == 4 and sorted(samples) == [f"{i:06d}" for i in range(len(labels))]
  for key, sample in samples.items():
    assert set(sample) == {"png", "txt"}
    image = np.asarray(Image.open(io.BytesIO(sample["png"])))
    assert image.shape == (8, 8) and image.dtype == np.uint8
    caption = sample["txt"].decode()
    assert re.search(rf"\b{labels[int(key)]}\b", caption), (key, caption)
    records.check_record({"image": image[..., None], "text": caption}, "digits", key)


def test_clip_shards(corpus):
  root, _ = corpus
  shards = sorted(glob.glob(os.path.join(root, "clips", "clips-*.tar")))
  samples = _tar_samples(shards[0])
  assert sum(len(_tar_samples(p)) for p in shards) == clips.NUM_CLIPS
  for key, sample in list(samples.items())[:20]:
    assert set(sample) == {"frames.npy", "wav", "txt"}
    video = np.load(io.BytesIO(sample["frames.npy"]))
    assert video.shape == (16, 32, 32, 3) and video.dtype == np.uint8
    with wave.open(io.BytesIO(sample["wav"])) as w:
      assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 8000, 8000)
      audio = np.frombuffer(w.readframes(8000), "<i2").astype(np.float32) / 32767
    text = sample["txt"].decode()
    for shape, hz in clips.PITCH_HZ.items():  # Each shape named in the caption has its tone named too.
      if shape in text:
        assert f"{hz} Hz" in text, text
    records.check_record({"video": video, "audio": audio, "sample_rate": 8000, "text": text}, "clips", key)


def _episodes(root: str) -> list[tuple[dict, dict[str, np.ndarray]]]:
  episodes = []
  for folder in sorted(glob.glob(os.path.join(root, "embodied", "episode_*"))):
    with open(os.path.join(folder, "meta.json")) as f:
      meta = json.load(f)
    episodes.append((meta, {n: np.load(os.path.join(folder, f"{n}.npy")) for n in ("frames", "proprio", "actions")}))
  return episodes


def test_embodied_episodes(corpus):
  root, info = corpus
  episodes = _episodes(root)
  assert len(episodes) == info["sources"]["gymnasium-control"]["records"] == 48
  obs_dims = {"CartPole-v1": 4, "Pendulum-v1": 3, "MountainCar-v0": 2, "Acrobot-v1": 6}
  for meta, arrays in episodes:
    assert set(meta) == {"task", "env", "fps", "num_steps", "success", "seed"}
    t = meta["num_steps"]
    assert arrays["frames"].shape == (t, 32, 32, 3) and arrays["frames"].dtype == np.uint8
    assert arrays["proprio"].shape == (t, obs_dims[meta["env"]]) and arrays["proprio"].dtype == np.float32
    assert arrays["actions"].shape == (t, 1) and arrays["actions"].dtype == np.float32
    records.check_record({"video": arrays["frames"], "proprio": arrays["proprio"], "actions": arrays["actions"],
                          "text": meta["task"]}, "embodied", meta["seed"])


def test_controllers_succeed(corpus):
  by_env: dict[str, list[tuple[dict, dict]]] = {}
  for meta, arrays in _episodes(corpus[0]):
    by_env.setdefault(meta["env"], []).append((meta, arrays))
  cap = {task.env: task.max_steps for task in embodied.TASKS}
  cartpole = by_env["CartPole-v1"]
  assert sum(m["num_steps"] == cap["CartPole-v1"] and m["success"] for m, _ in cartpole) >= 0.9 * len(cartpole)
  for meta, arrays in by_env["Pendulum-v1"]:  # Upright at the end: cos(theta) near 1, and little spin.
    assert meta["success"] and arrays["proprio"][-1, 0] > 0.9 and abs(arrays["proprio"][-1, 2]) < 1.5
  for env in ("MountainCar-v0", "Acrobot-v1"):
    assert sum(m["success"] for m, _ in by_env[env]) >= 0.8 * len(by_env[env]), env


def test_synthetic_records_are_true(corpus):
  root, _ = corpus
  rows = []
  for path in sorted(glob.glob(os.path.join(root, "synthetic", "synthetic-*.jsonl.gz"))):
    with open(path, "rb") as f:
      assert f.read(10)[4:8] == b"\0\0\0\0"  # gzip header mtime 0: no timestamp in the bytes.
    with gzip.open(path) as f:
      rows += _jsonl(f.read())
  assert 1.5e6 < sum(len(r["text"].encode()) for r in rows) < 3e6
  kinds = {r["kind"] for r in rows}
  assert set(synthetic_tasks.GENERATORS) | {"stdlib-fact"} == kinds
  checked = 0
  for row in rows:
    match = re.fullmatch(r">>> (.*)\n(.*)", row["text"])
    if match:  # Independent check against Python itself, not the whitelist evaluator.
      assert repr(eval(match[1], {"__builtins__": {"sorted": sorted, "len": len, "sum": sum, "max": max,
                                                    "min": min}})) == match[2]
      checked += 1
  assert checked > 100
  assert any(r["text"].startswith("In Python 3.") and "json.dumps takes the parameters obj, *," in r["text"]
             for r in rows)


def test_safe_eval_refuses_names_and_attributes():
  for bad in ("__import__('os')", "open('x')", "(1).__class__", "2 ** 100000"):
    with pytest.raises(pyexpr.Unsafe):
      pyexpr.safe_eval(bad)


SMALL = {"python-stdlib-code": 4, "python-stdlib-docs": 4, "pygame-ce-docs": 3, "digits-captions": 25,
         "procedural-clips": 5, "gymnasium-control": 2, "synthetic-curated": 300}


@pytest.mark.parametrize("name", NAMES)
def test_source_builds_are_deterministic(name, tmp_path):
  stats = [build.build_source(name, str(tmp_path / d), limit=SMALL[name]) for d in ("a", "b")]
  assert stats[0] == stats[1] and stats[0].records == SMALL[name]
  files = [sorted(glob.glob(str(tmp_path / d / "**" / "*"), recursive=True)) for d in ("a", "b")]
  assert [os.path.relpath(f, tmp_path / "a") for f in files[0]] == [os.path.relpath(f, tmp_path / "b")
                                                                    for f in files[1]]
  for a, b in zip(*files, strict=True):
    if os.path.isfile(a):
      with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read(), a


def test_build_is_atomic_and_cleans_up(tmp_path, monkeypatch):
  monkeypatch.setattr(build, "SOURCES", (pygame_docs.SOURCE,))
  monkeypatch.setattr(os, "cpu_count", lambda: 1)  # In-process: the patched SOURCES must apply.
  out = str(tmp_path / "corpus")
  info = build.build_default_corpus(out)
  assert list(info["sources"]) == ["pygame-ce-docs"] and build.read_info(out) == info
  stale = tmp_path / ".corpus.tmp-killed"
  stale.mkdir()
  info2 = build.build_default_corpus(out, force=True)
  assert info2["sources"] == info["sources"] and not stale.exists()

  def broken(root, *, limit=None):
    raise RuntimeError("source failed")

  monkeypatch.setattr(build, "SOURCES", (writers.Source("broken", "web", "MIT", "-", broken),))
  with pytest.raises(RuntimeError):
    build.build_default_corpus(str(tmp_path / "other"))
  assert sorted(os.listdir(tmp_path)) == ["corpus", "corpus.lock", "other.lock"]


def test_build_refuses_to_replace_a_folder_that_is_not_a_corpus(tmp_path):
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep me")
  with pytest.raises(DataError, match="not a default corpus"):
    build.build_default_corpus(str(tmp_path / "mine"))
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_manifest(corpus):
  root, _ = corpus
  with open(MANIFEST) as f:
    manifest = yaml.safe_load(f)
  assert manifest["version"] == 1 and manifest["name"] == "codex-default"
  assert manifest["root"] == "{cache_dir}/default-corpus-v1"
  assert set(manifest["exchange_rates"]) == set(records.MODALITIES)
  phases = [p["name"] for p in manifest["phases"]]
  assert phases == ["main", "anneal"]
  sources = {s["name"]: s for s in manifest["sources"]}
  assert sorted(sources) == sorted(NAMES)
  for phase in phases:
    assert sum(s["share"][phase] for s in sources.values()) == pytest.approx(1.0, abs=1e-9)
  for source in build.SOURCES:
    entry = sources[source.name]
    assert {"name", "kind", "modalities", "format", "locations", "licence", "share", "origin"} <= set(entry)
    assert entry["licence"] == source.licence and entry["kind"] == source.kind
    assert set(entry["modalities"]) <= set(records.MODALITIES)
    assert entry["format"] in {"jsonl", "parquet", "wds", "episodes", "array_record"}
    for pattern in entry["locations"]:  # Every location matches files of the built corpus.
      assert glob.glob(os.path.join(root, pattern)), (source.name, pattern)


def test_without_the_corpus_extra_the_build_names_what_to_install(tmp_path, monkeypatch):
  import importlib.util

  from codex_jax.data.default_corpus import build
  from codex_jax.data.errors import DataError
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
  with pytest.raises(DataError, match=r"scikit-learn, not installed: pip install -e '\.\[corpus\]'"):
    build.build_default_corpus(str(tmp_path / "corpus"))
  assert not (tmp_path / "corpus").exists()  # Refused before anything is written.
