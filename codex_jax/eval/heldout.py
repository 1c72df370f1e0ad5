"""Held-out loss and bits per byte, overall, per source and per domain (the source's kind).

bits per byte = summed next-token loss (nats) / (ln 2 * UTF-8 bytes of the target tokens). The bytes of a
token are its byte-level BPE string's length (one character per byte); the end-of-text token has none,
its loss still counts, as in OLMo's bits-per-byte.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import tokenizers

from codex_jax.objectives import mtp as mtp_objective


def token_bytes(tokenizer: tokenizers.Tokenizer, vocab_size: int) -> np.ndarray:
  """UTF-8 bytes of each token id's text; 0 for special tokens and ids past the tokenizer."""
  table = np.zeros(vocab_size, np.int64)
  special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
  for token, i in tokenizer.get_vocab(with_added_tokens=True).items():
    if i < vocab_size and token not in special:
      table[i] = len(token)  # ByteLevel: every character of a token stands for one byte.
  return table


def _gather(x: np.ndarray) -> np.ndarray:
  """The global rows of a per-process array (the device outputs are global)."""
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def heldout_scores(batches, run, *, num_batches: int, byte_table: np.ndarray, names: dict[int, str],
                   domains: dict[int, str]) -> dict[str, float]:
  """`heldout/loss`, `heldout/bpb`, per source `heldout/<name>/...` and per domain `heldout/domain/<kind>/...`.

  `run(batch)` gives score.token_scores, and with MTP the depths' `mtp_*` sums (reported per depth).
  """
  nats: dict[int, float] = {}
  tokens: dict[int, float] = {}
  nbytes: dict[int, float] = {}
  extra: dict[str, float] = {}
  try:
    for i, batch in enumerate(batches):
      if i >= num_batches:
        break
      scored = run(batch)
      logp = np.asarray(scored["logp"], np.float64)
      mask = _gather(np.asarray(batch["loss_mask"], np.float64))
      source = _gather(np.asarray(batch["source_ids"]))
      nb = byte_table[_gather(np.asarray(batch["targets"]))] * mask
      for s in np.unique(source[mask > 0]):
        where = (source == s) & (mask > 0)
        nats[s] = nats.get(s, 0.0) - float(logp[where].sum())
        tokens[s] = tokens.get(s, 0.0) + float(mask[where].sum())
        nbytes[s] = nbytes.get(s, 0.0) + float(nb[where].sum())
      for key in (k for k in scored if k.startswith("mtp_")):
        extra[key] = extra.get(key, 0.0) + float(scored[key])
  finally:
    batches.close()
  out = {}

  def put(prefix: str, ids) -> None:
    n, t, b = sum(nats[s] for s in ids), sum(tokens[s] for s in ids), sum(nbytes[s] for s in ids)
    out[f"{prefix}/loss"] = n / t if t else float("nan")
    out[f"{prefix}/bpb"] = n / (math.log(2) * b) if b else float("nan")
    out[f"{prefix}/tokens"] = t

  put("heldout", list(nats))
  for s in sorted(nats):
    put(f"heldout/{names.get(int(s), s)}", [s])
  for kind in sorted(set(domains.values())):
    ids = [s for s in nats if domains.get(int(s)) == kind]
    if ids:
      put(f"heldout/domain/{kind}", ids)
  out.update({f"heldout/{k}": v for k, v in mtp_objective.heldout_metrics(extra).items()})  # Per depth's own tokens.
  return out
