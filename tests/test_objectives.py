"""The five objectives: each loss against NumPy on hand-made inputs, the slot tables of a hand-made packed
batch, gradient flow (null action gets gradient, the EMA target none), absent objectives contribute nothing,
the align loss sharded over 8 devices equals one device, a multimodal train step with the tuner, and config
refusals."""

import dataclasses
import functools
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from codex_jax.config.errors import ConfigError
from codex_jax.config.schema import OBJECTIVES
from codex_jax.objectives import action, align, text, vision, world
from codex_jax.objectives import slots as slots_lib
from codex_jax.parallel.mesh import build_mesh
from codex_jax.runtime import feed, forward, multimodal
from codex_jax.runtime.engine import build_engine
from codex_jax.train import step as step_lib
from codex_jax.train.setup import build_trainer
from tests.helpers import MICRO, load
from tests.objective_batch import ACTION, IMAGE, PROPRIO, TEXT, VIDEO, make_batch

ALL = (1.0, 1.0, 1.0, 1.0, 1.0)
PATCHES = 4  # data.image_size 8 / data.patch_size 4 -> 2 x 2 patches per image / frame.
# Small and quick to compile: no remat, whole attention.
MM = {**MICRO, "data.image_size": 8, "model.remat": "none", "model.attention_chunks": 1, "objectives.weights": ALL,
      "objectives.action.horizon": 2, "objectives.balance.measure_every": 2, "objectives.align.blind_fraction": 1.0}


def _np_normalise(x):
  return x / np.sqrt(np.sum(x * x, -1, keepdims=True) + 1e-6)


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


# Losses against NumPy.

def test_mae_loss_uses_per_patch_normalised_pixels_over_masked_patches_only():
  rng = np.random.default_rng(0)
  pred, patches = rng.normal(size=(3, 4, 6)), rng.uniform(-1, 1, (3, 4, 6))
  masked = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 0]], bool)
  target = (patches - patches.mean(-1, keepdims=True)) / np.sqrt(patches.var(-1, keepdims=True) + 1e-6)
  want = np.mean(((pred - target) ** 2).mean(-1)[masked])
  np.testing.assert_allclose(vision.mae_loss(pred, patches, masked), want, rtol=1e-5)
  assert float(vision.mae_loss(pred, patches, np.zeros_like(masked))) == 0.0


def test_two_view_infonce_matches_numpy_and_ignores_invalid_images():
  rng = np.random.default_rng(1)
  online, target = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
  valid = np.array([True, True, False, True])
  logits = _np_normalise(online) @ _np_normalise(target).T / 0.1
  keep = np.flatnonzero(valid)
  want = -np.mean(np.diag(_np_log_softmax(logits[np.ix_(keep, keep)])))
  np.testing.assert_allclose(vision.two_view_loss(online, target, valid, 0.1), want, rtol=1e-5)


def test_clip_and_siglip_losses_match_numpy():
  rng = np.random.default_rng(2)
  media, text = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
  valid = np.array([True, False, True, True, True])
  keep = np.flatnonzero(valid)
  sim = (_np_normalise(media) @ _np_normalise(text).T)[np.ix_(keep, keep)]
  log_scale, bias = 1.5, -2.0
  logits = np.exp(log_scale) * sim
  want_clip = -0.5 * (np.mean(np.diag(_np_log_softmax(logits))) + np.mean(np.diag(_np_log_softmax(logits.T))))
  np.testing.assert_allclose(align.loss("clip", media, text, valid, log_scale, bias), want_clip, rtol=1e-5)
  labels = 2 * np.eye(len(keep)) - 1
  z = labels * (logits + bias)
  want_siglip = np.mean(np.sum(np.log1p(np.exp(-z)), axis=1))
  np.testing.assert_allclose(align.loss("siglip", media, text, valid, log_scale, bias), want_siglip, rtol=1e-5)


