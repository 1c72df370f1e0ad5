"""Every file of a committed step, hashed inside its commit: WORKDIR/checkpoints/<step>/files.json.

`HashedCommit` is the commit Orbax runs for each step (its temporary-path class), with files.json written just
before the rename that makes the step visible, so no committed step lacks it (a `kill -9` right after a commit
included); `check_files` names the first changed, missing or extra file and its tensor.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from orbax.checkpoint._src.metadata import checkpoint as checkpoint_metadata
from orbax.checkpoint._src.path import async_path, atomicity

from codex_jax import atomic
from codex_jax.checkpoint.errors import CheckpointIntegrityError
from codex_jax.hashing import sha256_file

FILES_FILE = "files.json"  # In each step directory: every other file's sha256, written inside the commit.


class HashedCommit(atomicity.AtomicRenameTemporaryPath):
  """Orbax's commit of a step (0.12's AtomicRenameTemporaryPath.finalize: the step metadata's commit time, the
  commit marker, the rename), with files.json written just before the rename: the sha256 of every other file
  of the step, so no committed step lacks them. Runs on process 0 once every process has written."""

  async def finalize(self):
    if not self.get_final().name.isdigit():  # An item (state/, data/, meta/), committed inside its step.
      return await super().finalize()
    store, tmp = self._checkpoint_metadata_store, self.get()
    if store:
      await asyncio.to_thread(store.wait_until_finished)
      await asyncio.to_thread(store.update, file_path=checkpoint_metadata.step_metadata_file_path(tmp),
                              commit_timestamp_nsecs=time.time_ns())
      await asyncio.to_thread(store.wait_until_finished)
    await async_path.write_text(tmp / atomicity.COMMIT_SUCCESS_FILE,
                                f"Checkpoint commit was successful to {self.get_final()}")
    await asyncio.to_thread(write_files, str(tmp))
    await async_path.rename(tmp, self.get_final())


def write_files(step_dir: str) -> None:
  atomic.write_json(os.path.join(step_dir, FILES_FILE), {"version": 1, "files": file_hashes(step_dir)})


def file_hashes(step_dir: str) -> dict[str, str]:
  """sha256 of every file of a step but files.json, by path relative to the step directory."""
  paths = (os.path.join(folder, name) for folder, _, names in os.walk(step_dir) for name in names)
  return dict(sorted((rel, sha256_file(os.path.join(step_dir, rel))) for rel in
                     (os.path.relpath(path, step_dir) for path in paths) if rel != FILES_FILE))


def check_files(step_dir: str) -> None:
  """Every file as files.json lists it: names the first changed, missing or extra file and its tensor."""
  path = os.path.join(step_dir, FILES_FILE)
  try:
    with open(path) as f:
      recorded = json.load(f)["files"]
  except FileNotFoundError:
    raise CheckpointIntegrityError(f"{path} is missing: every committed step lists its files' hashes there (steps "
                                   "written by codex-jax before Dec 2026 kept them in lineage.jsonl instead)") from None
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointIntegrityError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
  actual = file_hashes(step_dir)
  for rel in sorted(set(recorded) | set(actual)):
    if recorded.get(rel) != actual.get(rel):
      what = "is missing" if rel not in actual else "was added" if rel not in recorded else (
          f"changed: expected sha256 {recorded[rel]}, got {actual[rel]}")
      parts = rel.split(os.sep)
      tensor = f" (tensor {parts[1].replace('.', '/')})" if parts[0] == "state" and len(parts) > 2 else ""
      raise CheckpointIntegrityError(f"{os.path.join(step_dir, rel)}{tensor} {what}")
