"""The multimodal train step: five objectives on one online forward, an EMA target, the loss-weight tuner.

One step: the batch's slot tables (objectives/layout.py) -> one online forward over the masked, blinded
batch -> trunk output h -> every objective's loss from h through its head; one forward of the EMA target
encoder over the clean batch (stop-gradient) when vision or world is on; the total is the tuner's weighted
sum (objectives/balance.py). Every `measure_every` steps the tuner measures |dL_i/d theta_last|, each
unweighted loss's gradient norm on the last block's weights (GradNorm's yardstick for the shared trunk:
`last_block_grad_norms`, one backward per objective through the last block and the heads).
Text-only configs never come here (train/step.py's train_step, unchanged).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from codex_jax.config.schema import OBJECTIVES, Config, ObjectivesConfig, TrainConfig
from codex_jax.model import transformer
from codex_jax.model.transformer import Decoder
from codex_jax.objectives import action as action_objective
from codex_jax.objectives import align as align_objective
from codex_jax.objectives import balance
from codex_jax.objectives import layout as layout_lib
from codex_jax.objectives import mtp as mtp_objective
from codex_jax.objectives import vision as vision_objective
from codex_jax.objectives import world as world_objective
from codex_jax.parallel.mesh import replicated
from codex_jax.parallel.pipeline import Pipeline
from codex_jax.parallel.rules import sharding_scope
from codex_jax.train import accumulate
from codex_jax.train import guard as guard_lib
from codex_jax.train import step as step_lib
from codex_jax.train.state import ObjectiveState


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
    return balance.BalanceConfig(objectives=OBJECTIVES, mode=b.mode, weights=tuple(weights), low=low,
                                 high=b.high, dual_lr=b.dual_lr, ema_decay=b.ema_decay,
                                 measure_every=b.measure_every, slack=b.slack, max_multiplier=b.max_multiplier)

  phases = [(0, tuner(o.weights))]
  for name, start in sorted((phase_starts or {}).items(), key=lambda kv: kv[1]):
    if start > 0:
      phases.append((start, tuner(tables.get(name, o.weights))))
    elif name in tables:
      phases[0] = (0, tuner(tables[name]))
  patches = (cfg.data.image_size // cfg.data.patch_size) ** 2
  return Spec(o, patches, tuple(phases), cfg.train.z_loss)


def ema_update(target: dict, params: dict, decay: float) -> dict:
  """target <- decay * target + (1 - decay) * params, over the target's keys (none: {})."""
  return jax.tree.map(lambda t, p: decay * t + (1.0 - decay) * p.astype(t.dtype), target,
                      {k: params[k] for k in target})


def _heads(model: Decoder, params, fn: str, *args):
  return model.apply({"params": params}, *args, method=lambda m, *a: getattr(m.heads, fn)(*a))


def forward(params, target_params, batch: dict, rng: jax.Array, *, model: Decoder, spec: Spec,
            pipeline: Pipeline | None = None):
  """(layout, online batch, EMA target trunk output or None): everything but the online forward."""
  lay = layout_lib.build(batch, jax.random.fold_in(rng, 0), spec.objectives, spec.patches)
  online = {**batch, "segment_ids": lay.segment_ids_BL, "loss_mask": lay.loss_mask_BL}
  if "vision" in spec.enabled:
    online["masked"] = lay.masked_BL
  h_target = None
  if spec.needs_target:
    merged = {**params, **target_params}  # Heads and unembedding come along unused (apply needs them).
    h_target = jax.lax.stop_gradient(step_lib.trunk_fn(merged, batch, model=model, pipeline=pipeline))
  return lay, online, h_target