def test_world_loss_target_variance_and_copy_last_match_numpy():
  rng = np.random.default_rng(3)
  pred, this, nxt = rng.normal(size=(4, 6)), rng.normal(size=(4, 6)), rng.normal(size=(4, 6)) * 3 + 1
  valid = np.array([True, True, True, False])
  ln = lambda x: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)  # noqa: E731
  np.testing.assert_allclose(world.loss(pred, nxt, valid), np.mean(((pred - ln(nxt)) ** 2).mean(-1)[valid]),
                             rtol=1e-5)
  np.testing.assert_allclose(world.target_variance(nxt, valid), np.mean(ln(nxt)[valid].var(0)), rtol=1e-5)
  np.testing.assert_allclose(world.copy_last_mse(this, nxt, valid),
                             np.mean(((ln(this) - ln(nxt)) ** 2).mean(-1)[valid]), rtol=1e-5)


def test_flow_matching_targets_loss_and_euler_sampler():
  rng = np.random.default_rng(4)
  a, eps, tau = rng.normal(size=(3, 2, 1)), rng.normal(size=(3, 2, 1)), np.array([0.0, 0.3, 1.0])
  x, v = action.noisy_actions(a, eps, tau)
  np.testing.assert_allclose(x, (1 - tau[:, None, None]) * eps + tau[:, None, None] * a, rtol=1e-6)
  np.testing.assert_allclose(v, a - eps, rtol=1e-6)
  pred, valid = rng.normal(size=(3, 2, 1)), np.array([True, False, True])
  np.testing.assert_allclose(action.loss(pred, a - eps, valid), np.mean(((pred - (a - eps)) ** 2).mean((1, 2))[valid]),
                             rtol=1e-5)
  # The exact velocity of the straight path to `a` carries the noise onto `a` in any number of Euler steps.
  exact = lambda x_CTA, tau_C: (a - x_CTA) / (1 - tau_C[:, None, None])  # noqa: E731
  np.testing.assert_allclose(action.sample(exact, eps, 7), a, rtol=1e-4, atol=1e-5)


def test_align_loss_over_eight_data_sharded_devices_equals_one_device():
  rng = np.random.default_rng(5)
  media, text = rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=(16, 8)).astype(np.float32)
  valid = rng.uniform(size=16) < 0.8
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))  # As parallel/mesh.py builds it.
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))  # noqa: E731
  for kind in ("clip", "siglip"):
    fn = jax.jit(lambda m, t, v, kind=kind: align.loss(kind, m, t, v, 2.0, -1.0))
    sharded = fn(shard(media), shard(text), shard(valid))
    one = fn(*(jax.device_put(x, jax.devices()[0]) for x in (media, text, valid)))
    assert len(shard(media).sharding.device_set) == 8
    np.testing.assert_allclose(sharded, one, rtol=1e-6)


def _text_loss_inputs(B=4, L=48, D=16, V=300, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  return (jax.random.normal(keys[0], (B, L, D)), jax.random.normal(keys[1], (D, V)) * 0.3,
          jax.random.randint(keys[2], (B, L), 0, V), (jax.random.uniform(keys[3], (B, L)) > 0.2).astype(jnp.float32))


@pytest.mark.parametrize("chunk", [1, 16, 48, 100])  # 100: not a divisor of 48, so its gcd (4) is used.
def test_the_chunked_cross_entropy_has_the_full_logits_loss_and_gradients(chunk):
  h, w, targets, mask = _text_loss_inputs()
  z_loss = 1e-2  # Large enough that the z-loss term moves the gradient.

  def full(h, w):
    return text.loss_from_sums(text.next_token_sums(jnp.einsum("BLD,DV->BLV", h, w), targets, mask), z_loss)

  def chunked(h, w):
    return text.loss_from_sums(text.projected_sums(h, w, targets, mask, z_loss=z_loss, chunk=chunk), z_loss)

  (want, want_aux), want_grads = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(h, w)
  (got, got_aux), got_grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True))(h, w)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for name in ("ce_loss", "z_loss", "tokens"):
    np.testing.assert_allclose(got_aux[name], want_aux[name], rtol=1e-6)
  for g, w_ in zip(got_grads, want_grads, strict=True):
    np.testing.assert_allclose(g, w_, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(w_))))
  top = text.projected_sums(h, w, targets, mask, z_loss=z_loss, chunk=chunk)["top"]
  np.testing.assert_array_equal(top, jnp.argmax(jnp.einsum("BLD,DV->BLV", h, w), axis=-1))


