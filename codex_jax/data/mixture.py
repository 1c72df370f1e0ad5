"""A Grain mixture that gives each source its share of *effective* tokens, deterministically.

Each next example comes from the source furthest behind its target: the one with the smallest
effective_tokens_so_far / share (ties to the lower index). Effective tokens are positions weighted by
their modality's exchange rate, so a source of image patches at rate 0.45 needs ~2.2x the positions
of a text source for the same share. Sources hand over packed rows of seq_len positions, so the
realised share of every source stays within one row of its target at any point, with no
randomness to average out (grain's MixDataset mixes by sample
counts with weights, which neither counts tokens nor bounds the error).

State: every source stream's state plus the effective and raw tokens taken from each so far. A
finite source (an eval split) that runs out leaves the mixture; the mixture ends when all have.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from codex_jax.data.encode import effective_tokens

MIXTURE_STATE_KEY = "codex_mixture"  # Marks the mixture's state inside the pipeline's nested state.


class EffectiveTokenMix(grain.IterDataset):

  def __init__(self, sources: Sequence[grain.IterDataset], shares: Sequence[float],
               rates_by_id: Sequence[np.ndarray]):
    """sources[i] yields examples; shares[i] >= 0 is its target share; rates_by_id[i][modality id] its rates."""
    super().__init__(list(sources))
    if len(sources) != len(shares) or len(sources) != len(rates_by_id):
      raise ValueError("one share and one rate table per source")
    self._shares = np.asarray(shares, np.float64)
    self._rates = [np.asarray(r, np.float64) for r in rates_by_id]
    self.live_iterator: _MixIterator | None = None  # The last iterator made: its position is the live one.

  def __iter__(self) -> grain.DatasetIterator:
    self.live_iterator = _MixIterator([iter(p) for p in self._parents], self._shares, self._rates)
    return self.live_iterator


class _MixIterator(grain.DatasetIterator):

  def __init__(self, sources: list[grain.DatasetIterator], shares: np.ndarray, rates: list[np.ndarray]):
    super().__init__()
    self._sources, self._shares, self._rates = sources, shares, rates
    self._effective = np.zeros(len(sources))
    self._raw = np.zeros(len(sources), np.int64)
    self._done = shares <= 0  # A zero share is never drawn.

  def _pick(self) -> int:
    with np.errstate(divide="ignore", invalid="ignore"):
      progress = np.where(self._done, np.inf, self._effective / self._shares)
    return int(np.argmin(progress))

  def __next__(self) -> dict[str, np.ndarray]:
    while not self._done.all():
      i = self._pick()
      try:
        example = next(self._sources[i])
      except StopIteration:
        self._done[i] = True
        continue
      self._effective[i] += effective_tokens(example, self._rates[i])
      self._raw[i] += len(example["modality_ids"])
      return example
    raise StopIteration

  def realised_shares(self) -> np.ndarray:
    total = self._effective.sum()
    return self._effective / total if total else np.zeros_like(self._effective)

  def get_state(self) -> dict:
    return {MIXTURE_STATE_KEY: True, "effective": self._effective.tolist(), "raw": self._raw.tolist(),
            "done": self._done.tolist(), "sources": [s.get_state() for s in self._sources]}

  def set_state(self, state: dict) -> None:
    if len(state["sources"]) != len(self._sources):
      raise ValueError(f"the saved mixture has {len(state['sources'])} sources, this one {len(self._sources)}")
    self._effective = np.asarray(state["effective"], np.float64)
    self._raw = np.asarray(state["raw"], np.int64)
    self._done = np.asarray(state["done"], bool)
    for source, source_state in zip(self._sources, state["sources"], strict=True):
      source.set_state(source_state)

  def close(self) -> None:
    for source in self._sources:
      source.close()
    super().close()


def find_mixture_state(state) -> dict | None:
  """The mixture's own state inside a pipeline iterator's nested state, or None."""
  if isinstance(state, dict):
    if state.get(MIXTURE_STATE_KEY):
      return state
    for value in state.values():
      found = find_mixture_state(value)
      if found is not None:
        return found
  elif isinstance(state, list | tuple):
    for value in state:
      found = find_mixture_state(value)
      if found is not None:
        return found
  return None


def with_source_states(state, source_states: list):
  """A copy of a pipeline state whose mixture(s) resume their sources from `source_states`.

  Used at a phase switch: the new phase's fresh pipeline continues every source where the previous
  phase left it (nothing repeated), while its counters and buffers start empty.
  """
  if isinstance(state, dict):
    if state.get(MIXTURE_STATE_KEY):
      return {**state, "sources": source_states}
    return {k: with_source_states(v, source_states) for k, v in state.items()}
  if isinstance(state, list | tuple):
    return type(state)(with_source_states(v, source_states) for v in state)
  return state
