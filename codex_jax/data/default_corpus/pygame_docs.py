"""pygame-ce's documentation sources (.rst.txt, LGPL-2.1), as shipped in its wheel, one JSON line per file."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

from codex_jax.data.default_corpus import writers


def docs_root() -> str | None:
  """The wheel's `docs/generated/_sources`, found without importing pygame (which greets on stdout)."""
  spec = importlib.util.find_spec("pygame")
  if spec is None or not spec.submodule_search_locations:
    return None
  root = os.path.join(list(spec.submodule_search_locations)[0], "docs", "generated", "_sources")
  return root if os.path.isdir(root) else None


def _version() -> str:
  try:
    return importlib.metadata.version("pygame-ce")
  except importlib.metadata.PackageNotFoundError:
    return "(not installed)"


def _rst_files(root: str) -> list[str]:
  paths = []
  for dirpath, _, filenames in os.walk(root):
    for name in filenames:
      if name.endswith(".rst.txt"):
        paths.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
  return sorted(paths)


def build(root: str, *, limit: int | None = None) -> writers.Stats:
  """Writes pygame-docs/pygame-docs-00000.jsonl.gz with {"text", "path"} per .rst.txt file, sorted by path."""
  stats = writers.Stats()
  src = docs_root()
  if src is None:
    return stats  # pygame-ce not installed: the source is simply empty, and BUILD_INFO says so.
  rows = []
  for rel_path in _rst_files(src)[:limit]:
    with open(os.path.join(src, rel_path), encoding="utf-8") as f:
      text = f.read()
    if text.strip():
      rows.append({"text": text, "path": rel_path})
  if rows:
    path = writers.shard_path(root, "pygame-docs", "pygame-docs", 0, ".jsonl.gz")
    writers.write_jsonl_gz(path, rows)
    stats.add(path, len(rows))
  return stats


SOURCE = writers.Source(
    name="pygame-ce-docs", kind="books", licence="LGPL-2.1-only", build=build,
    origin=f"reStructuredText sources of the pygame-ce {_version()} documentation (pygame/docs/generated/_sources "
           "in the pygame-ce wheel); pygame-ce is LGPL v2.1, see https://www.gnu.org/licenses/old-licenses/lgpl-2.1")
