"""KV-cache decoding: a prefill, then one token at a time, through the model's own Block and Attention.

The cache is fixed-size ([N, B, S, G, K] keys and values, N layers, S the most positions a sequence
reaches), so one jitted step serves every position; `index` counts the positions filled. Each row is
one unpadded sequence starting at position 0 (no packing while decoding).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from codex_jax.config.schema import ModelConfig
from codex_jax.model.transformer import Block, Decoder, block_params, stack_blocks


def init_cache(cfg: ModelConfig, batch: int, length: int) -> dict[str, Any]:
  shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.resolved_head_dim)
  zeros = jnp.zeros(shape, jnp.dtype(cfg.compute_dtype))
  return {"k": zeros, "v": zeros, "index": jnp.zeros((), jnp.int32)}


def stacked_layers(params: dict, cfg: ModelConfig) -> dict:
  """The blocks' parameters with a leading layer axis, whether or not the stack was scanned."""
  return params["layers"] if "layers" in params else stack_blocks(block_params(params, cfg.num_layers))


def forward(params: dict, cfg: ModelConfig, tokens_BL: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
  """Logits [B, L, V] (float32) of `tokens_BL` placed after the cached positions, and the updated cache."""
  decoder, block = Decoder(cfg), Block(cfg)  # A plain Block: decoding keeps no activations for a backward pass.
  variables = {"params": params}
  batch, length = tokens_BL.shape
  index = cache["index"]
  positions_BL = jnp.broadcast_to(index + jnp.arange(length, dtype=jnp.int32), (batch, length))
  segment_ids_BL = jnp.ones((batch, length), jnp.int32)
  x_BLD = decoder.apply(variables, tokens_BL, method=Decoder.embed)

  def layer(x_BLD, inputs):
    layer_params, k_BSGK, v_BSGK = inputs
    x_BLD, (k_BSGK, v_BSGK, _) = block.apply({"params": layer_params}, x_BLD, segment_ids_BL, positions_BL,
                                             cache=(k_BSGK, v_BSGK, index))
    return x_BLD, (k_BSGK, v_BSGK)

  x_BLD, (k, v) = jax.lax.scan(layer, x_BLD, (stacked_layers(params, cfg), cache["k"], cache["v"]))
  logits_BLV = decoder.apply(variables, x_BLD, method=Decoder.head)
  return logits_BLV, {"k": k, "v": v, "index": index + length}
