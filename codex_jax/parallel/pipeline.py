"""Pipeline parallelism over the `pipeline` mesh axis: GPipe, circular and a 1F1B-memory schedule.

The stacked layers ([num_layers, ...] leaves, contiguous stages over `pipeline` by the rules table)
are viewed as [repeats, stages, layers_per_chunk, ...]. Every tick, all stages run at once as one
`vmap` over the stage axis (`spmd_axis_name="pipeline"`, so each device computes only its stage, and
the model's own logical constraints gain the stage axis), then the activations move one stage on
(`jnp.roll` over the pipeline-sharded axis, which XLA lowers to a collective-permute). The batch is
cut into microbatches; a microbatch keeps its rows on their `data` shards and every block keeps its
`tensor` sharding, so the three axes compose.

Schedules (S stages, M microbatches, R repeats; the per-stage idle share is the bubble):
  gpipe     all forwards, then (by autodiff through the scan) all backwards: M + S - 1 ticks,
            bubble (S - 1) / (M + S - 1); keeps each tick's stage inputs for the backward: O(M).
  circular  each stage holds R chunks of layers and every microbatch goes round the ring R times
            (needs M >= S): R*M + S - 1 ticks of 1/R the work, bubble (S - 1) / (R*M + S - 1).
  1f1b      forward and backward interleaved by hand: each tick every stage runs the forward of one
            microbatch and the backward (recomputing its forward) of an earlier one, so a stage
            holds at most 2S microbatch inputs whatever M is: activation memory bounded like
            1F1B's. M + 2S - 1 ticks; in SPMD every tick costs a forward and a backward, so the
            bubble is (2S - 1) / (M + 2S - 1): memory bought with a longer ramp.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from codex_jax.config.schema import MeshConfig, ModelConfig
from codex_jax.config.validate import resolve_microbatches
from codex_jax.model.transformer import REMAT_POLICIES, Block, Decoder
from codex_jax.objectives import mtp as mtp_objective

ACT_SBLD = ("act_stage", "act_batch", "act_length", "act_embed")  # One microbatch per stage.
ACT_MBLD = (None, "act_batch", "act_length", "act_embed")  # All microbatches, each sharded over `data`.
ACT_MBL = (None, "act_batch", "act_length")
LAYERS = "layers"  # The params subtree of the stacked blocks (Decoder's nn.scan).


@dataclasses.dataclass(frozen=True)
class Schedule:
  kind: str          # gpipe | circular | 1f1b
  stages: int
  microbatches: int
  repeats: int = 1

  @classmethod
  def of(cls, mesh: MeshConfig, stages: int) -> Schedule:
    """The schedule a config's `mesh` group asks for on `stages` pipeline stages."""
    return cls(mesh.schedule, stages, resolve_microbatches(mesh, stages), mesh.repeats)

  @property
  def ticks(self) -> int:
    if self.kind == "1f1b":
      return self.microbatches + 2 * self.stages - 1
    return self.repeats * self.microbatches + self.stages - 1

  @property
  def busy_ticks(self) -> int:
    """Ticks in which a stage works on a microbatch (each microbatch passes each stage `repeats` times)."""
    return self.repeats * self.microbatches

  @property
  def bubble_fraction(self) -> float:
    """Share of a stage's ticks spent on no microbatch."""
    return 1.0 - self.busy_ticks / self.ticks


def stage_fn(cfg: ModelConfig):
  """(chunk params [c, ...], x_BLD, segment_ids_BL, positions_BL) -> x_BLD: the chunk's blocks in
  order, each rematerialised by `model.remat` exactly as the unpipelined stack is."""
  block = Block(cfg)

  def layer(x_BLD, layer_params, segment_ids_BL, positions_BL):
    return block.apply({"params": layer_params}, x_BLD, segment_ids_BL, positions_BL)[0]

  if cfg.remat != "none":
    layer = jax.checkpoint(layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)

  def run(chunk_params, x_BLD, segment_ids_BL, positions_BL):
    return jax.lax.scan(lambda x, p: (layer(x, p, segment_ids_BL, positions_BL), None), x_BLD, chunk_params)[0]
  return run


def to_microbatches(x_B, microbatches: int):
  """[B, ...] -> [M, B/M, ...]; microbatch m takes rows m, m + M, ... so each keeps its `data` shards."""
  return x_B.reshape(x_B.shape[0] // microbatches, microbatches, *x_B.shape[1:]).swapaxes(0, 1)


def from_microbatches(x_M):
  return x_M.swapaxes(0, 1).reshape(x_M.shape[0] * x_M.shape[1], *x_M.shape[2:])


def _take(tree, index):
  return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False), tree)


