"""Where each objective's examples sit in a packed batch: fixed-size slot tables, derived on device.

Pure jnp over the flattened N = B * L positions, so it jits with the step and needs nothing from the host.
A unit (an image, an align pair, a video chunk, an action) is numbered by a cumulative sum over its start
positions; units past a table's capacity C go to a trash slot (index C) and are counted as dropped.
Per unit: its start position, a `valid` flag, and for fixed-size units a grid [C, P] of its positions.

- images: runs of image positions; a random `masked_fraction` of them get a random `mask_ratio` of their
  P patches masked (the model sees the learned mask embedding there: MAE).
- align pairs: segments that open with image or video positions and hold caption text. A random
  `blind_fraction` are blind: their text gets segment id 2s+1, every other position 2s, so causal
  same-segment attention keeps the caption from its media; the text target at the last position before
  the caption is dropped from the loss mask (it would cross the split). Only blind pairs whose image is
  not masked are aligned; seen (unblinded) captions stay conditioned on their media for captioning.
- world chunks: runs of P consecutive video positions (a clip's tubelet time slice, an embodied frame);
  transition c -> c+1 when both lie in one segment, with the action position just before chunk c+1 when
  there is one (embodied), else the null action (clips).
- action chunks: an action position with `horizon` actions of its segment from it onward; the condition
  is the position just before it (the proprio), the target those actions' first `action_dim` values.

Letters: B batch, L length, N = B * L, C slots, P positions per image / chunk, T horizon, A action values.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from codex_jax.config.schema import MODALITY_IDS, ObjectivesConfig

TEXT, IMAGE, VIDEO, ACTION = (MODALITY_IDS[name] for name in ("text", "image", "video", "action"))


@flax.struct.dataclass
class Slots:
  segment_ids_BL: jax.Array   # Blind captions split off (2s+1); every other segment 2s; padding 0.
  loss_mask_BL: jax.Array     # The text loss mask minus the targets that cross a blind split.
  masked_BL: jax.Array        # bool: MAE-masked patch positions.
  image_idx_CP: jax.Array     # Positions of each image slot's patches (flat indices into N).
  image_valid_C: jax.Array    # A whole image in one segment.
  image_masked_C: jax.Array   # Masked for MAE (and the vision contrastive views).
  patch_masked_CP: jax.Array
  pair_slot_N: jax.Array      # Align pair slot of each position (the trash slot C when none).
  pair_media_N: jax.Array     # float: an image / video position of its pair.
  pair_text_N: jax.Array      # float: a caption position of its pair.
  pair_valid_C: jax.Array     # Blind, unmasked, with media and caption: the align pairs.
  pair_blind_C: jax.Array
  chunk_idx_CP: jax.Array     # World: positions of each video chunk.
  next_idx_CP: jax.Array      # ... and of the chunk after it.
  transition_valid_C: jax.Array
  action_pos_C: jax.Array     # The action between chunk c and c+1 (valid where has_action).
  has_action_C: jax.Array
  cond_pos_C: jax.Array       # Action chunks: the conditioning position (just before the first action).
  act_idx_CT: jax.Array       # ... the horizon's action positions.
  act_valid_C: jax.Array
  dropped: dict               # Units beyond each table's capacity, per table (int32 scalars).


def _slots(start_N: jax.Array, cap: int):
  """(slot of each start position, or cap; start position of each slot [cap]; filled [cap]; dropped)."""
  n_N = jnp.arange(start_N.shape[0])
  rank_N = jnp.cumsum(start_N.astype(jnp.int32)) - 1
  slot_N = jnp.where(start_N & (rank_N < cap), rank_N, cap)
  start_C = jax.ops.segment_sum(jnp.where(slot_N < cap, n_N, 0), slot_N, num_segments=cap + 1)[:cap]
  count = jnp.sum(start_N.astype(jnp.int32))
  return slot_N, start_C, jnp.arange(cap) < count, jnp.maximum(count - cap, 0)


def _grid(start_C: jax.Array, size: int, n: int) -> jax.Array:
  return jnp.minimum(start_C[:, None] + jnp.arange(size), n - 1)


def _runs(flag_N: jax.Array, prev_same_N: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(start of each run of `flag` positions within a segment, index of each position's run start)."""
  prev_flag_N = jnp.concatenate([jnp.zeros((1,), bool), flag_N[:-1]])
  start_N = flag_N & ~(prev_same_N & prev_flag_N)
  first_N = jax.lax.cummax(jnp.where(start_N, jnp.arange(flag_N.shape[0]), 0))
  return start_N, first_N


