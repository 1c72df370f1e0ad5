"""Walks the running interpreter's standard library: its modules as code and as docstrings (PSF-2.0)."""

from __future__ import annotations

import ast
import dataclasses
import os
import sysconfig
import warnings
from collections.abc import Iterator

CODE = "python-stdlib-code"
DOCSTRINGS = "python-stdlib-docstrings"
LICENCE = "PSF-2.0"

# Folder names skipped anywhere under the stdlib: third-party packages, test suites (which also
# holds lib2to3's deliberately broken test data) and the IDLE application.
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})


@dataclasses.dataclass(frozen=True)
class Document:
  id: str  # "<source>:<relative path>", e.g. "python-stdlib-code:json/decoder.py".
  source: str
  licence: str
  text: str


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def relative_paths(root: str) -> list[str]:
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
    rel_dir = os.path.relpath(dirpath, root)
    for name in filenames:
      if name.endswith(".py"):
        paths.append(name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/"))
  return sorted(paths)


def _module_name(rel_path: str) -> str:
  parts = rel_path[:-len(".py")].split("/")
  if parts[-1] == "__init__" and len(parts) > 1:
    parts = parts[:-1]
  return ".".join(parts)


def _docstrings(tree: ast.Module, module: str) -> str:
  """Joins every docstring in a module under its qualified name, in source order."""
  sections = []

  def visit(node: ast.AST, qualname: str) -> None:
    doc = ast.get_docstring(node, clean=True)
    if doc:
      sections.append(f"# {qualname}\n\n{doc}\n")
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        visit(child, f"{qualname}.{child.name}")

  visit(tree, module)
  return "\n".join(sections)


def module_documents(root: str, rel_path: str) -> Iterator[Document]:
  try:
    with open(os.path.join(root, rel_path), "rb") as f:
      text = f.read().decode("utf-8")
  except (OSError, UnicodeDecodeError):
    return  # Not readable as UTF-8 text: not part of the corpus.
  if not text.strip():
    return
  yield Document(f"{CODE}:{rel_path}", CODE, LICENCE, text)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # Invalid escapes in old modules warn; the text is fine.
      tree = ast.parse(text, filename=rel_path)
  except (SyntaxError, ValueError):
    return
  docs = _docstrings(tree, _module_name(rel_path))
  if docs:
    yield Document(f"{DOCSTRINGS}:{rel_path}", DOCSTRINGS, LICENCE, docs)


def embedded_documents(max_bytes: int = 0) -> list[Document]:
  """All documents (0) or the first ones holding at least `max_bytes` of UTF-8 text.

  Modules are visited in sorted path order and each contributes its code then its docstrings, so
  both sources survive a byte cap in proportion. The cap is checked after each module.
  """
  root = stdlib_root()
  docs: list[Document] = []
  total = 0
  for rel_path in relative_paths(root):
    for doc in module_documents(root, rel_path):
      docs.append(doc)
      total += len(doc.text.encode("utf-8"))
    if max_bytes and total >= max_bytes:
      break
  return docs
