"""The multimodal forward: five objectives' losses and outputs from one online forward and the EMA target's.

One forward: the batch's slot tables (objectives/slots.py) -> one online forward over the masked, blinded
batch -> trunk output h -> every objective's loss from h through its head; one forward of the EMA target
encoder over the clean batch (stop-gradient) when vision or world is on. Training weighs the losses and
updates (train/multimodal_step.py); evals score the outputs (eval/objective_scores.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from codex_jax.config.schema import OBJECTIVES, Config, ObjectivesConfig
from codex_jax.model.transformer import Decoder
from codex_jax.objectives import action as action_objective
from codex_jax.objectives import align as align_objective
from codex_jax.objectives import balance
from codex_jax.objectives import mtp as mtp_objective
from codex_jax.objectives import slots as slots_lib
from codex_jax.objectives import vision as vision_objective
from codex_jax.objectives import world as world_objective
from codex_jax.parallel.pipeline import Pipeline
from codex_jax.runtime.forward import trunk_fn


@dataclasses.dataclass(frozen=True)
class Spec:
  """What the step needs to know of the objectives: static, hashable."""

  objectives: ObjectivesConfig
  patches: int  # Positions per image / video chunk: (data.image_size / data.patch_size)^2.
  phases: tuple[tuple[int, balance.BalanceConfig], ...]  # (start step, that phase's tuner config), sorted.
  z_loss: float = 1e-4

  @property
  def enabled(self) -> tuple[str, ...]:
    return self.objectives.enabled

  @property
  def needs_target(self) -> bool:
    return "vision" in self.enabled or "world" in self.enabled


def spec_of(cfg: Config, phase_starts: dict[str, int] | None = None) -> Spec:
  """The step's Spec; `phase_starts` (manifest phase -> start step) switches weights per phase."""
  o = cfg.objectives
  b = o.balance
  tables = o.phase_table()

  def tuner(weights):  # A switched-off objective has no lower share bound (it pulls nothing).
    low = tuple(lo if w > 0 else 0.0 for lo, w in zip(b.low, weights, strict=True))
    settings = {f.name: getattr(b, f.name) for f in dataclasses.fields(b)}
    return balance.BalanceConfig(**{**settings, "low": low}, objectives=OBJECTIVES, weights=tuple(weights))

  phases = [(0, tuner(o.weights))]
  for name, start in sorted((phase_starts or {}).items(), key=lambda kv: kv[1]):
    if start > 0:
      phases.append((start, tuner(tables.get(name, o.weights))))
    elif name in tables:
      phases[0] = (0, tuner(tables[name]))
  patches = (cfg.data.image_size // cfg.data.patch_size) ** 2
  return Spec(o, patches, tuple(phases), cfg.train.z_loss)


def _heads(model: Decoder, params, fn: str, *args):
  return model.apply({"params": params}, *args, method=lambda m, *a: getattr(m.heads, fn)(*a))


def prepare(params, target_params, batch: dict, rng: jax.Array, *, model: Decoder, spec: Spec,
            pipeline: Pipeline | None = None):
  """(layout, online batch, EMA target trunk output or None): everything but the online forward."""
  slots = slots_lib.build(batch, jax.random.fold_in(rng, 0), spec.objectives, spec.patches)
  online = {**batch, "segment_ids": slots.segment_ids_BL, "loss_mask": slots.loss_mask_BL}
  if "vision" in spec.enabled:
    online["masked"] = slots.masked_BL
  h_target = None
  if spec.needs_target:
    merged = {**params, **target_params}  # Heads and unembedding come along unused (apply needs them).
    h_target = jax.lax.stop_gradient(trunk_fn(merged, batch, model=model, pipeline=pipeline))
  return slots, online, h_target


def losses_from_trunk(params, h_BLD, h_target_BLD, batch: dict, online: dict, slots: slots_lib.Slots,
                      rng: jax.Array, *, model: Decoder, spec: Spec, mtp_weight=0.0):
  """(unweighted losses by name, present [5] bool, metrics, outputs for evals) from the trunk output."""
  o, enabled = spec.objectives, spec.enabled
  B, L, D = h_BLD.shape
  h_ND = h_BLD.reshape(B * L, D)
  feats_NF = batch["features"].reshape(B * L, -1)
  losses, present, metrics, outputs = {}, {}, {}, {}

  sums = mtp_objective.head_sums(model, params, h_BLD, online, spec.z_loss)
  losses["text"], text_aux = mtp_objective.loss_from_sums(sums, spec.z_loss, model.cfg.mtp_depth, mtp_weight)
  present["text"] = sums["tokens"] > 0
  metrics |= text_aux

  if "vision" in enabled:
    t_ND = h_target_BLD.reshape(B * L, D)
    idx_CP, masked_C = slots.image_idx_CP, slots.image_masked_C
    pixels_CPX = _heads(model, params, "pixels", h_ND[idx_CP])
    patches_CPX = feats_NF[idx_CP][..., :model.cfg.pixel_dim]
    mae = vision_objective.mae_loss(pixels_CPX, patches_CPX, slots.patch_masked_CP)
    online_CD = _heads(model, params, "vision_latent", slots_lib.grid_mean(h_ND, idx_CP))
    target_CD = slots_lib.grid_mean(t_ND, idx_CP)
    nce = vision_objective.two_view_loss(online_CD, target_CD, masked_C, o.vision.temperature)
    losses["vision"], present["vision"] = mae + nce, jnp.any(masked_C)
    metrics |= {"vision_mae": mae, "vision_nce": nce, "vision_images": jnp.sum(masked_C)}
    outputs["vision"] = {"pixels": pixels_CPX, "targets": vision_objective.normalised_pixels(patches_CPX),
                         "patch_masked": slots.patch_masked_CP, "online": online_CD, "target": target_CD,
                         "valid": masked_C}

  if "align" in enabled:
    cap = o.align.max_pairs
    pool = slots_lib.pool if o.align.pool == "mean" else slots_lib.last
    media_CD = pool(h_ND, slots.pair_slot_N, slots.pair_media_N, cap)
    text_CD = pool(h_ND, slots.pair_slot_N, slots.pair_text_N, cap)
    media_CE, text_CE, log_scale, bias = _heads(model, params, "align_latents", media_CD, text_CD)
    valid_C = slots.pair_valid_C
    losses["align"] = align_objective.loss(o.align.kind, media_CE, text_CE, valid_C, log_scale, bias)
    present["align"] = jnp.sum(valid_C) >= 2  # One pair has no negative: nothing to contrast.
    metrics |= {"align_pairs": jnp.sum(valid_C), "align_log_scale": log_scale}
    outputs["align"] = {"media": media_CE, "text": text_CE, "valid": valid_C,
                        "caption": slots_lib.caption_keys(batch["inputs"].reshape(B * L), slots.pair_slot_N,
                                                           slots.pair_text_N, cap)}

  if "world" in enabled:
    t_ND = h_target_BLD.reshape(B * L, D)
    valid_C = slots.transition_valid_C
    z_CD = slots_lib.grid_mean(h_ND, slots.chunk_idx_CP)
    this_CD, next_CD = slots_lib.grid_mean(t_ND, slots.chunk_idx_CP), slots_lib.grid_mean(t_ND, slots.next_idx_CP)
    pred_CD = _heads(model, params, "world_predict", z_CD, feats_NF[slots.action_pos_C], slots.has_action_C,
                     world_objective.layer_norm(this_CD))
    losses["world"], present["world"] = world_objective.loss(pred_CD, next_CD, valid_C), jnp.any(valid_C)
    metrics |= {"world_target_var": world_objective.target_variance(next_CD, valid_C),
                "world_copy_last": world_objective.copy_last_mse(this_CD, next_CD, valid_C),
                "world_transitions": jnp.sum(valid_C), "world_with_action": jnp.sum(slots.has_action_C)}
    outputs["world"] = {"prediction": pred_CD, "target": world_objective.layer_norm(next_CD),
                        "last": world_objective.layer_norm(this_CD), "valid": valid_C}

  if "action" in enabled:
    A, valid_C = model.cfg.action_dim, slots.act_valid_C
    actions_CTA = feats_NF[slots.act_idx_CT][..., :A]
    cond_CD = h_ND[slots.cond_pos_C]
    k_eps, k_tau = jax.random.split(jax.random.fold_in(rng, 1))
    eps_CTA = jax.random.normal(k_eps, actions_CTA.shape)
    tau_C = jax.random.uniform(k_tau, valid_C.shape)
    x_CTA, velocity_CTA = action_objective.noisy_actions(actions_CTA, eps_CTA, tau_C)
    pred_CTA = _heads(model, params, "action_velocity", cond_CD, x_CTA, tau_C)
    losses["action"], present["action"] = action_objective.loss(pred_CTA, velocity_CTA, valid_C), jnp.any(valid_C)
    metrics |= {"action_chunks": jnp.sum(valid_C)}
    outputs["action"] = {"condition": cond_CD, "actions": actions_CTA, "valid": valid_C}

  present_N = jnp.stack([jnp.asarray(present.get(name, False)) for name in OBJECTIVES])
  metrics |= {f"loss_{name}": value for name, value in losses.items()}
  metrics |= {f"present_{name}": present_N[i].astype(jnp.int32) for i, name in enumerate(OBJECTIVES)}
  metrics |= {f"dropped_{k}": v for k, v in slots.dropped.items()}
  return losses, present_N, metrics, outputs


def objective_outputs(params, target_params, batch: dict, rng: jax.Array, *, model: Decoder, spec: Spec,
                      pipeline: Pipeline | None = None) -> dict:
  """Per-objective losses, present flags and what evals score (latents, predictions, targets) on one batch.

  {"losses": {name: scalar}, "present": [5] bool, "metrics": {...}, "vision": {pixels, targets, patch_masked,
  online, target, valid}, "align": {media, text, valid, caption}, "world": {prediction, target, last, valid},
  "action": {condition, actions, valid}} (keys for the enabled objectives only). Blinding and masking are
  drawn from `rng` as in training.
  """
  slots, online, h_target = prepare(params, target_params, batch, rng, model=model, spec=spec, pipeline=pipeline)
  h_BLD = trunk_fn(params, online, model=model, pipeline=pipeline)
  losses, present_N, metrics, outputs = losses_from_trunk(params, h_BLD, h_target, batch, online, slots, rng,
                                                          model=model, spec=spec)
  return {"losses": losses, "present": present_N, "metrics": metrics, **outputs}


def sample_actions(params, cond_CD: jax.Array, rng: jax.Array, *, model: Decoder, steps: int) -> jax.Array:
  """Action chunks [C, T, A] for observation latents `cond_CD` (the trunk output at the proprio position),
  by `steps` Euler steps of the learned flow from Gaussian noise."""
  cfg = model.cfg
  eps_CTA = jax.random.normal(rng, (cond_CD.shape[0], cfg.action_horizon, cfg.action_dim))
  velocity = lambda x_CTA, tau_C: _heads(model, params, "action_velocity", cond_CD, x_CTA, tau_C)  # noqa: E731
  return action_objective.sample(velocity, eps_CTA, steps)
