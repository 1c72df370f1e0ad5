"""Apache Parquet text: one record per row, from one string column.

Layout:
  files      names ending .parquet, any compression pyarrow reads.
  record     the row's value in column `text_field` (option, default "text"; a string or large_string
             column) becomes {"text": ...}; other columns are ignored. A file without that column is
             refused as a whole; a null, empty or non-string value makes that row malformed.
  names      "row N", 0-based over the whole file (all row groups).
  locator    [row group, row within the group]. Reading keeps the last row group's column decoded,
             so consecutive rows cost one decode per row group.
"""

from __future__ import annotations

import itertools

import pyarrow as pa
import pyarrow.parquet as pq

from codex_jax.data.errors import DataError
from codex_jax.data.formats.base import Format, Locator
from codex_jax.data.records import MalformedRecord, Record, check_record


class ParquetFormat(Format):
  name = "parquet"
  suffixes = (".parquet",)
  defaults = {"text_field": "text"}

  def scan(self, path: str, options: dict) -> list[tuple[str, Locator]]:
    opened = _open(path)
    self.cache("files").put(path, opened)  # Refreshed: the file may have changed since this instance read it.
    self.cache("group", size=1).clear()
    _check_column(opened[0], path, self.option(options, "text_field"))
    metadata, records, row = opened[0].metadata, [], 0
    for group in range(metadata.num_row_groups):
      for i in range(metadata.row_group(group).num_rows):
        records.append((f"row {row}", [group, i]))
        row += 1
    return records

  def read(self, path: str, locator: Locator, options: dict) -> Record:
    group, i = locator
    field = self.option(options, "text_field")
    file, starts = self.cache("files").get(path, _open)
    if not 0 <= group < file.metadata.num_row_groups or not 0 <= i < starts[group + 1] - starts[group]:
      raise MalformedRecord(path, f"row group {group} row {i}", "no such row (was the file changed after indexing?)")
    where = f"row {starts[group] + i}"
    column = self.cache("group", size=1).get((path, group, field), lambda _: _read_column(file, path, group, field))
    value = column[i].as_py()
    if value is None:
      raise MalformedRecord(path, where, f"column {field!r} is null")
    if not isinstance(value, str):
      raise MalformedRecord(path, where, f"column {field!r} holds {type(value).__name__}, expected a string")
    if not value.strip():
      raise MalformedRecord(path, where, f"column {field!r} is empty")
    return check_record({"text": value}, path, where)


def _open(path: str) -> tuple[pq.ParquetFile, list[int]]:
  """The open file and the first row number of each row group."""
  try:
    file = pq.ParquetFile(path)
  except (OSError, pa.ArrowException) as e:
    raise DataError(f"Cannot read {path} as Parquet: {e}") from e
  sizes = [file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups)]
  return file, [0, *itertools.accumulate(sizes)]


def _read_column(file: pq.ParquetFile, path: str, group: int, field: str) -> pa.Array:
  _check_column(file, path, field)
  try:
    return file.read_row_group(group, columns=[field]).column(0).combine_chunks()
  except (OSError, pa.ArrowException) as e:
    raise DataError(f"Cannot read row group {group} of {path}: {e}") from e


def _check_column(file: pq.ParquetFile, path: str, field: str) -> None:
  names = file.schema_arrow.names
  if field not in names:
    raise DataError(f"{path} has no column {field!r} (columns: {names}); set the format option "
                    f"'text_field' to the text column.")
