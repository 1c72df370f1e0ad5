"""A hand-made packed multimodal batch (image+caption, clip, embodied window, text) for test_objectives.py."""

from __future__ import annotations

import numpy as np

from codex_jax.config.schema import MODALITIES, MODALITY_IDS

TEXT, IMAGE, VIDEO, AUDIO, PROPRIO, ACTION = (MODALITY_IDS[m] for m in MODALITIES)


def segments(P: int) -> list[list[list[int]]]:
  """Rows of segments, each a list of modality ids; P positions per image / chunk."""
  image_caption = [IMAGE] * P + [TEXT] * 5
  clip = [VIDEO] * (2 * P) + [AUDIO] * 2 + [TEXT] * 4
  embodied = [TEXT] * 3 + ([VIDEO] * P + [PROPRIO, ACTION]) * 3
  return [[image_caption, image_caption, [TEXT] * 6], [clip, image_caption], [embodied], [[TEXT] * 12]]


def make_batch(rows: int, L: int, F: int, P: int, vocab: int, seed: int = 0,
               layout: list[list[list[int]]] | None = None) -> dict[str, np.ndarray]:
  """`rows` rows cycling through `layout` (default: segments(P)); text targets are the next token."""
  rng = np.random.default_rng(seed)
  layout = layout or segments(P)
  out = {k: np.zeros((rows, L), np.int32) for k in ("inputs", "targets", "segment_ids", "positions", "modality_ids")}
  out["loss_mask"] = np.zeros((rows, L), np.float32)
  out["features"] = np.zeros((rows, L, F), np.float32)
  for r in range(rows):
    start = 0
    for s, mods in enumerate(layout[r % len(layout)], start=1):
      n = len(mods)
      sl = slice(start, start + n)
      mods = np.asarray(mods)
      out["modality_ids"][r, sl] = mods
      out["segment_ids"][r, sl] = s
      out["positions"][r, sl] = np.arange(n)
      tokens = np.where(mods == TEXT, rng.integers(3, vocab, n), 0)
      out["inputs"][r, sl] = tokens
      nxt = np.append(mods[1:] == TEXT, False)
      out["targets"][r, sl] = np.where(nxt, np.append(tokens[1:], 0), 0)
      out["loss_mask"][r, sl] = nxt
      out["features"][r, sl] = np.where((mods != TEXT)[:, None], rng.uniform(-1, 1, (n, F)), 0.0)
      start += n
  return out