def build(batch: dict, rng: jax.Array, cfg: ObjectivesConfig, patches: int) -> Slots:
  """The slot tables of one (global) batch; `patches` = positions per image or video chunk."""
  B, L = batch["segment_ids"].shape
  N, P = B * L, patches
  seg_N = batch["segment_ids"].reshape(N)
  mod_N = jnp.where(seg_N > 0, batch["modality_ids"].reshape(N), 0)
  n_N = jnp.arange(N)
  seg_start_N = (n_N % L == 0) | (seg_N != jnp.roll(seg_N, 1))
  prev_same_N = ~seg_start_N
  seg_first_N = jax.lax.cummax(jnp.where(seg_start_N, n_N, 0))
  is_text, is_image, is_video, is_action = (mod_N == m for m in (TEXT, IMAGE, VIDEO, ACTION))
  k_pick, k_patch, k_blind = jax.random.split(rng, 3)

  def whole(idx_CP, flag_N, first_N):  # Every grid position is `flag` and in the unit's own run.
    return jnp.all(flag_N[idx_CP] & (first_N[idx_CP] == first_N[idx_CP[:, :1]]), axis=1)

  # Images and MAE masking.
  v = cfg.vision
  image_start_N, image_first_N = _runs(is_image, prev_same_N)
  _, image_start_C, filled, image_dropped = _slots(image_start_N, v.max_images)
  image_idx_CP = _grid(image_start_C, P, N)
  image_valid_C = filled & whole(image_idx_CP, is_image, image_first_N)
  image_masked_C = image_valid_C & (jax.random.uniform(k_pick, image_valid_C.shape) < v.masked_fraction)
  rank_CP = jnp.argsort(jnp.argsort(jax.random.uniform(k_patch, image_idx_CP.shape), axis=1), axis=1)
  n_masked = min(max(round(v.mask_ratio * P), 1), P - 1)
  patch_masked_CP = image_masked_C[:, None] & (rank_CP < n_masked)
  masked_N = jnp.zeros((N,), jnp.int32).at[image_idx_CP].max(patch_masked_CP.astype(jnp.int32)) > 0

  # Align pairs and blind captions.
  a = cfg.align
  is_media = is_image | is_video
  pair_start_N = seg_start_N & is_media & (seg_N > 0)
  slot_N, _, filled, pair_dropped = _slots(pair_start_N, a.max_pairs)
  pair_slot_N = jnp.where(pair_start_N[seg_first_N], slot_N[seg_first_N], a.max_pairs)
  count = lambda w_N: jax.ops.segment_sum(w_N.astype(jnp.float32), pair_slot_N, a.max_pairs + 1)  # noqa: E731
  media_n, text_n, masked_n = count(is_media), count(is_text), count(masked_N)
  has_both_C = filled & (media_n[:-1] > 0) & (text_n[:-1] > 0)
  pair_blind_C = has_both_C & (jax.random.uniform(k_blind, has_both_C.shape) < a.blind_fraction)
  blind_N = jnp.concatenate([pair_blind_C, jnp.zeros((1,), bool)])[pair_slot_N] & is_text
  segment_ids_N = seg_N * 2 + blind_N.astype(seg_N.dtype)
  crosses_N = jnp.concatenate([blind_N[1:] & ~blind_N[:-1] & prev_same_N[1:], jnp.zeros((1,), bool)])
  loss_mask_N = jnp.where(crosses_N, 0.0, batch["loss_mask"].reshape(N))

  # World chunks and transitions.
  w = cfg.world
  _, video_first_N = _runs(is_video, prev_same_N)
  chunk_start_N = is_video & ((n_N - video_first_N) % P == 0)
  _, chunk_start_C, filled, chunk_dropped = _slots(chunk_start_N, w.max_chunks)
  chunk_idx_CP = _grid(chunk_start_C, P, N)
  chunk_valid_C = filled & whole(chunk_idx_CP, is_video, video_first_N)
  next_C = jnp.minimum(jnp.arange(w.max_chunks) + 1, w.max_chunks - 1)
  next_start_C = chunk_start_C[next_C]
  transition_valid_C = (chunk_valid_C & chunk_valid_C[next_C] & (jnp.arange(w.max_chunks) + 1 < w.max_chunks)
                        & (seg_first_N[chunk_start_C] == seg_first_N[next_start_C]))
  action_pos_C = jnp.maximum(next_start_C - 1, 0)
  has_action_C = is_action[action_pos_C] & (seg_first_N[action_pos_C] == seg_first_N[chunk_start_C])

  # Action chunks.
  h = cfg.action
  _, act_start_C, filled, act_dropped = _slots(is_action, h.max_chunks)
  ahead_CT = jnp.minimum(jnp.arange(h.max_chunks)[:, None] + jnp.arange(h.horizon), h.max_chunks - 1)
  act_idx_CT = act_start_C[ahead_CT]
  in_range_CT = jnp.arange(h.max_chunks)[:, None] + jnp.arange(h.horizon) < h.max_chunks
  same_CT = seg_first_N[act_idx_CT] == seg_first_N[act_start_C][:, None]
  act_valid_C = jnp.all(filled[ahead_CT] & in_range_CT & same_CT, axis=1) & prev_same_N[act_start_C] & filled
  cond_pos_C = jnp.maximum(act_start_C - 1, 0)

  return Slots(
      segment_ids_BL=segment_ids_N.reshape(B, L), loss_mask_BL=loss_mask_N.reshape(B, L),
      masked_BL=masked_N.reshape(B, L), image_idx_CP=image_idx_CP, image_valid_C=image_valid_C,
      image_masked_C=image_masked_C, patch_masked_CP=patch_masked_CP, pair_slot_N=pair_slot_N,
      pair_media_N=is_media.astype(jnp.float32), pair_text_N=is_text.astype(jnp.float32),
      pair_valid_C=pair_blind_C & (masked_n[:-1] == 0), pair_blind_C=pair_blind_C, chunk_idx_CP=chunk_idx_CP,
      next_idx_CP=chunk_idx_CP[next_C], transition_valid_C=transition_valid_C, action_pos_C=action_pos_C,
      has_action_C=has_action_C & transition_valid_C, cond_pos_C=cond_pos_C, act_idx_CT=act_idx_CT,
      act_valid_C=act_valid_C,
      dropped={"images": image_dropped, "pairs": pair_dropped, "chunks": chunk_dropped, "actions": act_dropped})


