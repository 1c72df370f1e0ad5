"""What a format reader yields: one record, a dict of modality arrays, and the error for a bad one.

A record holds one or more of these keys (all others are refused by `check_record`):

  text         str                          text, code, a caption or an instruction
  tokens       int32 [N]                    ids already tokenized (preprocessed sequences)
  image        uint8 [H, W, C], C in {1, 3} one picture
  video        uint8 [T, H, W, C]           frames of a clip or of an embodied episode
  audio        float32 [S] in [-1, 1]       mono waveform, with
  sample_rate  int                          its rate in Hz (required with audio)
  proprio      float32 [T, P]               proprioception per step (embodied)
  actions      float32 [T, A]               actions per step (embodied), aligned with proprio

Readers decode files into records; `data/encode.py` turns records into model positions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from codex_jax.cache import cache_dir  # noqa: F401  (re-exported: readers import it from here)
from codex_jax.config.schema import MODALITIES, MODALITY_IDS, PAD_MODALITY  # noqa: F401  (re-exported)
from codex_jax.data.errors import DataError

Record = dict[str, Any]

_ARRAY_RULES: dict[str, tuple[int, tuple[str, ...]]] = {  # key -> (ndim, allowed dtype kinds)
    "tokens": (1, ("i", "u")),
    "image": (3, ("u",)),
    "video": (4, ("u",)),
    "audio": (1, ("f",)),
    "proprio": (2, ("f",)),
    "actions": (2, ("f",)),
}
RECORD_KEYS = frozenset({"text", "sample_rate", *_ARRAY_RULES})


class MalformedRecord(DataError):
  """One record that cannot be read; names the file, the record and why."""

  def __init__(self, path: str, record: int | str, reason: str):
    self.path, self.record, self.reason = path, record, reason
    super().__init__(f"{path}:{record}: {reason}")


def check_record(record: Record, path: str, where: int | str) -> Record:
  """Returns `record` when it follows the contract above, else raises MalformedRecord."""
  if not isinstance(record, dict) or not record:
    raise MalformedRecord(path, where, "empty record")
  unknown = sorted(set(record) - RECORD_KEYS)
  if unknown:
    raise MalformedRecord(path, where, f"unknown field(s) {unknown}; expected some of {sorted(RECORD_KEYS)}")
  if "text" in record and (not isinstance(record["text"], str) or not record["text"].strip()):
    raise MalformedRecord(path, where, "field 'text' must be a non-empty string")
  for key, (ndim, kinds) in _ARRAY_RULES.items():
    if key not in record:
      continue
    array = record[key]
    if not isinstance(array, np.ndarray) or array.ndim != ndim or array.dtype.kind not in kinds or not array.size:
      got = f"{array.dtype}{list(array.shape)}" if isinstance(array, np.ndarray) else type(array).__name__
      raise MalformedRecord(path, where, f"field {key!r} is {got}; expected a non-empty {ndim}-d array of kind "
                                         f"{'/'.join(kinds)}")
  if "image" in record and record["image"].shape[-1] not in (1, 3):
    raise MalformedRecord(path, where, f"image has {record['image'].shape[-1]} channels; expected 1 or 3")
  if "video" in record and record["video"].shape[-1] not in (1, 3):
    raise MalformedRecord(path, where, f"video has {record['video'].shape[-1]} channels; expected 1 or 3")
  if "audio" in record and not isinstance(record.get("sample_rate"), int | np.integer):
    raise MalformedRecord(path, where, "audio needs an integer 'sample_rate'")
  if "proprio" in record and "actions" in record and len(record["proprio"]) != len(record["actions"]):
    raise MalformedRecord(path, where, f"proprio has {len(record['proprio'])} steps but actions has "
                                       f"{len(record['actions'])}")
  for key in ("image", "video", "audio", "proprio", "actions"):
    if key in record and record[key].dtype.kind == "f" and not np.all(np.isfinite(record[key])):
      raise MalformedRecord(path, where, f"field {key!r} holds NaN or infinite values")
  return record
