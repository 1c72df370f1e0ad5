"""A small multimodal corpus and its manifest, written into a temp dir: fast data tests without the default corpus."""

from __future__ import annotations

import io
import json
import os
import tarfile
import wave

import numpy as np
import yaml
from PIL import Image

from codex_jax.data.default_corpus import stdlib_walk as corpus

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def write_jsonl(path: str, texts: list[str]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for text in texts:
      f.write(json.dumps({"text": text}) + "\n")


def _png(pixels: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="PNG")
  return out.getvalue()


def _wav(samples: np.ndarray, rate: int) -> bytes:
  out = io.BytesIO()
  with wave.open(out, "wb") as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(rate)
    w.writeframes((samples * 32767).astype("<i2").tobytes())
  return out.getvalue()


def write_tar(path: str, samples: list[dict[str, bytes]]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tarfile.open(path, "w") as tar:
    for i, sample in enumerate(samples):
      for ext, data in sample.items():
        info = tarfile.TarInfo(f"{i:06d}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def write_captions(path: str, n: int, seed: int = 0) -> None:
  rng = np.random.default_rng(seed)
  samples = []
  for i in range(n):
    digit = i % 10
    pixels = (rng.random((8, 8)) * 255 * (digit + 1) / 10).astype(np.uint8)
    samples.append({"png": _png(pixels), "txt": f"A picture of the digit {WORDS[digit]}.".encode()})
  write_tar(path, samples)


def write_clips(path: str, n: int, seed: int = 1) -> None:
  rng = np.random.default_rng(seed)
  samples = []
  for i in range(n):
    frames = rng.integers(0, 255, (6, 12, 12, 3), dtype=np.uint8)
    tone = np.sin(2 * np.pi * (200 + 50 * i) * np.arange(4000) / 8000).astype(np.float32) * 0.5
    buf = io.BytesIO()
    np.save(buf, frames)
    samples.append({"frames.npy": buf.getvalue(), "wav": _wav(tone, 8000), "txt": f"Clip {i} hums.".encode()})
  write_tar(path, samples)


def write_episodes(root: str, n: int, steps: int = 12) -> None:
  rng = np.random.default_rng(2)
  for e in range(n):
    folder = os.path.join(root, f"episode_{e:06d}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "meta.json"), "w") as f:
      json.dump({"task": "Keep the pole up.", "env": "Test-v0", "fps": 30, "num_steps": steps}, f)
    np.save(os.path.join(folder, "frames.npy"), rng.integers(0, 255, (steps, 8, 8, 3), dtype=np.uint8))
    np.save(os.path.join(folder, "proprio.npy"), rng.normal(size=(steps, 4)).astype(np.float32))
    np.save(os.path.join(folder, "actions.npy"), rng.integers(0, 2, (steps, 1)).astype(np.float32))


def stdlib_texts(n: int, max_chars: int = 3000) -> list[str]:
  docs = corpus.embedded_documents(1_500_000)
  return [d.text[:max_chars] for d in docs[:n]]


SHARES = {"code": 0.3, "captions": 0.25, "clips": 0.15, "control": 0.2, "gpl-text": 0.1}  # Phase "main".


def write_corpus(root: str, *, manifest_name: str = "manifest.yaml", clips: int = 20, **overrides) -> str:
  """Writes the four included sources plus a GPL one (excluded by default); returns the manifest path."""
  texts = stdlib_texts(60)
  write_jsonl(os.path.join(root, "code", "part-0.jsonl"), texts[:30])
  write_jsonl(os.path.join(root, "code", "part-1.jsonl"), texts[30:])
  write_captions(os.path.join(root, "captions", "shard-0.tar"), 60)
  write_clips(os.path.join(root, "clips", "shard-0.tar"), clips)
  write_episodes(os.path.join(root, "control"), 6)
  write_jsonl(os.path.join(root, "gpl", "part-0.jsonl"), ["GPL text " * 20] * 5)
  manifest = {
      "version": 1, "name": "test-mixture", "root": ".",
      "exchange_rates": {"text": 1.0, "image": 0.45, "video": 0.3, "audio": 0.4, "proprio": 0.5, "action": 0.5},
      "phases": [{"name": "main", "start_step": 0}, {"name": "late", "start_step": 6}],
      "sources": [
          {"name": "code", "kind": "code", "modalities": ["text"], "format": "jsonl", "locations": ["code/*.jsonl"],
           "licence": "PSF-2.0", "share": {"main": SHARES["code"], "late": 0.7}},
          {"name": "captions", "kind": "web", "modalities": ["image", "text"], "format": "wds",
           "locations": ["captions"], "licence": "CC-BY-4.0", "share": {"main": SHARES["captions"], "late": 0.1}},
          {"name": "clips", "kind": "video", "modalities": ["video", "audio", "text"], "format": "wds",
           "locations": ["clips/*.tar"], "licence": "CC0-1.0", "share": {"main": SHARES["clips"], "late": 0.1}},
          {"name": "control", "kind": "embodied", "modalities": ["video", "proprio", "action", "text"],
           "format": "episodes", "locations": ["control"], "options": {"window_steps": 4}, "licence": "MIT",
           "share": {"main": SHARES["control"], "late": 0.1}},
          {"name": "gpl-text", "kind": "books", "modalities": ["text"], "format": "jsonl",
           "locations": ["gpl/*.jsonl"], "licence": "GPL-3.0-only", "share": {"main": SHARES["gpl-text"], "late": 0.0}},
      ],
  }
  manifest.update(overrides)
  path = os.path.join(root, manifest_name)
  with open(path, "w") as f:
    yaml.safe_dump(manifest, f, sort_keys=False)
  return path