def pool(h_ND: jax.Array, slot_N: jax.Array, weight_N: jax.Array, cap: int) -> jax.Array:
  """Mean of h over each slot's weighted positions [cap, D] (0 for an empty slot)."""
  w_N = weight_N.astype(jnp.float32) * (slot_N < cap)
  sums = jax.ops.segment_sum(h_ND.astype(jnp.float32) * w_N[:, None], slot_N, num_segments=cap + 1)[:cap]
  counts = jax.ops.segment_sum(w_N, slot_N, num_segments=cap + 1)[:cap]
  return sums / jnp.maximum(counts, 1.0)[:, None]


def last(h_ND: jax.Array, slot_N: jax.Array, weight_N: jax.Array, cap: int) -> jax.Array:
  """h at each slot's last position with weight > 0 [cap, D] (position 0's for an empty slot)."""
  n_N = jnp.arange(h_ND.shape[0])
  last_C = jax.ops.segment_max(jnp.where((weight_N > 0) & (slot_N < cap), n_N, 0), slot_N, num_segments=cap + 1)[:cap]
  return h_ND[jnp.maximum(last_C, 0)].astype(jnp.float32)


def grid_mean(h_ND: jax.Array, idx_CP: jax.Array) -> jax.Array:
  """Mean of h over each fixed-size unit's positions [C, D]."""
  return jnp.mean(h_ND[idx_CP].astype(jnp.float32), axis=1)


def _mix32(x: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: every input bit moves every output bit."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def caption_keys(tokens_N: jax.Array, slot_N: jax.Array, text_N: jax.Array, cap: int) -> jax.Array:
  """A key [cap, 3] uint32 per pair slot naming its caption's token sequence: two sums (mod 2^32) of a hash
  of (token, rank in the caption) under two salts, and the caption's length. Equal captions get equal keys;
  different ones collide with probability ~2^-64. Retrieval evals use it to count a retrieved duplicate
  caption as a hit (eval/objective_scores.py)."""
  is_text_N = (text_N > 0) & (slot_N < cap)
  count_N = jnp.cumsum(is_text_N.astype(jnp.int32))
  first_C = jax.ops.segment_min(jnp.where(is_text_N, count_N, jnp.iinfo(jnp.int32).max), slot_N,
                                num_segments=cap + 1)
  rank_N = (count_N - first_C[slot_N]).astype(jnp.uint32)
  token_N = tokens_N.astype(jnp.uint32)
  keys = []
  for salt in (0x9E3779B9, 0x7F4A7C15):
    h_N = _mix32(_mix32(token_N * jnp.uint32(0x01000193) + jnp.uint32(salt)) ^ (rank_N * jnp.uint32(0x27D4EB2F)))
    keys.append(jax.ops.segment_sum(jnp.where(is_text_N, h_N, jnp.uint32(0)), slot_N, num_segments=cap + 1)[:cap])
  length_C = jax.ops.segment_sum(is_text_N.astype(jnp.uint32), slot_N, num_segments=cap + 1)[:cap]
  return jnp.stack(keys + [length_C], axis=-1)
