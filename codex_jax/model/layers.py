"""Transformer building blocks: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Dimension letters: B batch, L length, D model width, H query heads, G kv heads, K head dim, F mlp.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from codex_jax.config.schema import ModelConfig


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], init, cfg: ModelConfig):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(cfg.param_dtype))


class RMSNorm(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    scale_D = _param(self, "scale", (x_BLD.shape[-1],), ("norm",), nn.initializers.ones, self.cfg)
    x_f32 = x_BLD.astype(jnp.float32)
    normed = x_f32 * jax.lax.rsqrt(jnp.mean(x_f32 * x_f32, axis=-1, keepdims=True) + self.cfg.norm_eps)
    return (normed * scale_D.astype(jnp.float32)).astype(self.cfg.compute_dtype)


def rope(x_BLNK: jax.Array, positions_BL: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, the half-split layout (as Hugging Face Llama): pairs (i, i + K/2)."""
  half = x_BLNK.shape[-1] // 2
  inv_freq_k = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
  angle_BLk = positions_BL.astype(jnp.float32)[..., None] * inv_freq_k
  sin_BL1k, cos_BL1k = jnp.sin(angle_BLk)[:, :, None, :], jnp.cos(angle_BLk)[:, :, None, :]
  x1, x2 = jnp.split(x_BLNK.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos_BL1k - x2 * sin_BL1k, x2 * cos_BL1k + x1 * sin_BL1k], axis=-1)
  return rotated.astype(x_BLNK.dtype)


def attention_mask(q_segment_ids_BQ: jax.Array, kv_segment_ids_BS: jax.Array, q_offset: int = 0) -> jax.Array:
  """[B, 1, Q, S] bool: causal (query i sits at position q_offset + i) and within one packed segment."""
  q_pos_Q = q_offset + jnp.arange(q_segment_ids_BQ.shape[1])
  causal_QS = q_pos_Q[:, None] >= jnp.arange(kv_segment_ids_BS.shape[1])[None, :]
  same_segment_BQS = q_segment_ids_BQ[:, :, None] == kv_segment_ids_BS[:, None, :]
  return (same_segment_BQS & causal_QS)[:, None, :, :]