def test_the_chunked_cross_entropy_never_holds_the_whole_logits():
  B, L, D, V = 4, 256, 16, 4096
  h, w, targets, mask = _text_loss_inputs(B, L, D, V)
  grad = lambda f: jax.jit(jax.grad(f, argnums=(0, 1))).lower(h, w).compile().memory_analysis().temp_size_in_bytes
  full = grad(lambda h, w: text.next_token_sums(jnp.einsum("BLD,DV->BLV", h, w), targets, mask)["ce_sum"])
  chunked = grad(lambda h, w: text.projected_sums(h, w, targets, mask, z_loss=0.0, chunk=32)["ce_sum"])
  logits_bytes = B * L * V * 4
  assert full >= logits_bytes and chunked < logits_bytes / 2, (full, chunked, logits_bytes)


def test_the_chunked_cross_entropy_over_a_vocab_sharded_mesh_equals_one_device():
  h, w, targets, mask = _text_loss_inputs(B=8, V=512)
  mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
  loss = jax.jit(jax.value_and_grad(lambda h, w: text.projected_sums(h, w, targets, mask, z_loss=1e-4, chunk=16)[
      "ce_sum"], argnums=(0, 1)))
  sharded = loss(jax.device_put(h, NamedSharding(mesh, P("data"))), jax.device_put(w, NamedSharding(mesh, P(None, "tensor"))))
  one = loss(h, w)
  np.testing.assert_allclose(sharded[0], one[0], rtol=1e-6)
  for a, b in zip(sharded[1], one[1], strict=True):  # Sums over other shard orders: float rounding only.
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


# The slot tables of a hand-made packed batch.

def _slots(batch, cfg, seed=0):
  arrays = {k: jnp.asarray(v) for k, v in batch.items()}
  build = jax.jit(lambda b, rng: slots_lib.build(b, rng, cfg.objectives, PATCHES))
  return jax.device_get(build(arrays, jax.random.PRNGKey(seed)))


def test_slots_mask_images_blinds_captions_and_finds_chunks_and_actions():
  cfg = load("tiny", **{**MM, "objectives.vision.masked_fraction": 1.0, "objectives.align.blind_fraction": 1.0})
  batch = make_batch(4, 32, 96, PATCHES, 256)
  slots = _slots(batch, cfg)
  # Images: rows 0 (two) and 1 (one), all masked, 3 of 4 patches each (mask_ratio 0.75).
  assert slots.image_valid_C.sum() == 3 and slots.image_masked_C.sum() == 3
  assert slots.patch_masked_CP[slots.image_valid_C].sum(1).tolist() == [3, 3, 3]
  assert slots.masked_BL.sum() == 9 and np.all(batch["modality_ids"][slots.masked_BL] == IMAGE)
  # Align pairs: the two image+caption segments of row 0, the clip and image of row 1; all blind.
  assert slots.pair_blind_C.sum() == 4
  seg0 = slots.segment_ids_BL[0]
  assert seg0[:4].tolist() == [2] * 4 and seg0[4:9].tolist() == [3] * 5  # Image 2s, caption 2s + 1.
  assert seg0[18:24].tolist() == [6] * 6  # Plain text keeps 2s.
  assert slots.loss_mask_BL[0, 3] == 0 and batch["loss_mask"][0, 3] == 1  # The split-crossing target dropped.
  assert np.array_equal(slots.loss_mask_BL[0, 4:8], batch["loss_mask"][0, 4:8])
  # Masked images are not aligned: only the clip (row 1, never masked) is a valid pair.
  assert slots.pair_valid_C.sum() == 1
  # World: clip chunks 0 -> 1 (null action); embodied frames 0 -> 1 -> 2 with the action between.
  assert slots.transition_valid_C.sum() == 3 and slots.has_action_C.sum() == 2
  flat_mods = batch["modality_ids"].reshape(-1)
  assert np.all(flat_mods[slots.action_pos_C[slots.has_action_C]] == ACTION)
  assert np.all(flat_mods[slots.chunk_idx_CP[slots.transition_valid_C]] == VIDEO)
  # Actions: horizon 2 over 3 actions of one window -> 2 chunks, each conditioned on the proprio before it.
  assert slots.act_valid_C.sum() == 2
  assert np.all(flat_mods[slots.cond_pos_C[slots.act_valid_C]] == PROPRIO)
  assert np.all(flat_mods[slots.act_idx_CT[slots.act_valid_C]] == ACTION)
  assert all(int(v) == 0 for v in slots.dropped.values())


