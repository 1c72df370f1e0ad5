"""Whole-file writes a reader sees entirely or not at all: a temporary file in the same folder, fsynced, renamed."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def write_text(path: str, text: str) -> str:
  """Writes `text` to `path` (its folder created); a crash leaves the old file or none, never a torn one."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())  # The bytes on disk before the rename makes them the file.
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


def write_json(path: str, value: Any, **dump_args) -> str:
  """`value` as JSON (indent 2 unless dump_args say otherwise), written atomically."""
  return write_text(path, json.dumps(value, **{"indent": 2, **dump_args}))
