"""The reader contract every data format follows, plus the small caches and file matching they share.

A format turns a user's location into files (`files`), a file into record locators (`scan`, cheap, in
file order) and one locator into a checked record (`read`, see `data/records.py`). Locators are JSON
values so that `formats/index.py` can cache them.

Locations: a file, a directory (every file of the format under it, recursively; names starting with
"." are skipped, as are symlinked subdirectories) or a glob pattern ("**" recurses), "~" expanded.

Readers run in grain worker processes and threads: an instance pickles without its caches (open files,
decompressed bytes, the last row group), which are rebuilt on first use, and files are read with
`os.pread` so concurrent reads share no file position.
"""

from __future__ import annotations

import abc
import collections
import glob
import os
import threading
from collections.abc import Callable
from typing import Any

from codex_jax.data.errors import DataError
from codex_jax.data.records import Record

Locator = int | list | dict
_GLOB_CHARS = frozenset("*?[")


class LRU:
  """A tiny thread-safe least-recently-used map: `get(key, load)` loads a missing key."""

  def __init__(self, size: int = 2):
    self._size = size
    self._items: collections.OrderedDict[Any, Any] = collections.OrderedDict()
    self._lock = threading.Lock()

  def get(self, key: Any, load: Callable[[Any], Any]) -> Any:
    with self._lock:
      if key in self._items:
        self._items.move_to_end(key)
        return self._items[key]
    value = load(key)  # Outside the lock: a load may take seconds (a whole .zst file).
    self.put(key, value)
    return value

  def peek(self, key: Any) -> Any:
    with self._lock:
      return self._items.get(key)

  def clear(self) -> None:
    with self._lock:
      self._items.clear()

  def put(self, key: Any, value: Any) -> None:
    with self._lock:
      self._items[key] = value
      self._items.move_to_end(key)
      while len(self._items) > self._size:
        self._items.popitem(last=False)  # Not closed here: a thread may still hold it; see OpenFile.


class OpenFile:
  """A read-only file descriptor closed when the last user drops it, read by offset (`os.pread`)."""

  def __init__(self, path: str):
    self.path = path
    try:
      self.fd = os.open(path, os.O_RDONLY)
    except OSError as e:
      raise DataError(f"Cannot open {path}: {e}") from e

  def read(self, offset: int, length: int) -> bytes:
    chunks, done = [], 0
    while done < length:  # pread may return fewer bytes than asked.
      chunk = os.pread(self.fd, length - done, offset + done)
      if not chunk:
        break
      chunks.append(chunk)
      done += len(chunk)
    return b"".join(chunks)

  def __del__(self):
    fd = getattr(self, "fd", None)
    if fd is not None:
      os.close(fd)


class Format(abc.ABC):
  """Reads one data format: location -> files -> (record name, locator) -> record."""

  name: str = ""
  suffixes: tuple[str, ...] = ()  # File name endings of this format.
  defaults: dict[str, Any] = {}  # Allowed options with their defaults.

  # ---- options ----
  def validate_options(self, options: dict | None) -> dict:
    """`defaults` updated with `options`; DataError naming an unknown or mistyped option."""
    merged = dict(self.defaults)
    for key, value in (options or {}).items():
      if key not in self.defaults:
        raise DataError(f"Unknown option {key!r} for format {self.name!r}; allowed: "
                        f"{sorted(self.defaults) or 'none'}.")
      want = type(self.defaults[key])
      if not isinstance(value, want) or (isinstance(value, bool) and want is not bool):
        raise DataError(f"Option {key!r} of format {self.name!r} must be a {want.__name__}, got {value!r}.")
      merged[key] = value
    self.check_options(merged)
    return merged

  def check_options(self, options: dict) -> None:
    """Raises DataError for option values out of range; the types are already checked."""
    if "text_field" in options and not options["text_field"]:
      raise DataError(f"Option 'text_field' of format {self.name!r} must name a field, got ''.")

  def option(self, options: dict, key: str) -> Any:
    return options.get(key, self.defaults[key])

  # ---- files ----
  def matches(self, filename: str) -> bool:
    return filename.endswith(self.suffixes)

  def files(self, location: str) -> list[str]:
    """The absolute, sorted paths of this format's files at `location` (file, directory or glob)."""
    paths = expand_location(location)
    if not paths:
      raise DataError(f"No {self.name} files at {location!r}: no such file, directory or glob match.")
    found: set[str] = set()
    for path in paths:
      if os.path.isdir(path):
        found.update(p for p in walk_files(path) if self.matches(os.path.basename(p)))
      elif self.matches(os.path.basename(path)):
        found.add(path)
    if not found:
      raise DataError(f"No {self.name} files at {location!r} (looked for names ending "
                      f"{' / '.join(self.suffixes)}).")
    return sorted(found)

  # ---- records ----
  @abc.abstractmethod
  def scan(self, path: str, options: dict) -> list[tuple[str, Locator]]:
    """(record name, locator) of every record of `path`, in file order; DataError if unreadable."""

  @abc.abstractmethod
  def read(self, path: str, locator: Locator, options: dict) -> Record:
    """The checked record at `locator`; MalformedRecord(path, record name, reason) if bad."""

  # ---- caches, dropped on pickling ----
  def cache(self, name: str, size: int = 2) -> LRU:
    caches = self.__dict__.setdefault("_caches", {})
    lru = caches.get(name)
    return lru if lru is not None else caches.setdefault(name, LRU(size))

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    state.pop("_caches", None)
    return state


def expand_location(location: str) -> list[str]:
  """Absolute paths a location names: itself if it exists, or its glob matches."""
  pattern = os.path.expanduser(location)
  if _GLOB_CHARS & set(pattern):
    paths = glob.glob(pattern, recursive=True)
  else:
    paths = [pattern] if os.path.exists(pattern) else []
  return [os.path.abspath(p) for p in paths]


def walk_files(root: str) -> list[str]:
  """Every non-hidden file under `root`, recursively."""
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    paths.extend(os.path.join(dirpath, f) for f in filenames if not f.startswith("."))
  return paths