def test_align_last_pooling_takes_each_pairs_last_media_and_last_caption_position():
  cfg = load("tiny", **{**MM, "objectives.align.blind_fraction": 1.0})
  batch = make_batch(4, 32, 96, PATCHES, 256)
  slots = _slots(batch, cfg)
  n = batch["modality_ids"].size
  index_ND = jnp.arange(n, dtype=jnp.float32)[:, None]  # h = the position's own index.
  cap, slot = cfg.objectives.align.max_pairs, slots.pair_slot_N
  media = np.asarray(slots_lib.last(index_ND, slot, slots.pair_media_N, cap))[:, 0].astype(int)
  text = np.asarray(slots_lib.last(index_ND, slot, slots.pair_text_N, cap))[:, 0].astype(int)
  mean_text = np.asarray(slots_lib.pool(index_ND, slot, slots.pair_text_N, cap))[:, 0]
  slot_N, mods_N = np.asarray(slot), batch["modality_ids"].reshape(-1)
  for c in np.nonzero(np.asarray(slots.pair_blind_C))[0]:
    mine = np.nonzero(slot_N == c)[0]
    want_media = mine[np.isin(mods_N[mine], (IMAGE, VIDEO))].max()
    want_text = mine[mods_N[mine] == TEXT].max()
    assert (media[c], text[c]) == (want_media, want_text)
    assert mean_text[c] == pytest.approx(mine[mods_N[mine] == TEXT].mean())  # mean: all of the caption.


def test_slots_of_unblinded_pairs_keep_segments_and_overflow_goes_to_the_trash_slot():
  cfg = load("tiny", **{**MM, "objectives.align.blind_fraction": 0.0, "objectives.vision.max_images": 2,
                        "objectives.world.max_chunks": 3})
  batch = make_batch(4, 32, 96, PATCHES, 256)
  slots = _slots(batch, cfg)
  assert np.array_equal(slots.segment_ids_BL, batch["segment_ids"] * 2)
  assert np.array_equal(slots.loss_mask_BL, batch["loss_mask"])
  assert slots.pair_valid_C.sum() == 0
  assert int(slots.dropped["images"]) == 1 and slots.image_valid_C.sum() == 2
  assert int(slots.dropped["chunks"]) == 2  # 5 chunks (2 clip + 3 frames) into 3 slots.
  assert slots.transition_valid_C.sum() == 1  # Clip 0 -> 1 only: frame 1's successor went to the trash.


# The model: gradient flow, absent objectives, a train step (one compiled step serves every test below).

@pytest.fixture(scope="module")
def trainer():
  cfg = load("tiny", num_devices=1, **MM)
  mesh = build_mesh(cfg.mesh, jax.devices()[:1])
  trainer = build_trainer(cfg, mesh, phase_starts={"main": 0, "anneal": 3})
  return cfg, mesh, trainer, trainer.init_state()


