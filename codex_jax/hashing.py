"""The two hashing primitives the data manifest and checkpoint lineage share: canonical JSON, a file's sha256."""

from __future__ import annotations

import hashlib
import json
from typing import Any

_CHUNK = 1 << 20


def canonical_json(obj: Any) -> bytes:
  """Sorted keys, no whitespace, UTF-8, no NaN/Inf: the same bytes for the same content, everywhere."""
  return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def sha256_file(path: str) -> str:
  """sha256 of a file's bytes, streamed in 1 MiB chunks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()
