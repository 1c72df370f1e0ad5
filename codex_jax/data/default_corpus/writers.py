"""Deterministic shard writers for the default corpus: the same records always give the same bytes."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

# Fixed compression settings: a different level would change every byte and the corpus checksum with it.
_ZSTD_LEVEL = 10
_GZIP_LEVEL = 9


@dataclasses.dataclass
class Stats:
  """What one source wrote: data files (licence notices excluded), records and bytes on disk."""
  files: int = 0
  records: int = 0
  bytes: int = 0

  def add(self, path: str, records: int) -> None:
    self.files += 1
    self.records += records
    self.bytes += os.path.getsize(path)

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Source:
  """One corpus source: its identity, its licence and the function that writes it under a corpus root."""
  name: str
  kind: str  # web | code | books | video | embodied | synthetic
  licence: str  # SPDX id
  origin: str  # provenance, one line
  build: Callable[..., Stats]  # build(root, *, limit=None) -> Stats


def shard_path(root: str, folder: str, stem: str, index: int, suffix: str) -> str:
  os.makedirs(os.path.join(root, folder), exist_ok=True)
  return os.path.join(root, folder, f"{stem}-{index:05d}{suffix}")


def write_shards(root: str, folder: str, stem: str, suffix: str, shards: Iterable[list],
                 write: Callable[[str, list], None]) -> Stats:
  """Writes each shard (a list of records) as root/folder/stem-0000N.suffix with `write(path, shard)`."""
  stats = Stats()
  for i, shard in enumerate(shards):
    path = shard_path(root, folder, stem, i, suffix)
    write(path, shard)
    stats.add(path, len(shard))
  return stats


def chunk_by_bytes(rows: Iterable[dict[str, Any]], max_bytes: int, field: str = "text") -> Iterator[list[dict]]:
  """Groups rows into shards of about `max_bytes` of `field` text each (a row never straddles two)."""
  shard: list[dict] = []
  size = 0
  for row in rows:
    shard.append(row)
    size += len(row[field].encode("utf-8"))
    if size >= max_bytes:
      yield shard
      shard, size = [], 0
  if shard:
    yield shard


def chunk_by_count(items: Iterable[Any], count: int) -> Iterator[list[Any]]:
  shard: list[Any] = []
  for item in items:
    shard.append(item)
    if len(shard) == count:
      yield shard
      shard = []
  if shard:
    yield shard


def jsonl_bytes(rows: list[dict[str, Any]]) -> bytes:
  # sort_keys and fixed separators: dict insertion order must not leak into the bytes.
  return b"".join(json.dumps(r, ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n" for r in rows)


def write_jsonl_gz(path: str, rows: list[dict[str, Any]]) -> None:
  with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                              compresslevel=_GZIP_LEVEL) as f:
    f.write(jsonl_bytes(rows))


def write_jsonl_zst(path: str, rows: list[dict[str, Any]]) -> None:
  data = jsonl_bytes(rows)
  with open(path, "wb") as f:
    f.write(zstandard.ZstdCompressor(level=_ZSTD_LEVEL, threads=0).compress(data))


def write_parquet(path: str, rows: list[dict[str, str]], columns: tuple[str, ...]) -> None:
  table = pa.table({c: pa.array([r[c] for r in rows], pa.string()) for c in columns})
  pq.write_table(table, path, compression="zstd", compression_level=_ZSTD_LEVEL)


def npy_bytes(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
  return buf.getvalue()


def write_npy(path: str, array: np.ndarray) -> None:
  with open(path, "wb") as f:
    f.write(npy_bytes(array))


def write_json(path: str, obj: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_tar(path: str, samples: list[tuple[str, dict[str, bytes]]]) -> None:
  """A WebDataset shard: for each (key, {extension: bytes}) the members `<key>.<extension>`, in order.

  Owner, mode and mtime are fixed so the archive depends on its contents only.
  """
  with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
    for key, members in samples:
      for ext in sorted(members):
        data = members[ext]
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(data))


def copy_notice(src: str | None, dst: str) -> None:
  """Copies a licence file next to the data it covers, when the installed package ships one."""
  if src and os.path.isfile(src):
    with open(src, "rb") as f_in, open(dst, "wb") as f_out:
      f_out.write(f_in.read())
