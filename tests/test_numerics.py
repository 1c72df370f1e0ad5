"""The numerics guard (RELIABILITY D1, D2, D4): bad steps skipped bit-identically, counted, and judged alike on resume."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from codex_jax.config.errors import ConfigError
from codex_jax.config.schema import TrainConfig
from codex_jax.parallel.mesh import build_mesh
from codex_jax.runtime import feed
from codex_jax.train import guard as guard_lib
from codex_jax.train.bench import synthetic_batch
from codex_jax.train.setup import build_trainer
from tests.helpers import MICRO, load

WARM_STEPS = 25  # Past train.spike_min_steps=20: spike detection is on.


def _push(guard, losses, bads):
  for loss, bad in zip(losses, bads, strict=True):
    guard = guard_lib.update_guard(guard, jnp.float32(loss), jnp.bool_(bad))
  return guard


def test_window_is_a_ring_of_the_last_accepted_losses_with_numpy_mean_and_std():
  losses = [3.0, 2.5, np.nan, 2.7, 2.2, 1e9, 2.4, 2.1, 2.3, 2.0]
  bads = [False, False, True, False, False, True, False, False, False, False]
  guard = _push(guard_lib.init_guard(5), losses, bads)
  accepted = [x for x, bad in zip(losses, bads, strict=True) if not bad]
  assert (int(guard.count), int(guard.next), int(guard.skipped), int(guard.consecutive_bad)) == (5, 8 % 5, 2, 0)
  np.testing.assert_array_equal(np.sort(guard.losses_W), np.sort(np.float32(accepted[-5:])))
  mean, std = guard_lib.window_stats(guard)
  np.testing.assert_allclose([mean, std], [np.mean(accepted[-5:]), np.std(accepted[-5:])], rtol=1e-6)
  threshold = guard_lib.spike_threshold(guard, 6.0, 5)
  np.testing.assert_allclose(threshold, np.mean(accepted[-5:]) + 6 * np.std(accepted[-5:]), rtol=1e-6)
  partial = _push(guard_lib.init_guard(5), accepted[:3], [False] * 3)  # Unfilled slots must not count.
  np.testing.assert_allclose(guard_lib.window_stats(partial), [np.mean(accepted[:3]), np.std(accepted[:3])],
                             rtol=1e-6)
  assert int(_push(guard, [5.0, np.inf], [True, True]).consecutive_bad) == 2


def test_a_window_shorter_than_spike_min_steps_never_flags_and_non_finite_always_does():
  cfg = TrainConfig(spike_window=50, spike_sigmas=6.0, spike_min_steps=20)
  noise = np.random.default_rng(0).normal(2.0, 0.01, 20)
  short = _push(guard_lib.init_guard(50), noise[:19], [False] * 19)
  bad, threshold = guard_lib.is_bad(short, jnp.float32(1e9), jnp.float32(1.0), jnp.float32(1e-3), cfg)
  assert not bad and threshold == np.inf
  bad, threshold = guard_lib.is_bad(_push(short, noise[19:], [False]), jnp.float32(1e9), jnp.float32(1.0), jnp.float32(1e-3), cfg)
  assert bad and threshold < 2.1
  off = _push(guard_lib.init_guard(0), noise, [False] * 20)  # spike_window=0: spikes off, one idle slot.
  assert guard_lib.is_bad(off, jnp.float32(1e9), jnp.float32(1.0), jnp.float32(1e-3), cfg)[1] == np.inf
  assert not guard_lib.is_bad(off, jnp.float32(1e9), jnp.float32(1.0), jnp.float32(1e-3), cfg)[0]
  for loss, grad_norm in ((np.nan, 1.0), (np.inf, 1.0), (2.0, np.inf), (2.0, np.nan)):
    for guard in (off, short):
      assert guard_lib.is_bad(guard, jnp.float32(loss), jnp.float32(grad_norm), jnp.float32(1e-3), cfg)[0]


def test_an_update_larger_than_max_update_ratio_is_bad_whatever_the_loss():
  guard = guard_lib.init_guard(50)
  judge = lambda ratio, limit=0.5: bool(guard_lib.is_bad(guard, jnp.float32(2.0), jnp.float32(1.0), jnp.float32(ratio),
                                                         TrainConfig(max_update_ratio=limit))[0])
  assert not judge(0.01) and not judge(0.5)
  assert judge(0.51) and judge(1e30) and judge(np.inf) and judge(np.nan)
  assert not judge(1e30, limit=0)  # 0: off.


@pytest.mark.parametrize("key,value,rule", [
    ("train.spike_min_steps", 200, r"config.train.spike_min_steps=200: must be in \[2, train.spike_window=100\]"),
    ("train.spike_min_steps", 1, r"config.train.spike_min_steps=1: must be in \[2,"),
    ("train.max_consecutive_bad", 0, r"config.train.max_consecutive_bad=0: must be positive"),
    ("train.spike_window", -1, r"config.train.spike_window=-1: must not be negative"),
    ("train.spike_sigmas", 0.0, r"config.train.spike_sigmas=0.0: must be positive"),
])
def test_guard_settings_are_validated(key, value, rule):
  with pytest.raises(ConfigError, match=rule):
    load("tiny", num_devices=1, **{**MICRO, "mesh.data": 1, key: value})
  load("tiny", num_devices=1, **{**MICRO, "mesh.data": 1, "train.spike_window": 0, "train.spike_min_steps": 500})


@pytest.fixture(scope="module")
def trainer():
  cfg = load("tiny", num_devices=1, **{**MICRO, "mesh.data": 1, "train.steps": 100})
  return build_trainer(cfg, build_mesh(cfg.mesh, jax.devices()[:1])), cfg


def _batch(cfg, seed, **edits):
  # Uniform random tokens: the loss settles near ln(vocab) with little noise, like a pretraining plateau.
  return {**synthetic_batch(cfg, cfg.train.global_batch, seed=seed), **edits}


def _step(trainer, host_state, batch):
  """(host state after, host metrics) of one step; states live on the host because the step donates its input."""
  trainer = trainer[0]
  state = jax.device_put(host_state, trainer.shardings)
  state, metrics = trainer.train_step(state, feed.to_global(batch, trainer.engine.data_sharding))
  return jax.device_get(state), jax.device_get(metrics)


def _poisoned(cfg, seed, value):
  features = synthetic_batch(cfg, cfg.train.global_batch, seed=seed)["features"].copy()
  features[0, 0, 0] = value  # Position 0 is an image position (modality 2): the value reaches the loss.
  return _batch(cfg, seed, features=features)


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_d1_a_non_finite_step_leaves_params_and_optimizer_bit_identical(trainer, value):
  cfg = trainer[1]
  start = jax.device_get(trainer[0].init_state())
  before, _ = _step(trainer, start, _batch(cfg, 0))
  after, metrics = _step(trainer, before, _poisoned(cfg, 1, value))
  assert not np.isfinite(metrics["loss"])
  assert (metrics["skipped"], metrics["skipped_total"], metrics["consecutive_bad"]) == (1, 1, 1)
  _assert_same((after.params, after.opt_state), (before.params, before.opt_state))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((after.params, after.opt_state)))
  assert int(after.step) == 2  # The batch is consumed: the data stream stays aligned.
  _assert_same(after.guard.losses_W, before.guard.losses_W)
  assert int(after.guard.count) == 1
  healthy, metrics = _step(trainer, after, _batch(cfg, 2))
  assert (metrics["skipped"], metrics["skipped_total"], metrics["consecutive_bad"]) == (0, 1, 0)
  changed = [not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(healthy.params), jax.tree.leaves(after.params), strict=True)]
  assert all(changed)
  # The schedule inside the optimizer counts applied updates: the reported rate is the one applied.
  assert metrics["learning_rate"] == pytest.approx(float(trainer[0].schedule(1)))


def test_d2_consecutive_bad_steps_count_up_stop_the_run_and_reset(trainer):
  cfg = trainer[1]
  state = jax.device_get(trainer[0].init_state())
  for k in range(1, 4):
    state, metrics = _step(trainer, state, _poisoned(cfg, k, np.nan))
    assert metrics["consecutive_bad"] == k
  guard_lib.check_consecutive(metrics, limit=4, step=3)
  with pytest.raises(guard_lib.NumericsError, match=r"step 3: 3 consecutive steps skipped.*loss nan.*learning_rate"):
    guard_lib.check_consecutive(metrics, limit=3, step=3)
  state, metrics = _step(trainer, state, _batch(cfg, 4))
  assert (metrics["skipped"], metrics["skipped_total"], metrics["consecutive_bad"]) == (0, 3, 0)
  guard_lib.check_consecutive(metrics, limit=1, step=4)


@pytest.fixture(scope="module")
def warm(trainer):
  """A state after WARM_STEPS healthy steps on fresh batches, and their losses."""
  state, losses = jax.device_get(trainer[0].init_state()), []
  for i in range(WARM_STEPS):
    state, metrics = _step(trainer, state, _batch(trainer[1], 100 + i))
    assert metrics["skipped"] == 0
    losses.append(metrics["loss"])
  return state, np.array(losses)


def _spike(cfg):
  # Token 0 is never a target in the random data (ids start at 2), so the model has learnt it never comes.
  batch = _batch(cfg, 7)
  return {**batch, "targets": np.zeros_like(batch["targets"])}


def test_d4_a_loss_spike_is_skipped_the_next_step_is_normal_and_a_restored_window_decides_alike(
    trainer, warm, tmp_path):
  cfg, (state, losses) = trainer[1], warm
  np.testing.assert_allclose(np.sort(state.guard.losses_W[:WARM_STEPS]), np.sort(losses), rtol=0)
  spiked, spike_metrics = _step(trainer, state, _spike(cfg))
  want = np.mean(losses) + 6 * np.std(losses)
  assert spike_metrics["skipped"] == 1 and spike_metrics["loss"] > want
  np.testing.assert_allclose(spike_metrics["spike_threshold"], want, rtol=1e-5)
  _assert_same((spiked.params, spiked.opt_state, spiked.guard.losses_W, spiked.guard.count),
               (state.params, state.opt_state, state.guard.losses_W, state.guard.count))
  _, metrics = _step(trainer, spiked, _batch(cfg, 8))
  assert (metrics["skipped"], metrics["consecutive_bad"]) == (0, 0)

  # Saved and restored the way checkpoints are (Orbax StandardSave into the sharded restore target).
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "state", jax.device_put(state, trainer[0].shardings))
  checkpointer.wait_until_finished()
  restored = jax.device_get(checkpointer.restore(tmp_path / "state", trainer[0].restore_target()))
  _assert_same(restored, state)
  again, metrics = _step(trainer, restored, _spike(cfg))
  assert metrics["skipped"] == 1 and metrics["spike_threshold"] == spike_metrics["spike_threshold"]
  _assert_same(again, spiked)
  # Without the window (a fresh guard) the same batch would have been applied: the saved window decides.
  fresh = state.replace(guard=jax.device_get(trainer[0].init_state().guard))
  assert _step(trainer, fresh, _spike(cfg))[1]["skipped"] == 0