def losses_from_trunk(params, h_BLD, h_target_BLD, batch: dict, online: dict, lay: layout_lib.Layout,
                      rng: jax.Array, *, model: Decoder, spec: Spec, mtp_weight=0.0):
  """(unweighted losses by name, present [5] bool, metrics, outputs for evals) from the trunk output."""
  o, enabled = spec.objectives, spec.enabled
  B, L, D = h_BLD.shape
  h_ND = h_BLD.reshape(B * L, D)
  feats_NF = batch["features"].reshape(B * L, -1)
  losses, present, metrics, outputs = {}, {}, {}, {}

  logits_BLV = model.apply({"params": params}, h_BLD, method=Decoder.head)
  mtp_logits = model.apply({"params": params}, h_BLD, online["inputs"], online["segment_ids"], online["positions"],
                           method=Decoder.mtp_logits)
  sums = mtp_objective.loss_sums(logits_BLV, mtp_logits, online)
  losses["text"], text_aux = mtp_objective.loss_from_sums(sums, spec.z_loss, model.cfg.mtp_depth, mtp_weight)
  present["text"] = sums["tokens"] > 0
  metrics |= text_aux

  if "vision" in enabled:
    t_ND = h_target_BLD.reshape(B * L, D)
    idx_CP, masked_C = lay.image_idx_CP, lay.image_masked_C
    pixels_CPX = _heads(model, params, "pixels", h_ND[idx_CP])
    patches_CPX = feats_NF[idx_CP][..., :model.cfg.pixel_dim]
    mae = vision_objective.mae_loss(pixels_CPX, patches_CPX, lay.patch_masked_CP)
    online_CD = _heads(model, params, "vision_latent", layout_lib.grid_mean(h_ND, idx_CP))
    target_CD = layout_lib.grid_mean(t_ND, idx_CP)
    nce = vision_objective.two_view_loss(online_CD, target_CD, masked_C, o.vision.temperature)
    losses["vision"], present["vision"] = mae + nce, jnp.any(masked_C)
    metrics |= {"vision_mae": mae, "vision_nce": nce, "vision_images": jnp.sum(masked_C)}
    outputs["vision"] = {"pixels": pixels_CPX, "targets": vision_objective.normalised_pixels(patches_CPX),
                         "patch_masked": lay.patch_masked_CP, "online": online_CD, "target": target_CD,
                         "valid": masked_C}

  if "align" in enabled:
    cap = o.align.max_pairs
    pool = layout_lib.pool if o.align.pool == "mean" else layout_lib.last
    media_CD = pool(h_ND, lay.pair_slot_N, lay.pair_media_N, cap)
    text_CD = pool(h_ND, lay.pair_slot_N, lay.pair_text_N, cap)
    media_CE, text_CE, log_scale, bias = _heads(model, params, "align_latents", media_CD, text_CD)
    valid_C = lay.pair_valid_C
    losses["align"] = align_objective.loss(o.align.kind, media_CE, text_CE, valid_C, log_scale, bias)
    present["align"] = jnp.sum(valid_C) >= 2  # One pair has no negative: nothing to contrast.
    metrics |= {"align_pairs": jnp.sum(valid_C), "align_log_scale": log_scale}
    outputs["align"] = {"media": media_CE, "text": text_CE, "valid": valid_C,
                        "caption": layout_lib.caption_keys(batch["inputs"].reshape(B * L), lay.pair_slot_N,
                                                           lay.pair_text_N, cap)}

  if "world" in enabled:
    t_ND = h_target_BLD.reshape(B * L, D)
    valid_C = lay.transition_valid_C
    z_CD = layout_lib.grid_mean(h_ND, lay.chunk_idx_CP)
    this_CD, next_CD = layout_lib.grid_mean(t_ND, lay.chunk_idx_CP), layout_lib.grid_mean(t_ND, lay.next_idx_CP)
    pred_CD = _heads(model, params, "world_predict", z_CD, feats_NF[lay.action_pos_C], lay.has_action_C,
                     world_objective.layer_norm(this_CD))
    losses["world"], present["world"] = world_objective.loss(pred_CD, next_CD, valid_C), jnp.any(valid_C)
    metrics |= {"world_target_var": world_objective.target_variance(next_CD, valid_C),
                "world_copy_last": world_objective.copy_last_mse(this_CD, next_CD, valid_C),
                "world_transitions": jnp.sum(valid_C), "world_with_action": jnp.sum(lay.has_action_C)}
    outputs["world"] = {"prediction": pred_CD, "target": world_objective.layer_norm(next_CD),
                        "last": world_objective.layer_norm(this_CD), "valid": valid_C}

  if "action" in enabled:
    A, valid_C = model.cfg.action_dim, lay.act_valid_C
    actions_CTA = feats_NF[lay.act_idx_CT][..., :A]
    cond_CD = h_ND[lay.cond_pos_C]
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
  metrics |= {f"dropped_{k}": v for k, v in lay.dropped.items()}
  return losses, present_N, metrics, outputs