def _step(trainer, rows, state=None):
  """(state before, state after, metrics) of one step from a copy of `state` (default: the fixture's)."""
  cfg, _, tr, init = trainer
  state = jax.tree.map(jnp.copy, init if state is None else state)  # The original survives the donation.
  before = jax.device_get(state)
  after, metrics = tr.train_step(state, feed.to_global(rows, tr.engine.data_sharding))
  return before, after, jax.device_get(metrics)


def _adam_mu(state):
  """Adam's first moment, (1 - b1) * gradient after one step: where the gradient went."""
  return next(s.mu for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu"))


@pytest.mark.slow  # Compile-heavy: make test, not test-fast.
def test_null_action_gets_gradient_on_clips_and_the_target_encoder_only_its_ema(trainer):
  clips = make_batch(8, 32, 96, PATCHES, 256, layout=[[[VIDEO] * 12 + [TEXT] * 3]])
  _, after, metrics = _step(trainer, clips)
  assert metrics["present_world"] == 1 and metrics["world_with_action"] == 0 and metrics["skipped"] == 0
  mu = jax.device_get(_adam_mu(after))["objectives"]
  assert np.abs(mu["null_action_embedding"]).sum() > 0
  assert np.abs(mu["action_in"]["w"]).sum() == 0  # No action in a clip.
  # The target encoder is no parameter (no gradient, no optimizer state): only the EMA moves it.
  assert "target_params" not in str(jax.tree_util.tree_structure(after.opt_state))


@pytest.mark.slow  # Compile-heavy: make test, not test-fast.
def test_the_tuner_measures_each_loss_on_the_last_blocks_weights(trainer):
  """GradNorm's yardstick: the norms a measure step logs (its first measurement, so the EMA is the norm itself)
  equal the last layer's slice of each loss's full gradient (jax.grad through the whole model, on the
  step's own slot draw), for all five objectives."""
  _, _, tr, state = trainer
  rows = make_batch(8, 32, 96, PATCHES, 256)
  _, _, metrics = _step(trainer, rows)  # Step 0: a measure step.
  got_N = np.array([metrics[f"balance_trunk_grad_norm_{name}"] for name in OBJECTIVES])
  batch = {k: jnp.asarray(v) for k, v in rows.items()}
  rng, model, spec = jax.random.fold_in(state.rng, 0), tr.engine.model, tr.engine.spec  # The step's key (one micro-batch).
  slots, online, h_target = multimodal.prepare(state.params, state.target_params, batch, rng, model=model,
                                                 spec=spec)

  def losses_N(params):
    h_BLD = forward.trunk_fn(params, online, model=model)
    losses = multimodal.losses_from_trunk(params, h_BLD, h_target, batch, online, slots, rng, model=model,
                                              spec=spec)[0]
    return jnp.stack([losses[name] for name in OBJECTIVES])

  # One jax.grad per loss, not jax.jacrev: a vmapped backward is what XLA:CPU miscompiled at larger shapes
  # (docs/objectives.md, "A miscompiled vmap").
  grads = jax.jit(lambda p: [jax.grad(lambda q, i=i: losses_N(q)[i])(p)["layers"] for i in range(len(OBJECTIVES))])
  want_N = np.array([np.sqrt(sum(np.sum(np.square(g[-1])) for g in jax.tree.leaves(layer_grads)))
                     for layer_grads in jax.device_get(grads(state.params))])
  assert np.all(want_N > 0), want_N
  np.testing.assert_allclose(got_N, want_N, rtol=1e-4)


def test_text_only_batch_gives_the_text_only_loss_and_nothing_else(trainer):
  cfg, mesh, tr, state = trainer
  text = make_batch(8, 32, 96, PATCHES, 256, layout=[[[TEXT] * 20, [TEXT] * 12]])
  _, after, metrics = _step(trainer, text)
  text_cfg = load("tiny", num_devices=1, **{**MM, "objectives.weights": (1.0, 0, 0, 0, 0)})
  text_model = build_engine(text_cfg, mesh).model
  plain = {k: v for k, v in state.params.items() if k != "objectives"}
  batch = {k: jnp.asarray(v) for k, v in text.items()}
  want, _ = jax.jit(lambda p, b: step_lib.loss_fn(p, b, model=text_model, z_loss=text_cfg.train.z_loss))(plain, batch)
  np.testing.assert_allclose(metrics["loss"], want, rtol=1e-6)  # Weight 1 on text: the text-only loss exactly.
  assert [metrics[f"present_{k}"] for k in ("text", "vision", "align", "world", "action")] == [1, 0, 0, 0, 0]
  assert all(metrics[f"loss_{k}"] == 0 for k in ("vision", "align", "world", "action"))
  assert all(np.abs(g).max() == 0 for g in jax.tree.leaves(jax.device_get(_adam_mu(after))["objectives"]))


def test_multimodal_train_step_updates_ema_exactly_and_moves_the_tuner(trainer):
  cfg, _, tr, _ = trainer
  rows = make_batch(8, 32, 96, PATCHES, 256)
  before, state, metrics = _step(trainer, rows)  # Step 0: a measure step (measure_every 2).
  after = jax.device_get(state)
  assert all(metrics[f"present_{k}"] == 1 for k in ("text", "vision", "align", "world", "action")), metrics
  assert all(np.isfinite(metrics[f"loss_{k}"]) and metrics[f"loss_{k}"] > 0
             for k in ("text", "vision", "align", "world", "action"))
  assert metrics["balance_measured"] == 1 and metrics["skipped"] == 0
  assert np.all(after.balance.measured_N == 1) and not np.allclose(after.balance.weights_N, 1.0)
  decay = cfg.objectives.world.ema_decay
  want = jax.tree.map(lambda t, p: decay * t + (1 - decay) * p, before.target_params,
                      {k: after.params[k] for k in before.target_params})
  chex.assert_trees_all_close(after.target_params, want, rtol=1e-6)
  batch = feed.to_global(rows, tr.engine.data_sharding)
  for _ in range(2):  # Steps 1-2: step 1 does not measure; step 2 measures again.
    state, metrics = tr.train_step(state, batch)
  assert jax.device_get(state.balance.measured_N).tolist() == [2] * 5
  before = jax.device_get(state.balance)
  state, metrics = tr.train_step(state, batch)  # Step 3 opens the "anneal" phase: its w0 under the multipliers.
  assert jax.device_get(metrics["balance_measured"]) == 0
  w0_N = np.asarray(cfg.objectives.weights)  # No phase_weights: anneal keeps the configured weights.
  carried_N = w0_N * np.exp(before.lam_low_N - before.lam_high_N)
  assert np.any(before.lam_low_N > 0) or np.any(before.lam_high_N > 0)  # So the carried weights are not w0.
  np.testing.assert_allclose(jax.device_get(state.balance.weights_N), carried_N * w0_N.sum() / carried_N.sum(),
                             rtol=1e-5)
  chex.assert_trees_all_equal(state.balance.lam_low_N, before.lam_low_N)
  assert int(state.guard.count) == 1  # The spike window restarted with the phase (its losses were on old weights).
  engine = tr.engine
  outputs = engine.jit(functools.partial(multimodal.objective_outputs, model=engine.model, spec=engine.spec), (
      engine.param_shardings, engine.target_shardings, engine.data_sharding, engine.replicated))(
      state.params, state.target_params, batch, jax.random.PRNGKey(1))
  assert outputs["align"]["media"].shape == (cfg.objectives.align.max_pairs, cfg.objectives.align.dim)
  assert float(outputs["losses"]["world"]) > 0 and outputs["action"]["valid"].sum() == 4
  sampled = multimodal.sample_actions(state.params, outputs["action"]["condition"][:3], jax.random.PRNGKey(2),
                                          model=tr.engine.model, steps=cfg.objectives.action.sample_steps)
  assert sampled.shape == (3, 2, 1) and bool(jnp.all(jnp.isfinite(sampled)))


@pytest.mark.slow  # Compile-heavy: make test, not test-fast.
def test_an_accumulated_multimodal_step_updates_tuner_optimizer_and_target_once(trainer):
  """16 rows through the fixture's step, whose micro-batch is train.global_batch = 8 rows: k = 2 micro-batches,
  each with its own slot tables, forwards and trunk-norm measurement, then one tuner, optimizer and EMA step."""
  cfg, _, _, _ = trainer
  rows = make_batch(16, 32, 96, PATCHES, 256)
  before, state, metrics = _step(trainer, rows)  # Step 0: a measure step.
  after = jax.device_get(state)
  assert int(after.step) == 1 and metrics["skipped"] == 0 and metrics["balance_measured"] == 1
  assert after.balance.measured_N.tolist() == [1] * 5  # One tuner update per update, not one per micro-batch.
  assert all(metrics[f"present_{k}"] == 1 for k in ("text", "vision", "align", "world", "action"))  # OR-ed.
  assert all(np.isfinite(metrics[f"loss_{k}"]) and metrics[f"loss_{k}"] > 0
             for k in ("text", "vision", "align", "world", "action"))
  assert not np.allclose(after.balance.weights_N, 1.0)
  decay = cfg.objectives.world.ema_decay
  want = jax.tree.map(lambda t, p: decay * t + (1 - decay) * p, before.target_params,
                      {k: after.params[k] for k in before.target_params})
  chex.assert_trees_all_close(after.target_params, want, rtol=1e-6)  # One EMA step.
  has_count = lambda x: "count" in getattr(x, "_fields", ())  # noqa: E731  (optax states are NamedTuples)
  counts = [int(s.count) for s in jax.tree.leaves(after.opt_state, is_leaf=has_count) if has_count(s)]
  assert counts and all(c == 1 for c in counts)  # Adam's (and the schedule's) count: one optimizer update.


# Config.

@pytest.mark.parametrize("override, words", [
    ({"objectives.weights": (1.0, 1.0)}, ["objectives.weights", "5 weights"]),
    ({"objectives.vision.mask_ratio": 1.5}, ["objectives.vision.mask_ratio=1.5", "(0, 1)"]),
    ({"objectives.align.kind": "cosine"}, ["objectives.align.kind='cosine'", "clip"]),
    ({"objectives.align.pool": "max"}, ["objectives.align.pool='max'", "last"]),
    ({"objectives.action.dim": 200}, ["objectives.action.dim=200", "feature_dim=96"]),
    ({"objectives.balance.mode": "auto"}, ["objectives.balance.mode='auto'"]),
    ({"objectives.balance.low": (0.3,) * 5}, ["objectives.balance.low=(0.3,", "sum to at most 1, not 1.5"]),
    ({"objectives.balance.low": (0.35, 0.1, 0.1, 0.1, 0.1), "objectives.balance.high": (0.3, 0.4, 0.4, 0.4, 0.4)},
     ["objectives.balance.low[0]=0.35", "objectives.balance.high[0]=0.3"]),
    ({"objectives.vision.max_images": 0}, ["objectives.vision.max_images=0", "at least 1"]),
    ({"mesh.pipeline": 2, "mesh.schedule": "1f1b", "model.num_layers": 2},
     ["objectives.weights", "1f1b"]),
])
def test_bad_objective_configs_are_refused_naming_key_and_value(override, words):
  with pytest.raises(ConfigError) as error:
    load("tiny", **{**MM, **override})
  assert all(w in str(error.value) for w in words), str(error.value)


def test_text_only_config_builds_no_heads_and_keeps_the_plain_state():
  cfg = load("tiny", **MICRO)
  assert cfg.model.objectives == () and not cfg.objectives.multimodal
  mm = load("tiny", **MM)
  assert mm.model.objectives == ("vision", "align", "world", "action") and mm.model.pixel_dim == 48
  assert dataclasses.replace(mm.objectives, weights=(1.0, 0, 0, 0, 0)).enabled == ("text",)


def test_a_workdir_from_before_the_objectives_group_resumes_text_only():
  from codex_jax.config.load import resume_conflicts
  from tests.helpers import config_dict
  current = config_dict("tiny")  # Text only (tests/helpers.py).
  saved = {k: v for k, v in current.items() if k != "objectives"}
  assert resume_conflicts(saved, current) == []
  multimodal = config_dict("tiny", **{"objectives.weights": ALL})
  assert [line.split(":")[0] for line in resume_conflicts(saved, multimodal)] == ["objectives.weights"]


def test_the_console_line_leads_with_the_text_ce_and_shows_each_objective_and_the_weighted_total(
    trainer, tmp_path, caplog):
  """The weighted total moves with the tuner's weights (it rose while every objective fell in a real run), so
  the step's log line leads with the text cross-entropy, then each objective's loss and weight."""
  import logging

  from codex_jax.telemetry import peak
  from codex_jax.telemetry.progress import Progress
  from codex_jax.telemetry.writer import MetricsWriter
  from codex_jax.train.report import Reporter

  _, _, metrics = _step(trainer, make_batch(8, 32, 96, PATCHES, 256))
  reporter = Reporter(MetricsWriter(str(tmp_path)), Progress(10, 0, 256, enabled=False), seq_len=32,
                      flops_per_token=1.0, xla_flops_per_row=None, peak_flops=peak.PeakFlops(1e9, 1e9, "table:x"),
                      log_every=1)
  with caplog.at_level(logging.INFO):
    reporter.step(1, metrics, None, None, rows=8)
  reporter.close()
  (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 1 ")]
  assert line.startswith(f"step 1 text_ce {metrics['ce_loss']:.4f} (w ")
  for name in ("vision", "align", "world", "action"):
    assert f" {name} {metrics[f'loss_{name}']:.4g} (w {metrics[f'balance_weight_{name}']:.2f})" in line, name
  assert f"weighted total {metrics['loss']:.4f}" in line and metrics["loss"] != metrics["ce_loss"]


GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "multimodal_step.json")


def test_golden_multimodal_train_steps(trainer):
  """Three steps of the five-objective step (`make train`'s) on the hand-made batch: each objective's loss, the
  weighted total, the tuner's weights (it measures at steps 0 and 2), gradient norms and the parameter sum.
  Regenerate after an intended numerics change: CODEX_UPDATE_GOLDEN=1 pytest tests/test_objectives.py -k golden."""
  _, _, tr, init = trainer
  state, rows = jax.tree.map(jnp.copy, init), make_batch(8, 32, 96, PATCHES, 256, seed=3)
  history = []
  for _ in range(3):
    state, metrics = tr.train_step(state, feed.to_global(rows, tr.engine.data_sharding))
    history.append(jax.device_get(metrics))
  got = {"loss": [float(m["loss"]) for m in history], "grad_norm": [float(m["grad_norm"]) for m in history],
         **{f"loss_{name}": [float(m[f"loss_{name}"]) for m in history] for name in OBJECTIVES},
         "weights": jax.device_get(state.balance.weights_N).tolist(),
         "param_sum": float(sum(np.sum(np.asarray(x, np.float64)) for x in jax.tree.leaves(jax.device_get(state.params))))}
  if os.environ.get("CODEX_UPDATE_GOLDEN"):
    with open(GOLDEN, "w") as f:
      json.dump(got, f, indent=2)
  with open(GOLDEN) as f:
    want = json.load(f)
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-4, err_msg=key)
  assert history[-1]["loss_text"] < history[0]["loss_text"]
