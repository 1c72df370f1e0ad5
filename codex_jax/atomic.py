"""Whole-file writes a reader sees entirely or not at all: a temporary file in the same folder, fsynced, renamed."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def file_mode(mode: int = 0o666) -> int:
  """`mode` less the process umask: what open() gives a new file. mkstemp's 0600 would hide a run's files
  from teammates on a shared filesystem."""
  mask = os.umask(0)
  os.umask(mask)
  return mode & ~mask


def write_bytes(path: str, data: bytes) -> str:
  """Writes `data` to `path` (its folder created); a crash leaves the old file or none, never a torn one."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    os.fchmod(fd, file_mode())
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())  # The bytes on disk before the rename makes them the file.
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


def write_text(path: str, text: str) -> str:
  """`text` as UTF-8, written atomically (`write_bytes`)."""
  return write_bytes(path, text.encode("utf-8"))


def write_json(path: str, value: Any, **dump_args) -> str:
  """`value` as JSON (indent 2 unless dump_args say otherwise), written atomically."""
  return write_text(path, json.dumps(value, **{"indent": 2, **dump_args}))
