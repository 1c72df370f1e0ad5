"""Task files: one JSON object per line, scored by log-likelihood (docs/evaluation.md has the schema).

  multiple choice: {"context": str, "choices": [str, ...], "gold": int, "id"?: str, "image"?: str}
  cloze:           {"context": str, "continuation": str, "id"?: str, "image"?: str}

A file is one task, named by its file name without `.jsonl`; all its lines are of one kind. "image" is
a picture file (PNG, JPEG) relative to the task file: its patches come before the context, as a caption
follows its picture in training. Every problem is reported as `file:line: field: what was expected`.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

KINDS = ("mc", "cloze")
_FIELDS = {"mc": {"context", "choices", "gold"}, "cloze": {"context", "continuation"}}
_OPTIONAL = {"id", "image", "domain"}


class TaskError(ValueError):
  """A task file that does not follow the schema; the message names file, line and field."""


@dataclasses.dataclass(frozen=True)
class Example:
  context: str
  choices: tuple[str, ...]   # Cloze: the one continuation.
  gold: int                  # Cloze: 0.
  id: str = ""
  image: np.ndarray | None = None  # uint8 [H, W, C] when the example is conditioned on a picture.


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  kind: str  # "mc" | "cloze"
  path: str
  examples: tuple[Example, ...]


def _kind_of(obj: dict, where: str) -> str:
  if "choices" in obj or "gold" in obj:
    kind = "mc"
  elif "continuation" in obj:
    kind = "cloze"
  else:
    raise TaskError(f"{where}: expected a multiple-choice line (context, choices, gold) or a cloze line "
                    f"(context, continuation); got keys {sorted(obj)}")
  unknown = sorted(set(obj) - _FIELDS[kind] - _OPTIONAL)
  missing = sorted(_FIELDS[kind] - set(obj))
  if unknown or missing:
    raise TaskError(f"{where}: a {kind} line has keys {sorted(_FIELDS[kind])} and optionally "
                    f"{sorted(_OPTIONAL)}; missing {missing}, unknown {unknown}")
  return kind


def _string(obj: dict, key: str, where: str, allow_empty: bool = False) -> str:
  value = obj[key]
  if not isinstance(value, str) or (not value and not allow_empty):
    raise TaskError(f"{where}: {key}: expected a non-empty string, got {value!r}")
  return value


def _image(path: str, where: str) -> np.ndarray:
  from PIL import Image

  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB"), np.uint8)
  except OSError as e:
    raise TaskError(f"{where}: image: cannot read {path!r} ({e})") from e


def parse_line(obj, where: str, folder: str) -> tuple[str, Example]:
  if not isinstance(obj, dict):
    raise TaskError(f"{where}: expected a JSON object, got {type(obj).__name__}")
  kind = _kind_of(obj, where)
  context = _string(obj, "context", where)
  if kind == "mc":
    choices = obj["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
      raise TaskError(f"{where}: choices: expected a list of at least 2 non-empty strings, got {choices!r}")
    gold = obj["gold"]
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
      raise TaskError(f"{where}: gold: expected an index into the {len(choices)} choices (0..{len(choices) - 1}), "
                      f"got {gold!r}")
    choices = tuple(choices)
  else:
    choices, gold = (_string(obj, "continuation", where),), 0
  image = None
  if "image" in obj:
    image = _image(os.path.join(folder, _string(obj, "image", where)), where)
  ident = obj.get("id", "")
  if not isinstance(ident, str):
    raise TaskError(f"{where}: id: expected a string, got {ident!r}")
  return kind, Example(context, choices, gold, ident, image)


def load_task(path: str, limit: int | None = None) -> Task:
  """One task file; the first `limit` examples (all when None)."""
  name = os.path.basename(path).removesuffix(".jsonl")
  folder = os.path.dirname(os.path.abspath(path))
  kinds, examples = set(), []
  try:
    f = open(path, encoding="utf-8")
  except OSError as e:
    raise TaskError(f"{path}: cannot read the task file ({e})") from e
  with f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      if limit is not None and len(examples) >= limit:
        break
      where = f"{path}:{number}"
      try:
        obj = json.loads(line)
      except ValueError as e:
        raise TaskError(f"{where}: not JSON ({e})") from e
      kind, example = parse_line(obj, where, folder)
      kinds.add(kind)
      if len(kinds) > 1:
        raise TaskError(f"{where}: a task file holds one kind of line; this one is {kind}, earlier ones "
                        f"{(kinds - {kind}).pop()}")
      examples.append(example)
  if not examples:
    raise TaskError(f"{path}: no examples (expected one JSON object per line)")
  return Task(name, kinds.pop(), path, tuple(examples))


def task_files(folder: str) -> list[str]:
  if not os.path.isdir(folder):
    raise TaskError(f"{folder}: no such task folder (expected *.jsonl task files)")
  return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".jsonl"))


def load_tasks(folders: list[str], limit: int | None = None) -> list[Task]:
  """Every `*.jsonl` of the folders, in name order; a name used twice is refused."""
  tasks: dict[str, Task] = {}
  for folder in folders:
    for path in task_files(folder):
      task = load_task(path, limit)
      if task.name in tasks:
        raise TaskError(f"{path}: task name {task.name!r} is also {tasks[task.name].path}; rename one")
      tasks[task.name] = task
  return list(tasks.values())
