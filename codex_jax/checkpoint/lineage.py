"""Lineage records: what each checkpoint is, hashed into a chain back to where the run started.

  record = {"version": 2, "step", "content_root", "optimizer_root", "extra_root", "iterator_hash",
            "manifest_hash", "config_hash", "code_version": {"package", "git"}, "eval": {...},
            "parent": parent lineage hash}
  lineage_hash = sha256(b"codex.lineage.v1\\n" + parent + b"\\n" + canonical JSON of the record
                        without "lineage_hash")
  The first record's parent is the hash of the start: sha256(b"codex.start.v1\\n" + canonical JSON of
  {"kind": "init", "seed", "content_root"}) for a fresh run, or the lineage hash of the checkpoint
  the run was initialised from. An averaged checkpoint's record (kind "average", checkpoint/average.py) also
  lists `parents`, the lineage hashes of every checkpoint averaged; its `parent` is the newest of them, and
  the chain's links skip it (a side branch).

Canonical JSON: sorted keys, no whitespace, UTF-8, floats as Python's repr. Records live in each
checkpoint's Orbax metadata and in WORKDIR/lineage.jsonl (every record, so the chain survives
retention deleting old checkpoints).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import shutil
import subprocess
from typing import Any

import codex_jax
from codex_jax.atomic import write_bytes, write_text
from codex_jax.checkpoint.errors import CheckpointIntegrityError
from codex_jax.hashing import canonical_json

LOG_FILE = "lineage.jsonl"
# The fields of a start, by kind, exactly: a fresh init, an imported model (interop/importer.py), or a run
# initialised from another checkpoint (its lineage hash alone).
START_FIELDS = {"init": {"kind", "seed", "content_root"},
                "import": {"kind", "source", "format", "files", "content_root"},
                None: {"lineage_hash"}}
# 3: roots commit to their leaf count (merkle.py, root v2); 2: tensor leaves hashed over 1 MiB blocks (leaf v2);
# 1 hashed whole tensors (leaf v1).
RECORD_VERSION = 3
_RECORD_TAG = b"codex.lineage.v1\n"
_START_TAG = b"codex.start.v1\n"


canonical = canonical_json


def start_hash(start: dict[str, Any]) -> str:
  return hashlib.sha256(_START_TAG + canonical(start)).hexdigest()


def record_hash(record: dict[str, Any]) -> str:
  body = {k: v for k, v in record.items() if k != "lineage_hash"}
  return hashlib.sha256(_RECORD_TAG + record["parent"].encode() + b"\n" + canonical(body)).hexdigest()


def seal(record: dict[str, Any]) -> dict[str, Any]:
  return {**record, "lineage_hash": record_hash(record)}


@functools.cache
def code_version() -> dict[str, str | None]:
  """The package version, and the git commit when the package runs from a git checkout."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(codex_jax.__file__)))
  try:
    commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                            timeout=5, check=True).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    commit = None
  return {"package": getattr(codex_jax, "__version__", "unknown"), "git": commit}


def read_log(workdir: str) -> list[dict[str, Any]]:
  """WORKDIR/lineage.jsonl's records; a line that is not a JSON record is refused naming file and line."""
  path = os.path.join(workdir, LOG_FILE)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8", errors="replace") as f:
    text = f.read()
  lines, records = text.split("\n"), []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      torn = number == len(lines)  # No newline after it: an append a crash cut short.
      raise CheckpointIntegrityError(
          f"{path}:{number}: not a JSON record ({e.msg})" + (
              "; it is the last line and has no newline, as a crash in the middle of an append leaves it: "
              "resuming the run sets it aside and continues" if torn else "")) from None
    if not isinstance(record, dict):
      raise CheckpointIntegrityError(f"{path}:{number}: a JSON {type(record).__name__}, not a record (an object)")
    if "files_of" not in record:  # Older logs listed each step's file hashes; files.json in the step does now.
      records.append(record)
  return records


def set_aside_torn_line(workdir: str) -> str | None:
  """A last line torn by a crash mid-append (no newline, not JSON) is dropped from lineage.jsonl, the whole file
  first copied to lineage.jsonl.torn; a whole last record that only lacks its newline gets it. Returns the copy's
  path when a line was dropped. Any other damage is left for read_log to name."""
  path = os.path.join(workdir, LOG_FILE)
  if not os.path.exists(path):
    return None
  with open(path, "rb") as f:
    data = f.read()
  if not data or data.endswith(b"\n"):
    return None
  head, newline, tail = data.rpartition(b"\n")
  try:
    json.loads(tail)
    kept, copy = data + b"\n", None
  except ValueError:
    kept, copy = head + newline, path + ".torn"
    shutil.copyfile(path, copy)
  write_bytes(path, kept)
  return copy


