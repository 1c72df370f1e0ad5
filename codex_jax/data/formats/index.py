"""The validated index of one data file: its good records' locators and why each bad one is bad, cached.

Every record is decoded and checked once, so malformed data is reported before training starts and the
pipeline only ever reads good records. The result is cached as JSON under
<cache_dir>/index/<sha256>.json, keyed by the file's content hash (data/fingerprint.py), the format, its options
and INDEX_VERSION: the same bytes are never validated twice, changed bytes always are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings

from codex_jax import atomic
from codex_jax.data import fingerprint
from codex_jax.data.errors import DataError
from codex_jax.data.formats.base import Format, Locator
from codex_jax.data.records import MalformedRecord, cache_dir

INDEX_VERSION = 1  # Bump when a reader's locators or validation change.


@dataclasses.dataclass(frozen=True)
class FileIndex:
  path: str
  records: list[tuple[str, Locator]]  # The good records, in file order.
  malformed: list[tuple[str, str]]  # (record name, reason) of each bad record, in file order.


def index_file(fmt: Format, path: str, options: dict, content_sha256: str) -> FileIndex:
  """The validated index of `path`, whose bytes hash to `content_sha256`, from the cache when one was built for
  the same bytes."""
  path = os.path.abspath(path)
  options = fmt.validate_options(options)
  key = _cache_key(fmt, content_sha256, options)
  cache_path = os.path.join(cache_dir(), "index", f"{key}.json")
  cached = _load(cache_path, path)
  if cached is not None:
    return cached
  records, malformed = [], []
  for name, locator in fmt.scan(path, options):
    try:
      fmt.read(path, locator, options)
    except MalformedRecord as e:
      malformed.append((name, e.reason))
    else:
      records.append((name, locator))
  if fingerprint.file_sha256(path) != content_sha256:
    raise DataError(f"{path} changed while it was being read; rerun once it is no longer being written")
  index = FileIndex(path, records, malformed)
  _save(cache_path, index)
  return index


def _cache_key(fmt: Format, content_sha256: str, options: dict) -> str:
  identity = {"version": INDEX_VERSION, "content": content_sha256, "format": fmt.name, "options": options}
  return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _load(cache_path: str, path: str) -> FileIndex | None:
  """The cached index, or None when there is none or it cannot be used (then it is rebuilt)."""
  try:
    with open(cache_path, encoding="utf-8") as f:
      data = json.load(f)
    if len(data["names"]) != len(data["locators"]):
      return None
    records = list(zip(data["names"], data["locators"], strict=True))  # zip: fast for millions of records.
    malformed = [(str(name), str(reason)) for name, reason in data["malformed"]]
  except (OSError, ValueError, KeyError, TypeError):
    return None
  return FileIndex(path, records, malformed)


def _save(cache_path: str, index: FileIndex) -> None:
  """Writes atomically, so a concurrent reader sees the old file or the new one, never half of one."""
  folder = os.path.dirname(cache_path)
  data = {"names": [name for name, _ in index.records],
          "locators": [locator for _, locator in index.records], "malformed": index.malformed}
  try:
    atomic.write_json(cache_path, data, indent=None, separators=(",", ":"))
  except OSError as e:  # An unwritable cache slows the next start down; it does not stop this one.
    warnings.warn(f"Could not cache the index of {index.path} in {folder}: {e}", stacklevel=3)
