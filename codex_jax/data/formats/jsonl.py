"""JSON Lines text: one JSON object per line, plain, gzip or zstandard compressed.

Layout:
  files      names ending .jsonl, .jsonl.gz (gzip, several members allowed) or .jsonl.zst (zstandard,
             several frames allowed); UTF-8, a leading byte-order mark is ignored.
  record     each non-blank line, a JSON object; its field `text_field` (option, default "text") must be
             a non-empty string and becomes the record {"text": ...}. Other fields are ignored.
  blank      lines holding only whitespace are not records but still count: "line N" is 1-based over
             every line of the (decompressed) file.
  locator    [byte offset, byte length] of the line without its newline, in the file for plain files and
             in the decompressed bytes for compressed ones (decompressed once per file, 2 files cached).
"""

from __future__ import annotations

import gzip
import io
import json

import numpy as np
import zstandard

from codex_jax.data.errors import DataError
from codex_jax.data.formats.base import Format, Locator, OpenFile
from codex_jax.data.records import MalformedRecord, Record, check_record

_COUNT_CHUNK = 1 << 20
_NEWLINE = b"\n"


class JsonlFormat(Format):
  name = "jsonl"
  suffixes = (".jsonl", ".jsonl.gz", ".jsonl.zst")
  defaults = {"text_field": "text"}

  def scan(self, path: str, options: dict) -> list[tuple[str, Locator]]:
    # Scanning refreshes this file's caches: it may have changed since this instance last read it.
    if _compressed(path):
      data = _decompress(path)
      self.cache("data").put(path, data)
      stream = io.BytesIO(data)
    else:
      self.cache("files").put(path, OpenFile(path))
      try:
        stream = open(path, "rb")
      except OSError as e:
        raise DataError(f"Cannot open {path}: {e}") from e
    records, offsets, numbers, offset = [], [], [], 0
    with stream:
      for number, line in enumerate(stream, start=1):
        if line.strip():
          records.append((f"line {number}", [offset, len(line) - line.endswith(b"\n")]))
          offsets.append(offset)
          numbers.append(number)
        offset += len(line)
    # Kept so that a malformed line read in this process is named without recounting newlines.
    table = (np.asarray(offsets, np.int64), np.asarray(numbers, np.int64))
    self.cache("lines").put(path, table)
    return records

  def read(self, path: str, locator: Locator, options: dict) -> Record:
    offset, length = locator
    if _compressed(path):
      line = self._data(path)[offset:offset + length]
    else:
      line = self.cache("files").get(path, OpenFile).read(offset, length)
    try:  # The line number is looked up only for a bad line: it may mean counting newlines.
      return check_record({"text": self._text(line, offset, self.option(options, "text_field"))}, path, "")
    except ValueError as e:
      reason = e.reason if isinstance(e, MalformedRecord) else str(e)
      raise MalformedRecord(path, self._line_name(path, offset), reason) from None

  @staticmethod
  def _text(line: bytes, offset: int, field: str) -> str:
    if not line.strip():
      raise ValueError("blank or missing line (was the file changed after indexing?)")
    try:
      obj = json.loads(line.decode("utf-8-sig" if offset == 0 else "utf-8"))
    except UnicodeDecodeError as e:
      raise ValueError(f"not valid UTF-8: {e}") from None
    except json.JSONDecodeError as e:
      raise ValueError(f"invalid JSON: {e}") from None
    if not isinstance(obj, dict):
      raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if field not in obj:
      raise ValueError(f"no field {field!r} (fields: {sorted(obj)[:10]})")
    text = obj[field]
    if not isinstance(text, str):
      raise ValueError(f"field {field!r} is {type(text).__name__}, expected a string")
    if not text.strip():
      raise ValueError(f"field {field!r} is empty")
    return text

  def _data(self, path: str) -> bytes:
    return self.cache("data").get(path, _decompress)

  def _line_name(self, path: str, offset: int) -> str:
    table = self.cache("lines").peek(path)
    if table is not None:
      offsets, numbers = table
      i = int(np.searchsorted(offsets, offset))
      if i < len(offsets) and offsets[i] == offset:
        return f"line {numbers[i]}"
    if _compressed(path):  # Not scanned in this process: count the newlines before the offset.
      return f"line {self._data(path).count(_NEWLINE, 0, offset) + 1}"
    file, count = self.cache("files").get(path, OpenFile), 0
    for start in range(0, offset, _COUNT_CHUNK):
      count += file.read(start, min(_COUNT_CHUNK, offset - start)).count(_NEWLINE)
    return f"line {count + 1}"


def _compressed(path: str) -> bool:
  return path.endswith((".gz", ".zst"))


def _decompress(path: str) -> bytes:
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        return f.read()
    with open(path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True) as r:
      return r.read()
  except (OSError, EOFError, zstandard.ZstdError) as e:
    raise DataError(f"Cannot decompress {path}: {e}") from e