def append_log(workdir: str, record: dict[str, Any]) -> None:
  with open(os.path.join(workdir, LOG_FILE), "a", encoding="utf-8") as f:
    f.write(json.dumps(record, sort_keys=True) + "\n")
    f.flush()
    os.fsync(f.fileno())


def truncate_log(workdir: str, last_step: int | None) -> None:
  """Drops records past the checkpoint a run resumes from (saves that never committed)."""
  records = read_log(workdir)
  keep = [r for r in records if last_step is not None and r.get("step", -1) <= last_step]
  if last_step is not None and not any(r.get("step") == last_step for r in keep if "start" not in r):
    keep = [r for r in keep if "start" in r]  # No record of the restored step: only the start is still valid.
  _rewrite_log(workdir, records, keep)


def drop_records(workdir: str, lineage_hashes: set[str]) -> None:
  """Drops the records of saves whose write failed (they never committed)."""
  records = read_log(workdir)
  _rewrite_log(workdir, records, [r for r in records if r.get("lineage_hash") not in lineage_hashes])


def _rewrite_log(workdir: str, records: list[dict[str, Any]], keep: list[dict[str, Any]]) -> None:
  if len(keep) != len(records):
    write_text(os.path.join(workdir, LOG_FILE), "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))


def check_start(line: dict[str, Any], where: str) -> None:
  """The start line is {"start", "hash"}; the start has exactly its kind's fields (START_FIELDS) and
  hashes to `hash`, or, for a run initialised from another checkpoint, is that checkpoint's lineage hash."""
  start = line.get("start")
  if set(line) != {"start", "hash"} or not isinstance(start, dict):
    raise CheckpointIntegrityError(f"{where}: the start line has fields {sorted(line)}; expected exactly "
                                   "['hash', 'start']")
  kind = start.get("kind")
  expected = START_FIELDS.get(kind)
  if expected is None or set(start) != expected:
    raise CheckpointIntegrityError(f"{where}: the start has fields {sorted(start)}; a start of kind {kind!r} has "
                                   f"exactly {sorted(expected or START_FIELDS['init'])}")
  want = start["lineage_hash"] if kind is None else start_hash(start)
  if want != line["hash"]:
    raise CheckpointIntegrityError(f"{where}: the start record was edited (it hashes to {want}, it says {line['hash']})")


def verify_chain(records: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
  """Checks every record's own hash and its link to the one before; returns the step records."""
  if not records or "start" not in records[0]:
    raise CheckpointIntegrityError(f"{where}: the lineage log does not begin with the run's start")
  start = records[0]
  check_start(start, where)
  parent, steps, seen = start["hash"], [], set()
  for record in records[1:]:
    step = record.get("step")
    if record_hash(record) != record.get("lineage_hash"):
      raise CheckpointIntegrityError(f"{where}: the record of step {step} was edited (it hashes to "
                                     f"{record_hash(record)}, it says {record.get('lineage_hash')})")
    if "parents" in record:  # An average: a side branch off the chain whose parents must all be in it.
      missing = [p for p in record["parents"] if p not in seen]
      if missing or record["parent"] not in record["parents"]:
        raise CheckpointIntegrityError(f"{where}: the average at step {step} names parent(s) {missing or record['parent']} "
                                       "that are not checkpoints of the chain before it")
      steps.append(record)
      continue
    if record["parent"] != parent:
      raise CheckpointIntegrityError(f"{where}: step {step} links to parent {record['parent']}, but the record before "
                                     f"it is {parent} (a record was removed, swapped or rewritten)")
    parent = record["lineage_hash"]
    seen.add(parent)
    steps.append(record)
  return steps


def verify_links(records: list[dict[str, Any]], where: str) -> None:
  """The retained checkpoints' own records, oldest first: each links to the one saved before it (retention only
  ever removes the oldest), so a checkpoint swapped in from another run or removed from the middle is named."""
  for before, record in itertools.pairwise(records):
    if record["parent"] != before["lineage_hash"]:
      raise CheckpointIntegrityError(
          f"{where}: step {record['step']}'s record links to parent {record['parent']}, but the checkpoint before it "
          f"(step {before['step']}) is {before['lineage_hash']}: a checkpoint was swapped in or removed")