def causal_attention(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL, chunks: int, impl: str | None):
  """Packed causal attention. With chunks > 1, query chunk i attends only to keys [0, end of chunk i]:
  the blocks above the diagonal, always masked, are skipped (exact; (chunks + 1) / (2 chunks) of the
  work), which pays where no fused kernel does it, e.g. on CPU. Grouped kv heads go in as they are.
  """
  length = q_BLHK.shape[1]
  size = length // chunks
  outs = []
  for i in range(chunks):
    start, end = i * size, (i + 1) * size
    mask = attention_mask(segment_ids_BL[:, start:end], segment_ids_BL[:, :end], q_offset=start)
    outs.append(jax.nn.dot_product_attention(q_BLHK[:, start:end], k_BLGK[:, :end], v_BLGK[:, :end],
                                             mask=mask, implementation=impl))
  return outs[0] if chunks == 1 else jnp.concatenate(outs, axis=1)


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BLD, segment_ids_BL, positions_BL, cache=None):
    """With `cache` (k [B, S, G, K], v [B, S, G, K], index: positions filled so far), decoding one
    unpadded sequence per row: this call's keys and values go in at [index, index + L), the queries
    attend to the cache up to themselves, and (output, (k, v, index)) comes back (model/decode.py)."""
    cfg = self.cfg
    D, H, G, K = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    init = nn.initializers.normal(cfg.init_std)
    out_init = nn.initializers.normal(cfg.init_std / (2 * cfg.num_layers) ** 0.5)
    w_q_DHK = _param(self, "q", (D, H, K), ("embed", "heads", "head_dim"), init, cfg)
    # Separate k and v: fusing them into one [D, 2, G, K] matmul measured 25% slower on CPU.
    w_k_DGK = _param(self, "k", (D, G, K), ("embed", "kv_heads", "head_dim"), init, cfg)
    w_v_DGK = _param(self, "v", (D, G, K), ("embed", "kv_heads", "head_dim"), init, cfg)
    w_o_HKD = _param(self, "o", (H, K, D), ("heads", "head_dim", "embed"), out_init, cfg)
    dt = cfg.compute_dtype
    q_BLHK = jnp.einsum("BLD,DHK->BLHK", x_BLD, w_q_DHK.astype(dt))
    k_BLGK = jnp.einsum("BLD,DGK->BLGK", x_BLD, w_k_DGK.astype(dt))
    v_BLGK = jnp.einsum("BLD,DGK->BLGK", x_BLD, w_v_DGK.astype(dt))
    q_BLHK = nn.with_logical_constraint(q_BLHK, ("act_batch", "act_length", "act_heads", None))
    k_BLGK = nn.with_logical_constraint(k_BLGK, ("act_batch", "act_length", "act_kv_heads", None))
    q_BLHK = rope(q_BLHK, positions_BL, cfg.rope_theta)
    k_BLGK = rope(k_BLGK, positions_BL, cfg.rope_theta)
    # "auto" passes implementation=None: in the jax pinned here that is plain XLA attention on every backend
    # (jax/_src/nn/functions.py: "defaults to XLA for now"); no fused kernel runs unless "cudnn" is named.
    impl = None if cfg.attention_impl == "auto" else cfg.attention_impl
    if cache is not None:
      k_BSGK, v_BSGK, index = cache
      k_BSGK = jax.lax.dynamic_update_slice_in_dim(k_BSGK, k_BLGK.astype(k_BSGK.dtype), index, axis=1)
      v_BSGK = jax.lax.dynamic_update_slice_in_dim(v_BSGK, v_BLGK.astype(v_BSGK.dtype), index, axis=1)
      # Causal from `index` on masks the unfilled tail of the cache as well.
      mask = attention_mask(jnp.ones_like(segment_ids_BL), jnp.ones_like(segment_ids_BL, shape=k_BSGK.shape[:2]),
                            q_offset=index)
      out_BLHK = jax.nn.dot_product_attention(q_BLHK, k_BSGK.astype(dt), v_BSGK.astype(dt), mask=mask,
                                              implementation=impl)
      return jnp.einsum("BLHK,HKD->BLD", out_BLHK, w_o_HKD.astype(dt)), (k_BSGK, v_BSGK, index)
    out_BLHK = causal_attention(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL, cfg.attention_chunks, impl)
    return jnp.einsum("BLHK,HKD->BLD", out_BLHK, w_o_HKD.astype(dt))


class SwiGLU(nn.Module):
  """silu(x W_gate) * (x W_up) then W_down. Gate and up are one [D, 2, F] matmul: one pass over x
  and a wider product (23% faster fwd+bwd on CPU); sharded over F, each shard keeps both halves."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BLD):
    cfg = self.cfg
    D, F = cfg.d_model, cfg.mlp_dim
    init = nn.initializers.normal(cfg.init_std)
    out_init = nn.initializers.normal(cfg.init_std / (2 * cfg.num_layers) ** 0.5)
    w_gate_up_D2F = _param(self, "gate_up", (D, 2, F), ("embed", None, "mlp"), init, cfg)
    w_down_FD = _param(self, "down", (F, D), ("mlp", "embed"), out_init, cfg)
    dt = cfg.compute_dtype
    gate_up_BL2F = jnp.einsum("BLD,DTF->BLTF", x_BLD, w_gate_up_D2F.astype(dt))
    h_BLF = jax.nn.silu(gate_up_BL2F[:, :, 0]) * gate_up_BL2F[:, :, 1]
    h_BLF = nn.with_logical_constraint(h_BLF, ("act_batch", "act_length", "act_mlp"))
    return jnp.einsum("BLF,FD->BLD", h_BLF, w_down_FD.astype(dt))
