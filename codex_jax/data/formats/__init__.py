"""Readers for the data formats users already have, by name, with their options and the validating index."""

from __future__ import annotations

from codex_jax.data.errors import DataError
from codex_jax.data.formats.array_record import ArrayRecordFormat, write_token_records
from codex_jax.data.formats.base import Format, Locator
from codex_jax.data.formats.episodes import EpisodesFormat
from codex_jax.data.formats.index import INDEX_VERSION, FileIndex, index_file
from codex_jax.data.formats.jsonl import JsonlFormat
from codex_jax.data.formats.parquet import ParquetFormat
from codex_jax.data.formats.wds import WdsFormat

FORMATS: dict[str, Format] = {
    f.name: f for f in (JsonlFormat(), ParquetFormat(), WdsFormat(), EpisodesFormat(), ArrayRecordFormat())}
# Per format, the allowed option keys with their defaults.
OPTIONS: dict[str, dict] = {name: dict(f.defaults) for name, f in FORMATS.items()}


def get_format(name: str) -> Format:
  if name not in FORMATS:
    raise DataError(f"Unknown data format {name!r}; known formats: {sorted(FORMATS)}.")
  return FORMATS[name]


def validate_options(fmt: str | Format, options: dict | None) -> dict:
  """The format's default options updated with `options`; DataError naming an unknown or mistyped key."""
  return (get_format(fmt) if isinstance(fmt, str) else fmt).validate_options(options)


__all__ = [
    "FORMATS", "INDEX_VERSION", "OPTIONS", "ArrayRecordFormat", "DataError", "EpisodesFormat", "FileIndex", "Format",
    "JsonlFormat", "Locator", "ParquetFormat", "WdsFormat", "get_format", "index_file", "validate_options",
    "write_token_records",
]