def objective_outputs(params, target_params, batch: dict, rng: jax.Array, *, model: Decoder, spec: Spec,
                      pipeline: Pipeline | None = None) -> dict:
  """Per-objective losses, present flags and what evals score (latents, predictions, targets) on one batch.

  {"losses": {name: scalar}, "present": [5] bool, "metrics": {...}, "vision": {pixels, targets, patch_masked,
  online, target, valid}, "align": {media, text, valid, caption}, "world": {prediction, target, last, valid},
  "action": {condition, actions, valid}} (keys for the enabled objectives only). Blinding and masking are
  drawn from `rng` as in training.
  """
  lay, online, h_target = forward(params, target_params, batch, rng, model=model, spec=spec, pipeline=pipeline)
  h_BLD = step_lib.trunk_fn(params, online, model=model, pipeline=pipeline)
  losses, present_N, metrics, outputs = losses_from_trunk(params, h_BLD, h_target, batch, online, lay, rng,
                                                          model=model, spec=spec)
  return {"losses": losses, "present": present_N, "metrics": metrics, **outputs}


def sample_actions(params, cond_CD: jax.Array, rng: jax.Array, *, model: Decoder, steps: int) -> jax.Array:
  """Action chunks [C, T, A] for observation latents `cond_CD` (the trunk output at the proprio position),
  by `steps` Euler steps of the learned flow from Gaussian noise."""
  cfg = model.cfg
  eps_CTA = jax.random.normal(rng, (cond_CD.shape[0], cfg.action_horizon, cfg.action_dim))
  velocity = lambda x_CTA, tau_C: _heads(model, params, "action_velocity", cond_CD, x_CTA, tau_C)  # noqa: E731
  return action_objective.sample(velocity, eps_CTA, steps)


def last_block_grad_norms(params, online: dict, losses_of_h, *, model: Decoder,
                          pipeline: Pipeline | None = None) -> jax.Array:
  """[5] |d L_i / d theta_last|, each unweighted loss's gradient norm on the last block's parameters (GradNorm's
  yardstick for the shared trunk), on measure steps only: one more trunk forward, with the last block zeroed,
  gives that block's input (stop-gradient; pipelined like the trunk), then one VJP per objective through the
  last block and the heads. `losses_of_h(h_BLD)` gives the losses by name from the last block's output."""
  cfg = model.cfg
  x_BLD = jax.lax.stop_gradient(step_lib.trunk_fn(transformer.with_last_block_zeroed(params, cfg.num_layers),
                                                  online, model=model, pipeline=pipeline))
  block = transformer.Block(cfg)
  through_last = lambda p: losses_of_h(  # noqa: E731
      block.apply({"params": p}, x_BLD, online["segment_ids"], online["positions"])[0])
  last = transformer.block_params(params, cfg.num_layers)[-1]  # The other slices are dead code under jit.
  return balance.trunk_grad_norms(through_last, last, lambda g: g, OBJECTIVES)


def _phase(step: jax.Array, spec: Spec) -> tuple[jax.Array, jax.Array]:
  """(index of the phase at `step`, whether `step` starts a later phase)."""
  starts = jnp.asarray([start for start, _ in spec.phases])
  return jnp.sum(step >= starts) - 1, jnp.any((step == starts) & (starts > 0))


def _tune(state: ObjectiveState, norms_N, present_N, spec: Spec):
  """(balance state, metrics): a dual step on the measured norms on measure steps, else the shares as they are."""
  phase, _ = _phase(state.step, spec)
  cfg0 = spec.phases[0][1]

  def measure(bstate):
    branches = [functools.partial(balance.update, cfg=c) for _, c in spec.phases]
    new, metrics = jax.lax.switch(phase, branches, bstate, norms_N, present_N)
    return new, metrics | {"balance_measured": jnp.ones((), jnp.int32)}

  def skip(bstate):
    share_N = balance.shares(bstate.weights_N, bstate.norm_ema_N, present_N)
    return bstate, balance.metrics(bstate, share_N, cfg0) | {"balance_measured": jnp.zeros((), jnp.int32)}

  return jax.lax.cond(balance.is_measure_step(state.step, cfg0), measure, skip, state.balance)


