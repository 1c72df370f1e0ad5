"""Content fingerprints of data files and the manifest hash that identifies a run's training data.

manifest_hash = sha256 of the canonical JSON (sorted keys, no spaces) of
  {"manifest": Manifest.canonical(), "included": [names], "excluded": [{source, licence, reason}],
   "tokenizer": sha256 of the tokenizer's JSON, "files": {source: [[relative path, sha256], ...]}}
where each file's sha256 is of its bytes, streamed; a directory (an episode) hashes the canonical JSON
of its files' [relative path, sha256] pairs. File hashes are cached by (path, size, mtime_ns), so a
second check reads no data; any write changes mtime and so forces a re-hash.
"""

from __future__ import annotations

import hashlib
import json
import os

from codex_jax import atomic
from codex_jax.data.records import cache_dir
from codex_jax.hashing import canonical_json
from codex_jax.hashing import sha256_file as _hash_stream

_CACHE_VERSION = "v1"


def sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _stat_key(path: str) -> str:
  st = os.stat(path)
  return sha256_bytes(canonical_json([_CACHE_VERSION, os.path.abspath(path), st.st_size, st.st_mtime_ns]))


def _cache_path(key: str) -> str:
  return os.path.join(cache_dir(), "fingerprints", key[:2], key + ".json")


def file_sha256(path: str) -> str:
  """sha256 of a file's bytes (or of a directory's file list with their hashes), cached by stat."""
  if os.path.isdir(path):
    entries = []
    for dirpath, dirnames, filenames in os.walk(path):
      dirnames.sort()
      for name in sorted(filenames):
        full = os.path.join(dirpath, name)
        entries.append([os.path.relpath(full, path).replace(os.sep, "/"), file_sha256(full)])
    return sha256_bytes(canonical_json(entries))
  key = _stat_key(path)
  cached = _cache_path(key)
  try:
    with open(cached) as f:
      return json.load(f)["sha256"]
  except (OSError, ValueError, KeyError):
    pass
  digest = _hash_stream(path)
  if _stat_key(path) == key:  # Not rewritten while we read it: safe to remember.
    atomic.write_json(cached, {"path": os.path.abspath(path), "sha256": digest}, indent=None)
  return digest


def manifest_hash(canonical_manifest: dict, included: list[str], excluded: list[dict], tokenizer_sha256: str,
                  files: dict[str, list[list[str]]]) -> str:
  return sha256_bytes(canonical_json({
      "manifest": canonical_manifest, "included": included, "excluded": excluded,
      "tokenizer": tokenizer_sha256, "files": files}))
