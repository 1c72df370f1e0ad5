"""ArrayRecord files of pre-tokenized sequences: each record is one sequence of int32 token ids.

Layout:
  files      names ending .array_record, or sharded as .array_record-00000-of-00008 (grain's naming).
  record     the record's bytes are little-endian int32 token ids, 4 bytes each; it becomes
             {"tokens": int32 [N]}. An empty record, or one whose length is not a multiple of 4, is
             malformed. `write_token_records` writes such files.
  names      "record N", 0-based.
  locator    N, the record's index.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from codex_jax.data.errors import DataError
from codex_jax.data.formats.base import Format, Locator
from codex_jax.data.records import MalformedRecord, Record, check_record

_NAME = re.compile(r"\.array_record(-\d+-of-\d+)?$")
# Random access, as grain opens these files: read-ahead only helps a sequential scan.
_READER_OPTIONS = "readahead_buffer_size:0"
# One record per chunk, so that reading a record decompresses only that record.
_WRITER_OPTIONS = "group_size:1"
_INT32 = np.dtype("<i4")


class ArrayRecordFormat(Format):
  name = "array_record"
  suffixes = (".array_record",)
  defaults: dict = {}

  def matches(self, filename: str) -> bool:
    return _NAME.search(filename) is not None

  def scan(self, path: str, options: dict) -> list[tuple[str, Locator]]:
    reader = _open(path)
    self.cache("readers").put(path, reader)  # Refreshed: the file may have changed since it was opened.
    return [(f"record {i}", i) for i in range(reader.num_records())]

  def read(self, path: str, locator: Locator, options: dict) -> Record:
    where = f"record {locator}"
    reader = self.cache("readers").get(path, _open)
    if not isinstance(locator, int) or not 0 <= locator < reader.num_records():
      raise MalformedRecord(path, where, f"no such record; the file has {reader.num_records()}")
    try:
      data = reader.read([locator])[0]  # Thread-safe: grain shares one reader per file across threads.
    except RuntimeError as e:
      raise MalformedRecord(path, where, f"cannot read: {e}") from None
    if not data:
      raise MalformedRecord(path, where, "empty record")
    if len(data) % 4:
      raise MalformedRecord(path, where, f"{len(data)} bytes is not a whole number of int32 token ids")
    return check_record({"tokens": np.frombuffer(data, _INT32).astype(np.int32)}, path, where)


def _open(path: str) -> ArrayRecordReader:
  if not os.path.isfile(path):
    raise DataError(f"Cannot open {path}: no such file.")
  reader = ArrayRecordReader(path, _READER_OPTIONS)
  if not reader.ok():
    raise DataError(f"Cannot read {path} as an ArrayRecord file (corrupt, or another format).")
  return reader


def write_token_records(path: str, sequences: Iterable[Sequence[int] | np.ndarray]) -> int:
  """Writes each sequence of token ids as one record of little-endian int32; returns how many."""
  writer, count = ArrayRecordWriter(os.fspath(path), _WRITER_OPTIONS), 0
  try:
    if not writer.ok():
      raise DataError(f"Cannot write {path}.")
    for sequence in sequences:
      ids = np.asarray(sequence)
      if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise DataError(f"Sequence {count} is {ids.dtype}{list(ids.shape)}; expected a 1-d sequence of ints.")
      if ids.size and (ids.min() < -2**31 or ids.max() >= 2**31):
        raise DataError(f"Sequence {count} holds ids outside int32.")
      writer.write(ids.astype(_INT32).tobytes())
      count += 1
  finally:
    writer.close()
  return count
