"""Embodied demonstrations, one directory per episode (in the spirit of LeRobot / RLDS), cut into windows.

Layout:
  location   a root directory (or a glob of them); its episodes are its immediate subdirectories named
             episode_* (sorted). A location that is itself an episode_* directory without episode_*
             subdirectories is one episode.
  episode    meta.json    {"task": str, the instruction (becomes "text"), "env": str, "fps": number > 0,
                           "num_steps": int >= 1, optional "success": bool, optional "seed": int}
             frames.npy   uint8 [T, H, W, C], C in {1, 3}: the rendered observations
             proprio.npy  float32 [T, P]: proprioception
             actions.npy  float32 [T, A]: actions (a discrete action is stored as a float column)
             with T == num_steps in all three.
  records    windows of `window_steps` steps (option, default 8) starting at 0, window_steps, ...; the
             last, shorter window is kept when it has at least 2 steps. Each is {"text": task,
             "video": frames[s:e], "proprio": proprio[s:e], "actions": actions[s:e]}; arrays are
             memory-mapped, so a window reads only its own steps.
  names      "<episode dir name> window <start>".
  locator    [start, end]. A structurally broken episode (missing file, bad JSON, wrong dtype, ndim or
             length) scans as the single locator [0, 0] named "<episode> window 0", whose read raises
             why, so that the whole episode is reported malformed.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from codex_jax.data.errors import DataError
from codex_jax.data.formats.base import Format, Locator, expand_location
from codex_jax.data.records import MalformedRecord, Record, check_record

PREFIX = "episode_"
# file -> (dtype, ndim, shape description) each array must have.
ARRAYS: dict[str, tuple[np.dtype, int, str]] = {
    "frames": (np.dtype(np.uint8), 4, "uint8 [T, H, W, C]"),
    "proprio": (np.dtype(np.float32), 2, "float32 [T, P]"),
    "actions": (np.dtype(np.float32), 2, "float32 [T, A]"),
}
_KEY = {"frames": "video", "proprio": "proprio", "actions": "actions"}  # file -> record field.


class EpisodesFormat(Format):
  name = "episodes"
  suffixes = ()
  defaults = {"window_steps": 8}

  def check_options(self, options: dict) -> None:
    super().check_options(options)
    if options["window_steps"] < 1:
      raise DataError(f"Option 'window_steps' of format 'episodes' must be >= 1, got {options['window_steps']}.")

  def files(self, location: str) -> list[str]:
    """The episode directories at `location`, sorted."""
    found: set[str] = set()
    for path in expand_location(location):
      if not os.path.isdir(path):
        continue
      children = [e.path for e in os.scandir(path) if e.name.startswith(PREFIX) and e.is_dir()]
      if children:
        found.update(children)
      elif os.path.basename(path).startswith(PREFIX):
        found.add(path)
    if not found:
      raise DataError(f"No episodes at {location!r}: expected a directory holding {PREFIX}* directories "
                      f"(each with meta.json, frames.npy, proprio.npy, actions.npy).")
    return sorted(os.path.abspath(p) for p in found)

  def scan(self, path: str, options: dict) -> list[tuple[str, Locator]]:
    if not os.path.isdir(path):
      raise DataError(f"Episode directory {path} does not exist.")
    episode, loaded = os.path.basename(path), _load(path)
    self.cache("episodes").put(path, loaded)  # Refreshed: the episode may have changed since it was loaded.
    if isinstance(loaded, str):
      return [(f"{episode} window 0", [0, 0])]
    steps, size = loaded[0]["num_steps"], self.option(options, "window_steps")
    windows = [(s, min(s + size, steps)) for s in range(0, steps, size)]
    return [(f"{episode} window {s}", [s, e]) for s, e in windows if e - s == size or e - s >= 2]

  def read(self, path: str, locator: Locator, options: dict) -> Record:
    start, end = locator
    where = f"{os.path.basename(path)} window {start}"
    loaded = self.cache("episodes").get(path, _load)
    if isinstance(loaded, str):
      raise MalformedRecord(path, where, loaded)
    meta, arrays = loaded
    if not 0 <= start < end <= meta["num_steps"]:
      raise MalformedRecord(path, where, f"steps [{start}, {end}) are outside the episode's {meta['num_steps']} "
                                         "steps (was it changed after indexing?)")
    record = {"text": meta["task"], **{_KEY[n]: np.array(a[start:end]) for n, a in arrays.items()}}
    return check_record(record, path, where)


def _load(path: str) -> tuple[dict, dict[str, np.ndarray]] | str:
  """(meta, memory-mapped arrays) of an episode, or why it is broken."""
  try:
    with open(os.path.join(path, "meta.json"), "rb") as f:
      meta = json.load(f)
  except FileNotFoundError:
    return "missing meta.json"
  except (OSError, ValueError) as e:
    return f"meta.json is not valid JSON: {e}"
  problem = _check_meta(meta)
  if problem:
    return f"meta.json: {problem}"
  arrays = {}
  for name, (dtype, ndim, shape) in ARRAYS.items():
    file = f"{name}.npy"
    try:
      array = np.load(os.path.join(path, file), mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
      return f"missing {file}"
    except (OSError, ValueError, EOFError) as e:
      return f"cannot load {file}: {e}"
    if array.dtype != dtype or array.ndim != ndim:
      return f"{file} is {array.dtype}{list(array.shape)}; expected {shape}"
    if len(array) != meta["num_steps"]:
      return f"{file} has {len(array)} steps but meta.json says num_steps={meta['num_steps']}"
    arrays[name] = array
  return meta, arrays


def _check_meta(meta: Any) -> str | None:
  if not isinstance(meta, dict):
    return f"expected a JSON object, got {type(meta).__name__}"
  number = (int, float)
  rules = [("task", str, True), ("env", str, True), ("fps", number, True), ("num_steps", int, True),
           ("success", bool, False), ("seed", int, False)]
  for key, kind, required in rules:
    if key not in meta:
      if required:
        return f"missing {key!r}"
      continue
    value = meta[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
      return f"{key!r} is {value!r}; expected {'a number' if kind is number else kind.__name__}"
  if not meta["task"].strip():
    return "'task' is empty"
  if meta["fps"] <= 0 or meta["num_steps"] < 1:
    return f"'fps' ({meta['fps']}) must be > 0 and 'num_steps' ({meta['num_steps']}) >= 1"
  return None
