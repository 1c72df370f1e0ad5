"""Builds the embedded default corpus once, atomically, under a lock: `codex data build-default`."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

from codex_jax.data import records
from codex_jax.data.default_corpus import clips, digits, embodied, pygame_docs, stdlib_text, synthetic, writers
from codex_jax.data.errors import DataError

CORPUS_VERSION = 1
DIR_NAME = f"default-corpus-v{CORPUS_VERSION}"
INFO_FILE = "BUILD_INFO.json"

SOURCES: tuple[writers.Source, ...] = (
    stdlib_text.CODE, stdlib_text.DOCS, pygame_docs.SOURCE, digits.SOURCE, clips.SOURCE, embodied.SOURCE,
    synthetic.SOURCE,
)
SOURCE_BY_NAME = {s.name: s for s in SOURCES}


# Sources that need the `corpus` extra (pyproject.toml): (module, package).
CORPUS_EXTRA = (("sklearn", "scikit-learn"), ("gymnasium", "gymnasium[classic-control]"))

def default_dir() -> str:
  return os.path.join(records.cache_dir(), DIR_NAME)


def build_source(name: str, root: str, limit: int | None = None) -> writers.Stats:
  """Writes one source under `root` (its own sub-folder); `limit` caps its records for quick small builds."""
  return SOURCE_BY_NAME[name].build(root, limit=limit)


def read_info(out_dir: str) -> dict | None:
  """The summary of a finished build of this corpus version in `out_dir`, else None."""
  try:
    with open(os.path.join(out_dir, INFO_FILE), encoding="utf-8") as f:
      info = json.load(f)
  except (OSError, ValueError):
    return None
  return info if isinstance(info, dict) and info.get("version") == CORPUS_VERSION else None


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
  """An exclusive lock on `path`: one build at a time across processes (pytest-xdist workers, two shells)."""
  with open(path, "a+") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _start_child(name: str, root: str) -> subprocess.Popen:
  """Builds one source in a fresh interpreter that imports only this module (no re-run of the caller's __main__)."""
  package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  path = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH", "")) if p)
  code = f"import json, sys; from {__name__} import build_source; " \
         "print(json.dumps(build_source(sys.argv[1], sys.argv[2]).as_dict()))"
  return subprocess.Popen([sys.executable, "-c", code, name, root], stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": path})


def _build_all(root: str, progress: Callable[[str], None]) -> dict[str, writers.Stats]:
  """Runs every source builder; with two cores the episode roll-outs (half the time) run alongside the rest."""
  results: dict[str, writers.Stats] = {}
  start = time.monotonic()

  def done(name: str, stats: writers.Stats) -> None:
    results[name] = stats
    progress(f"{name}: {stats.records} records in {stats.files} files, {stats.bytes / 1e6:.1f} MB "
             f"({time.monotonic() - start:.1f} s)")

  parallel = (os.cpu_count() or 1) >= 2 and embodied.SOURCE in SOURCES
  child = _start_child(embodied.SOURCE.name, root) if parallel else None
  try:
    for source in SOURCES:
      if not (parallel and source is embodied.SOURCE):
        done(source.name, source.build(root))
    if child is not None:
      out, _ = child.communicate()
      if child.returncode:
        raise RuntimeError(f"building {embodied.SOURCE.name} failed (exit status {child.returncode}); see above")
      done(embodied.SOURCE.name, writers.Stats(**json.loads(out.strip().splitlines()[-1])))
  finally:
    if child is not None and child.poll() is None:
      child.kill()
      child.wait()
  return results


def _readme(info: dict) -> str:
  lines = [
      "# codex-jax default corpus", "",
      f"Version {info['version']}, built by `codex data build-default` (codex_jax/data/default_corpus) from data that",
      "ships inside installed Python packages or that codex-jax generates; nothing is downloaded. The manifest",
      "that mixes it is experiments/data/default.yaml.", "",
      "| source | kind | licence | files | records | MB | origin |", "|---|---|---|---|---|---|---|",
  ]
  for source in SOURCES:
    s = info["sources"][source.name]
    lines.append(f"| {source.name} | {source.kind} | {s['licence']} | {s['files']} | {s['records']} | "
                 f"{s['bytes'] / 1e6:.1f} | {s['origin']} |")
  lines += [
      "", "## Licences", "",
      "- PSF-2.0: the Python Software Foundation License Agreement is copied to code/LICENSE.txt and docs/LICENSE.txt.",
      "- LGPL-2.1-only: pygame-ce's documentation, redistributed unmodified; the licence text is at",
      "  https://www.gnu.org/licenses/old-licenses/lgpl-2.1.html. A permissive-only licence policy excludes it.",
      "- CC-BY-4.0: attribution for digits-captions: E. Alpaydin and C. Kaynak, \"Optical Recognition of",
      "  Handwritten Digits\", UCI Machine Learning Repository (1998); images from scikit-learn's copy of the test",
      "  set, converted to PNG (values 0..16 scaled to 0..255); captions added by codex-jax.",
      "- MIT: Gymnasium's licence, copied to embodied/LICENSE; the trajectories themselves were generated by",
      "  codex-jax's scripted controllers.",
      "- CC0-1.0: procedural-clips and synthetic-curated were generated by codex-jax; its authors dedicate them",
      "  to the public domain (https://creativecommons.org/publicdomain/zero/1.0/).", "",
  ]
  return "\n".join(lines)


def _replace_dir(tmp: str, out_dir: str) -> None:
  """Moves the finished build into place; an older corpus there is moved aside first, then deleted."""
  old = None
  if os.path.exists(out_dir):
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir))
    os.replace(out_dir, os.path.join(old, "corpus"))
  os.replace(tmp, out_dir)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def build_default_corpus(out_dir: str | None = None, *, force: bool = False,
                         progress: Callable[[str], None] | None = None) -> dict:
  """Builds the default corpus into `out_dir` (default: <cache dir>/default-corpus-v1) and returns BUILD_INFO.

  A finished build of the same version is returned as is unless `force`. The corpus is written to a temporary
  sibling folder and moved into place at the end, so a killed build never leaves half a corpus behind.
  """
  out_dir = os.path.abspath(out_dir or default_dir())
  progress = progress or (lambda _: None)
  info = read_info(out_dir)
  if info is not None and not force:
    return info
  missing = [name for module, name in CORPUS_EXTRA if importlib.util.find_spec(module) is None]
  if missing:
    raise DataError(f"the default corpus draws on {', '.join(missing)}, not installed: pip install -e '.[corpus]' "
                    "(`make train` does)")
  parent, base = os.path.dirname(out_dir), os.path.basename(out_dir)
  os.makedirs(parent, exist_ok=True)
  with _locked(f"{out_dir}.lock"):
    info = read_info(out_dir)
    if info is not None and not force:
      return info  # Another process built it while this one waited for the lock.
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, INFO_FILE)):
      # A rebuild replaces the folder wholesale: never do that to a folder that is not a corpus.
      raise DataError(f"{out_dir} exists and is not a default corpus (no {INFO_FILE}); choose another folder")
    for stale in glob.glob(os.path.join(parent, f".{base}.tmp-*")) + glob.glob(os.path.join(parent, f".{base}.old-*")):
      shutil.rmtree(stale, ignore_errors=True)  # Left by a killed build; the lock says none is running.
    start = time.monotonic()
    progress(f"building the default corpus v{CORPUS_VERSION} ({len(SOURCES)} sources) into {out_dir}")
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
      stats = _build_all(tmp, progress)
      info = {
          "version": CORPUS_VERSION,
          "sources": {s.name: {**stats[s.name].as_dict(), "licence": s.licence, "origin": s.origin} for s in SOURCES},
      }
      with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
        f.write(_readme(info))
      info["seconds"] = round(time.monotonic() - start, 1)
      writers.write_json(os.path.join(tmp, INFO_FILE), info)
      os.chmod(tmp, 0o755)  # mkdtemp makes it private; the corpus is shared data.
      _replace_dir(tmp, out_dir)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
  progress(f"default corpus v{CORPUS_VERSION} built in {info['seconds']:.1f} s at {out_dir}")
  return info

