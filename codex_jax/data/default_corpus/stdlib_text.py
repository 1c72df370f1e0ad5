"""Python's standard library as code (parquet) and as documentation (docstrings + help topics, jsonl.zst)."""

from __future__ import annotations

import hashlib
import os
import platform

from codex_jax.data.default_corpus import stdlib_walk as corpus
from codex_jax.data.default_corpus import writers

CODE_MAX_BYTES = 6 << 20
DOCS_MAX_BYTES = 3 << 20
_SHARD_BYTES = 4 << 20  # Text per shard: the code lands in two shards, the docs in one.
_PY = platform.python_version()


def _licence_file() -> str:
  return os.path.join(corpus.stdlib_root(), "LICENSE.txt")


def build_code(root: str, *, limit: int | None = None, max_bytes: int = CODE_MAX_BYTES) -> writers.Stats:
  """One parquet row (`text`, `path`) per stdlib .py file, until `max_bytes` of text, rows in sorted path order.

  The files are picked in the order of a hash of their paths, so the cap keeps a spread sample of the whole
  library rather than only the modules from "a" to "l".
  """
  lib = corpus.stdlib_root()
  picked: list[dict[str, str]] = []
  total = 0
  for rel_path in sorted(corpus.relative_paths(lib), key=lambda p: hashlib.sha256(p.encode()).digest()):
    if (limit is not None and len(picked) >= limit) or total >= max_bytes:
      break
    # The generator yields the code document before it parses anything, so next() reads the file only.
    doc = next(corpus.module_documents(lib, rel_path), None)
    if doc is not None:
      picked.append({"text": doc.text, "path": rel_path})
      total += len(doc.text.encode("utf-8"))
  rows = sorted(picked, key=lambda r: r["path"])
  stats = writers.write_shards(root, "code", "stdlib-code", ".parquet", writers.chunk_by_bytes(rows, _SHARD_BYTES),
                               lambda path, shard: writers.write_parquet(path, shard, ("text", "path")))
  writers.copy_notice(_licence_file(), os.path.join(root, "code", "LICENSE.txt"))
  return stats


def _doc_rows(limit: int | None, max_bytes: int) -> list[dict[str, str]]:
  lib = corpus.stdlib_root()
  rows: list[dict[str, str]] = []
  total = 0

  def full() -> bool:
    return (limit is not None and len(rows) >= limit) or total >= max_bytes

  for rel_path in corpus.relative_paths(lib):
    if full():
      return rows
    for doc in corpus.module_documents(lib, rel_path):
      if doc.source == corpus.DOCSTRINGS:
        rows.append({"text": doc.text, "path": f"docstrings/{rel_path}"})
        total += len(doc.text.encode("utf-8"))
  from pydoc_data import topics  # The text behind help("if"), help("FORMATTING"), ...

  for name in sorted(topics.topics):
    if full():
      break
    text = topics.topics[name].strip()
    if text:
      rows.append({"text": f"# {name}\n\n{text}\n", "path": f"topics/{name}"})
      total += len(text.encode("utf-8"))
  return rows


def build_docs(root: str, *, limit: int | None = None, max_bytes: int = DOCS_MAX_BYTES) -> writers.Stats:
  """JSON lines {"text", "path"}: one docstrings document per stdlib module, then one per pydoc help topic."""
  stats = writers.write_shards(root, "docs", "stdlib-docs", ".jsonl.zst",
                               writers.chunk_by_bytes(_doc_rows(limit, max_bytes), _SHARD_BYTES), writers.write_jsonl_zst)
  writers.copy_notice(_licence_file(), os.path.join(root, "docs", "LICENSE.txt"))
  return stats


CODE = writers.Source(
    name="python-stdlib-code", kind="code", licence="PSF-2.0", build=build_code,
    origin=f"The .py files of the CPython {_PY} standard library that ran the build (test suites, idlelib and "
           "site-packages skipped), verbatim, a 6 MB sample picked by path hash; PSF License Agreement in LICENSE.txt.")
DOCS = writers.Source(
    name="python-stdlib-docs", kind="books", licence="PSF-2.0", build=build_docs,
    origin=f"Docstrings of the CPython {_PY} standard library, one document per module, plus the pydoc_data.topics "
           "help topics shipped with CPython; PSF License Agreement in LICENSE.txt.")
