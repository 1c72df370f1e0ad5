"""The validated index of one data file: its good records' locators and why each bad one is bad, cached.

Every record is decoded and checked once, so malformed data is reported before training starts and the
pipeline only ever reads good records. The result is cached as JSON under
<cache_dir>/index/<sha256>.json, keyed by the file's absolute path, size and mtime (for an episode
directory, those of each of its files), the format, its options and INDEX_VERSION: an unchanged file is
never validated twice, a touched one always is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings

from codex_jax import atomic
from codex_jax.data.errors import DataError
from codex_jax.data.formats.base import Format, Locator
from codex_jax.data.records import MalformedRecord, cache_dir

INDEX_VERSION = 1  # Bump when a reader's locators or validation change.


@dataclasses.dataclass(frozen=True)
class FileIndex:
  path: str
  records: list[tuple[str, Locator]]  # The good records, in file order.
  malformed: list[tuple[str, str]]  # (record name, reason) of each bad record, in file order.


def index_file(fmt: Format, path: str, options: dict) -> FileIndex:
  """The validated index of `path`, from the cache when the file is unchanged since it was built."""
  path = os.path.abspath(path)
  options = fmt.validate_options(options)
  key = _cache_key(fmt, path, options)
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
  index = FileIndex(path, records, malformed)
  if _cache_key(fmt, path, options) == key:  # Not cached if the file changed while it was validated.
    _save(cache_path, index)
  return index


def _fingerprint(path: str) -> list:
  """What changes when the file (or an episode directory's files) changes."""
  try:
    if os.path.isdir(path):
      entries = sorted((e.name, e.stat()) for e in os.scandir(path) if e.is_file())
      return [[name, st.st_size, st.st_mtime_ns] for name, st in entries]
    st = os.stat(path)
  except OSError as e:
    raise DataError(f"Cannot read {path}: {e}") from e
  return [st.st_size, st.st_mtime_ns]


def _cache_key(fmt: Format, path: str, options: dict) -> str:
  identity = {"version": INDEX_VERSION, "path": path, "format": fmt.name, "options": options,
              "fingerprint": _fingerprint(path)}
  return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _load(cache_path: str, path: str) -> FileIndex | None:
  """The cached index, or None when there is none or it cannot be used (then it is rebuilt)."""
  try:
    with open(cache_path, encoding="utf-8") as f:
      data = json.load(f)
    if data["path"] != path or len(data["names"]) != len(data["locators"]):
      return None
    records = list(zip(data["names"], data["locators"], strict=True))  # zip: fast for millions of records.
    malformed = [(str(name), str(reason)) for name, reason in data["malformed"]]
  except (OSError, ValueError, KeyError, TypeError):
    return None
  return FileIndex(path, records, malformed)


def _save(cache_path: str, index: FileIndex) -> None:
  """Writes atomically, so a concurrent reader sees the old file or the new one, never half of one."""
  folder = os.path.dirname(cache_path)
  data = {"path": index.path, "names": [name for name, _ in index.records],
          "locators": [locator for _, locator in index.records], "malformed": index.malformed}
  try:
    atomic.write_json(cache_path, data, indent=None, separators=(",", ":"))
  except OSError as e:  # An unwritable cache slows the next start down; it does not stop this one.
    warnings.warn(f"Could not cache the index of {index.path} in {folder}: {e}", stacklevel=3)
