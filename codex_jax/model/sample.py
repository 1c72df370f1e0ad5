"""Sampling from the model with a KV cache: greedy at temperature 0, else seeded nucleus (top-p) sampling."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from codex_jax.config.schema import ModelConfig
from codex_jax.model import decode


def pick(logits_BV: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
  """[B] next tokens: argmax at temperature 0; otherwise drawn at `temperature` from the smallest set of
  most likely tokens whose probability reaches `top_p`. Both are traced: one compile serves every setting."""
  greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / jnp.where(temperature > 0, temperature, 1.0)
  sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  # Keep a token while the mass before it is below top_p: the first token is always kept.
  before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  kept = jnp.sum(before_BV < top_p, axis=-1, keepdims=True)
  threshold_B1 = jnp.take_along_axis(sorted_BV, kept - 1, axis=-1)
  logits_BV = jnp.where(logits_BV >= threshold_B1, logits_BV, -jnp.inf)
  sampled_B = jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)
  return jnp.where(temperature > 0, sampled_B, greedy_B)


@functools.lru_cache(maxsize=8)
def _steps(cfg: ModelConfig):
  """(prefill, step), jitted once per model config (then per prompt and cache length)."""

  def prefill(params, tokens_BL, cache, key, temperature, top_p):
    logits_BLV, cache = decode.forward(params, cfg, tokens_BL, cache)
    return pick(logits_BLV[:, -1], key, temperature, top_p), cache

  def step(params, token_B, cache, key, temperature, top_p):
    logits_BLV, cache = decode.forward(params, cfg, token_B[:, None], cache)
    return pick(logits_BLV[:, -1], key, temperature, top_p), cache

  return jax.jit(prefill), jax.jit(step, donate_argnums=2)


def generate(params, cfg: ModelConfig, prompt: list[int], max_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, stop_id: int | None = None) -> list[int]:
  """Up to `max_tokens` new token ids after `prompt` (ending early after `stop_id`)."""
  if not prompt:
    raise ValueError("generate: the prompt must hold at least one token")
  if temperature < 0 or not 0 < top_p <= 1:
    raise ValueError(f"generate: temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
  prefill, step = _steps(cfg)
  setting = (jnp.float32(temperature), jnp.float32(top_p))
  cache = decode.init_cache(cfg, 1, len(prompt) + max_tokens)
  key = jax.random.PRNGKey(seed)
  out: list[int] = []
  if max_tokens <= 0:
    return out
  token_B, cache = prefill(params, jnp.asarray([prompt], jnp.int32), cache, jax.random.fold_in(key, 0), *setting)
  while True:
    out.append(int(token_B[0]))
    if len(out) == max_tokens or out[-1] == stop_id:
      return out
    token_B, cache = step(params, token_B, cache, jax.random.fold_in(key, len(out)), *setting)
