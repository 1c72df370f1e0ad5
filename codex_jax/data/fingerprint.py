"""Content fingerprints of data files and the manifest hash that identifies a run's training data.

manifest_hash = sha256 of the canonical JSON (sorted keys, no spaces) of
  {"manifest": Manifest.canonical(), "included": [names], "excluded": [{source, licence, reason}],
   "tokenizer": sha256 of the tokenizer's JSON, "files": {source: [[relative path, sha256], ...]}}
where each file's sha256 is of its bytes, streamed; a directory (an episode) hashes the canonical JSON
of its files' [relative path, sha256] pairs. Every file is hashed from its bytes at every start: a cache keyed
by path, size and modification time cannot prove the bytes unchanged (an edit can keep both), so none is kept.
"""

from __future__ import annotations

import hashlib
import os

from codex_jax.hashing import canonical_json, sha256_file


def sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def file_sha256(path: str) -> str:
  """sha256 of a file's bytes, or of a directory's file list with their hashes."""
  if not os.path.isdir(path):
    return sha256_file(path)
  entries = []
  for dirpath, dirnames, filenames in os.walk(path):
    dirnames.sort()
    for name in sorted(filenames):
      full = os.path.join(dirpath, name)
      entries.append([os.path.relpath(full, path).replace(os.sep, "/"), sha256_file(full)])
  return sha256_bytes(canonical_json(entries))


def manifest_hash(canonical_manifest: dict, included: list[str], excluded: list[dict], tokenizer_sha256: str,
                  files: dict[str, list[list[str]]]) -> str:
  return sha256_bytes(canonical_json({
      "manifest": canonical_manifest, "included": included, "excluded": excluded,
      "tokenizer": tokenizer_sha256, "files": files}))