def _select(ok, new, old):
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """The stacked layers of `model` run as `schedule` over the `pipeline` mesh axis."""

  model: Decoder
  schedule: Schedule
  stack_specs: Any  # Logical PartitionSpec of every params[LAYERS] leaf (leading "layers").

  @property
  def layers_per_chunk(self) -> int:
    s = self.schedule
    return self.model.cfg.num_layers // (s.repeats * s.stages)

  def _chunks(self, stack_params):
    """[L, ...] leaves -> [R, S, c, ...], the stage axis on `pipeline`."""
    s, c = self.schedule, self.layers_per_chunk

    def view(a, spec):
      a = a.reshape(s.repeats, s.stages, c, *a.shape[1:])
      return nn.with_logical_constraint(a, (None, "stage", None, *tuple(spec)[1:]))
    return jax.tree.map(view, stack_params, self.stack_specs,
                        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))

  def _stage_params(self, chunks, repeat_S):
    """Each stage's chunk for its current repeat: [S, c, ...]."""
    if self.schedule.repeats == 1:
      return jax.tree.map(lambda a: a[0], chunks)
    return jax.tree.map(lambda a: jax.vmap(lambda a_s, r: a_s[r], in_axes=(1, 0))(a, repeat_S), chunks)

  def _run_stages(self, stage_params, x_SBLD, segment_ids_SBL, positions_SBL):
    run = jax.vmap(stage_fn(self.model.cfg), spmd_axis_name="pipeline")
    return nn.with_logical_constraint(run(stage_params, x_SBLD, segment_ids_SBL, positions_SBL), ACT_SBLD)

  def stack(self, stack_params, x_BLD, segment_ids_BL, positions_BL):
    """The whole layer stack on [B, L, D] (gpipe or circular; differentiable by autodiff)."""
    s = self.schedule
    S, M, R = s.stages, s.microbatches, s.repeats
    chunks = self._chunks(stack_params)
    # Microbatch m's slot: its input before its first round, then its output after each round.
    buffer_MBLD = nn.with_logical_constraint(to_microbatches(x_BLD, M), ACT_MBLD)
    segment_ids_MBL = to_microbatches(segment_ids_BL, M)
    positions_MBL = to_microbatches(positions_BL, M)
    state_SBLD = nn.with_logical_constraint(jnp.zeros((S, *buffer_MBLD.shape[1:]), x_BLD.dtype), ACT_SBLD)
    stage_S = jnp.arange(S)

    def tick(carry, t):
      state_SBLD, buffer_MBLD = carry
      # Stage s works on virtual microbatch t - s: microbatch (t - s) % M in round (t - s) // M.
      virtual_S = jnp.clip(t - stage_S, 0, R * M - 1)
      micro_S, repeat_S = virtual_S % M, virtual_S // M
      # Stage 0 takes microbatch t % M: its input, or its output of the previous round (M >= S
      # guarantees that round has left the last stage by now).
      state_SBLD = state_SBLD.at[0].set(_take(buffer_MBLD, t % M))
      out_SBLD = self._run_stages(self._stage_params(chunks, repeat_S), state_SBLD,
                                  segment_ids_MBL[micro_S], positions_MBL[micro_S])
      # The last stage finishes microbatch micro_S[-1]'s round (its virtual index is never past the end).
      done = t - (S - 1) >= 0
      slot = micro_S[-1]
      buffer_MBLD = buffer_MBLD.at[slot].set(jnp.where(done, out_SBLD[-1], _take(buffer_MBLD, slot)))
      return (jnp.roll(out_SBLD, 1, axis=0), buffer_MBLD), None

    (_, buffer_MBLD), _ = jax.lax.scan(tick, (state_SBLD, buffer_MBLD), jnp.arange(s.ticks))
    return from_microbatches(buffer_MBLD)

  def value_and_grad(self, params, batch: dict, z_loss: float, mtp_weight: jax.Array | float = 0.0):
    """((loss, aux), grads) of the next-token loss with the 1F1B-memory schedule (see module doc).

    The head a microbatch meets on leaving the last stage includes the MTP depths (model/mtp.py), so
    their loss and gradients are taken per microbatch like the main head's.
    """
    s = self.schedule
    S, M = s.stages, s.microbatches
    K = 2 * S  # Stash slots per stage: microbatch m waits 2(S - s) - 1 ticks between its forward and backward.
    model = self.model
    stack_params = params[LAYERS]
    rest = {k: v for k, v in params.items() if k != LAYERS}
    chunks = self._chunks(stack_params)
    stage_params = self._stage_params(chunks, None)
    run_stage = stage_fn(model.cfg)
    micro = {k: to_microbatches(v, M) for k, v in batch.items()}
    stage_S = jnp.arange(S)
    denom = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    # d loss / d (ce_sum, z_sum) of each microbatch: the loss is (sum ce + z_loss * sum z) / tokens
    # (+ mtp_weight / D * sum_k mtp_ce_sum_k / mtp_tokens_k, over the whole batch's counts).
    sums_cotangent = {"ce_sum": 1.0 / denom, "z_sum": z_loss / denom, "tokens": jnp.zeros(())}
    depth = model.cfg.mtp_depth
    for k, count in enumerate(mtp_objective.mtp_tokens(batch, depth).values(), start=1):
      sums_cotangent |= {f"mtp_ce_sum_{k}": mtp_weight / depth / jnp.maximum(count, 1.0),
                         f"mtp_tokens_{k}": jnp.zeros(()), f"mtp_accept_{k}": jnp.zeros(())}

    def embed(rest, m):
      mb = _take(micro, m)
      return model.apply({"params": rest}, mb["inputs"], mb.get("features"),
                         mb.get("modality_ids"), method=Decoder.embed)

    def head_sums(rest, y_BLD, m):
      mb = _take(micro, m)
      return mtp_objective.head_sums(model, rest, y_BLD, mb, z_loss)

    def stage_backward(p, x_BLD, segment_ids_BL, positions_BL, g_BLD):
      _, pullback = jax.vjp(lambda p, x: run_stage(p, x, segment_ids_BL, positions_BL), p, x_BLD)
      return pullback(g_BLD)

    backward_stages = jax.vmap(stage_backward, spmd_axis_name="pipeline")
    x0 = embed(rest, 0)
    zeros_SBLD = nn.with_logical_constraint(jnp.zeros((S, *x0.shape), x0.dtype), ACT_SBLD)
    carry = {
        "fwd": zeros_SBLD, "bwd": zeros_SBLD,
        "stash": nn.with_logical_constraint(jnp.zeros((S, K, *x0.shape), x0.dtype), ("act_stage", None, *ACT_SBLD[1:])),
        "stage_grads": jax.tree.map(jnp.zeros_like, stage_params),
        "rest_grads": jax.tree.map(jnp.zeros_like, rest),
        "sums": {k: jnp.zeros(()) for k in sums_cotangent},
    }

    def tick(carry, t):
      # Forward: stage s runs microbatch t - s.
      f_S = t - stage_S
      f_ok_S = (f_S >= 0) & (f_S < M)
      f_m_S = jnp.clip(f_S, 0, M - 1)
      fwd_in = carry["fwd"].at[0].set(embed(rest, f_m_S[0]))
      out_SBLD = self._run_stages(stage_params, fwd_in, micro["segment_ids"][f_m_S], micro["positions"][f_m_S])
      stash = jax.vmap(lambda st, slot, x, ok: st.at[slot].set(jnp.where(ok, x, st[slot])))(
          carry["stash"], f_m_S % K, fwd_in, f_ok_S)
      # The loss of the microbatch leaving the last stage, and its cotangent for that stage's backward.
      h = t - (S - 1)
      h_ok, h_m = (h >= 0) & (h < M), jnp.clip(h, 0, M - 1)
      sums, head_pullback = jax.vjp(lambda r, y: head_sums(r, y, h_m), rest, out_SBLD[-1])
      d_rest_head, d_y = head_pullback(sums_cotangent)
      # Backward: stage s runs microbatch t - (2S - 1 - s), recomputing its forward from the stash.
      b_S = t - (2 * S - 1 - stage_S)
      b_ok_S = (b_S >= 0) & (b_S < M)
      b_m_S = jnp.clip(b_S, 0, M - 1)
      x_SBLD = jax.vmap(lambda st, slot: st[slot])(stash, b_m_S % K)
      d_params_S, d_x_SBLD = backward_stages(stage_params, x_SBLD, micro["segment_ids"][b_m_S],
                                             micro["positions"][b_m_S], carry["bwd"])
      stage_grads = jax.tree.map(
          lambda acc, d: acc + jnp.where(b_ok_S.reshape((S,) + (1,) * (d.ndim - 1)), d, 0), carry["stage_grads"],
          d_params_S)
      # Stage 0's input gradient flows into the embedding of its microbatch.
      _, embed_pullback = jax.vjp(lambda r: embed(r, b_m_S[0]), rest)
      (d_rest_embed,) = embed_pullback(d_x_SBLD[0])
      rest_grads = jax.tree.map(lambda acc, dh, de: acc + jnp.where(h_ok, dh, 0) + jnp.where(b_ok_S[0], de, 0),
                                carry["rest_grads"], d_rest_head, d_rest_embed)
      bwd = jnp.roll(d_x_SBLD, -1, axis=0).at[S - 1].set(jnp.where(h_ok, d_y, 0))
      return {"fwd": jnp.roll(out_SBLD, 1, axis=0), "bwd": nn.with_logical_constraint(bwd, ACT_SBLD),
              "stash": stash, "stage_grads": stage_grads, "rest_grads": rest_grads,
              "sums": _select(h_ok, jax.tree.map(jnp.add, carry["sums"], sums), carry["sums"])}, None

    carry, _ = jax.lax.scan(tick, carry, jnp.arange(s.ticks))
    loss, aux = mtp_objective.loss_from_sums(carry["sums"], z_loss, depth, mtp_weight)
    layer_grads = jax.tree.map(lambda g, p: g.reshape(p.shape), carry["stage_grads"], stack_params)
    return (loss, aux), {**carry["rest_grads"], LAYERS: layer_grads}