def train_step(state: ObjectiveState, batch: dict, *, model: Decoder, tx: optax.GradientTransformation,
               schedule: optax.Schedule, train: TrainConfig, spec: Spec,
               pipeline: Pipeline | None = None) -> tuple[ObjectiveState, dict]:
  """One guarded AdamW update on the tuner's weighted sum of the objectives; then the EMA target and tuner.

  The batch's k = rows / train.micro_batch micro-batches (train/accumulate.py) each run their own layout,
  EMA-target and online forwards and, on measure steps, their own trunk-gradient-norm measurement; the
  gradients and norms are averaged (a norm over the micro-batches where its objective is present), the
  present flags OR-ed, and the update takes one tuner step, one optimizer step and one EMA-target step.
  """
  step_rng = jax.random.fold_in(state.rng, state.step)
  phase, starts_phase = _phase(state.step, spec)
  w0_PN = jnp.asarray([c.weights for _, c in spec.phases], jnp.float32)
  bstate = jax.tree.map(  # A new phase: its configured weights under the multipliers and norm EMA it inherits.
      lambda new, old: jnp.where(starts_phase, new, old),
      state.balance.replace(weights_N=balance.phase_weights(w0_PN[phase], state.balance)), state.balance)
  lam, k = step_lib.mtp_weight(train, state.step), accumulate.count(batch, train.micro_batch)
  measuring = balance.is_measure_step(state.step, spec.phases[0][1])

  def micro(mb: dict, index):
    rng = accumulate.micro_key(step_rng, index, k)
    lay, online, h_target = forward(state.params, state.target_params, mb, rng, model=model, spec=spec,
                                    pipeline=pipeline)

    def objective(params):
      h_BLD = step_lib.trunk_fn(params, online, model=model, pipeline=pipeline, rng=rng)
      losses, present_N, metrics, _ = losses_from_trunk(params, h_BLD, h_target, mb, online, lay, rng,
                                                        model=model, spec=spec, mtp_weight=lam)
      return balance.weighted_loss(losses, present_N, bstate), (metrics, present_N)

    (loss, (aux, present_N)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    losses_of_h = lambda h: losses_from_trunk(  # noqa: E731
        state.params, h, h_target, mb, online, lay, rng, model=model, spec=spec, mtp_weight=lam)[0]
    measure = functools.partial(last_block_grad_norms, online=online, losses_of_h=losses_of_h, model=model,
                                pipeline=pipeline)
    norms_N = jax.lax.cond(measuring, measure, lambda p: jnp.zeros((len(OBJECTIVES),), jnp.float32), state.params)
    aux = {name: v for name, v in aux.items() if not name.startswith("present_")}  # From the OR-ed flags below.
    return loss, aux, grads, jnp.where(present_N, norms_N, 0.0), present_N.astype(jnp.int32)

  loss, aux, grads, norms_N, present_count_N = accumulate.accumulate(micro, batch, k)
  present_N = present_count_N > 0
  if k > 1:  # The mean over the micro-batches where each objective is present.
    norms_N = norms_N * k / jnp.maximum(present_count_N, 1)
  aux |= {f"present_{name}": present_N[i].astype(jnp.int32) for i, name in enumerate(OBJECTIVES)}
  new_balance, balance_metrics = _tune(state.replace(balance=bstate), norms_N, present_N, spec)
  # A new phase's weights rescale the total loss (e.g. 0.6 -> 10 when tuned weights reset to w0): the guard's
  # window of past totals would read it as a spike and skip every step, so the window restarts with the phase.
  restarted = state.guard.replace(losses_W=jnp.zeros_like(state.guard.losses_W), count=jnp.zeros_like(state.guard.count),
                                  next=jnp.zeros_like(state.guard.next))
  state = state.replace(guard=jax.tree.map(lambda new, old: jnp.where(starts_phase, new, old), restarted, state.guard))
  new_state, metrics, bad = step_lib.apply_update(state, loss, aux, grads, tx=tx, schedule=schedule, train=train)
  target = ema_update(state.target_params, new_state.params, spec.objectives.world.ema_decay)
  target, new_balance = guard_lib.keep_if_bad(bad, (state.target_params, bstate), (target, new_balance))
  return new_state.replace(target_params=target, balance=new_balance), metrics | balance_metrics


def jit_objective_outputs(model: Decoder, spec: Spec, shardings: ObjectiveState, batch_sharding, mesh, rules,
                          pipeline: Pipeline | None = None):
  """objective_outputs jitted once: (params, target_params, batch, rng) -> its dict, replicated."""
  def ruled(params, target_params, batch, rng):
    with sharding_scope(mesh, rules):
      return objective_outputs(params, target_params, batch, rng, model=model, spec=spec, pipeline=pipeline)

  return jax.jit(ruled, in_shardings=(shardings.params, shardings.target_params, batch_sharding, replicated(mesh)),
                 out_shardings=replicated(mesh))
