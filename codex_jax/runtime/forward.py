"""The text forward passes of one batch: trunk, next-token logits, MTP logits, and the held-out loss sums."""

from __future__ import annotations

import jax

from codex_jax.model.transformer import Decoder
from codex_jax.objectives import mtp as mtp_objective
from codex_jax.parallel.pipeline import LAYERS, Pipeline


def trunk_fn(params, batch: dict, *, model: Decoder, pipeline: Pipeline | None = None,
             rng: jax.Array | None = None) -> jax.Array:
  """The last block's output [B, L, D] of one batch; with a pipeline, the layer stack runs over its stages."""
  if pipeline is None:
    return model.apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"],
                       batch.get("features"), batch.get("modality_ids"), batch.get("masked"),
                       rngs=None if rng is None else {"dropout": rng}, method=Decoder.trunk)
  x_BLD = model.apply({"params": params}, batch["inputs"], batch.get("features"), batch.get("modality_ids"),
                      batch.get("masked"), method=Decoder.embed)
  return pipeline.stack(params[LAYERS], x_BLD, batch["segment_ids"], batch["positions"])


def logits_fn(params, batch: dict, *, model: Decoder, pipeline: Pipeline | None = None,
              rng: jax.Array | None = None) -> jax.Array:
  """Next-token logits [B, L, V] of one batch."""
  x_BLD = trunk_fn(params, batch, model=model, pipeline=pipeline, rng=rng)
  return model.apply({"params": params}, x_BLD, method=Decoder.head)


def outputs_fn(params, batch: dict, *, model: Decoder, pipeline: Pipeline | None = None,
               rng: jax.Array | None = None) -> tuple[jax.Array, list[jax.Array]]:
  """(next-token logits [B, L, V], [logits of each MTP depth]); the list is empty when MTP is off."""
  x_BLD = trunk_fn(params, batch, model=model, pipeline=pipeline, rng=rng)
  return (model.apply({"params": params}, x_BLD, method=Decoder.head),
          model.apply({"params": params}, x_BLD, batch["inputs"], batch["segment_ids"], batch["positions"],
                      method=Decoder.mtp_logits))


def batch_sums(params, batch: dict, *, model: Decoder, rng: jax.Array | None = None,
               pipeline: Pipeline | None = None, z_loss: float = 0.0) -> dict[str, jax.Array]:
  """The loss sums of one batch (objectives/text.py; objectives/mtp.py when model.mtp_depth > 0), the logits made a
  chunk of positions at a time; their gradient is that of a loss with this `z_loss` (objectives/mtp.py:head_sums)."""
  x_BLD = trunk_fn(params, batch, model=model, pipeline=pipeline, rng=rng)
  return mtp_objective.head_sums(model, params, x_BLD, batch, z_loss)


def heldout_sums(params, batch: dict, *, model: Decoder, pipeline: Pipeline | None = None) -> dict:
  """Held-out loss of `params` on one batch (sums, so batches combine exactly): `ce_sum`, `tokens`, and
  with MTP each depth's `mtp_ce_sum_k`, `mtp_tokens_k`, `mtp_accept_k` (objectives/mtp.py)."""
  sums = batch_sums(params, batch, model=model, pipeline=pipeline)
  return {k: v for k, v in sums.items() if k != "z_sum"}


def jit_heldout_sums(engine):
  """heldout_sums jitted on `engine` (runtime/engine.py): (params, batch) -> sums, replicated."""
  return engine.jit(lambda params, batch: heldout_sums(params, batch, model=engine.model, pipeline=engine.pipeline),
                    in_shardings=(engine.param_shardings, engine.data_sharding))
