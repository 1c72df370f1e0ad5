"""Loss-weight tuner: shares held in bounds where fixed weights are not, absent objectives left alone, a
jittable checkpointable state, measured trunk gradient norms against jax.grad, bad configs refused."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codex_jax.objectives import balance

LOW, HIGH = 0.1, 0.4
CFG = balance.BalanceConfig(low=(LOW,) * 5, high=(HIGH,) * 5, measure_every=1, slack=0.02)
STEPS, TAIL = 400, 150


def _synthetic_norms(steps: int, seed: int = 0) -> np.ndarray:
  """[steps, 5] trunk gradient norms: the first objective's ~100x the others', each drifting and noisy."""
  rng = np.random.default_rng(seed)
  t = np.arange(steps)[:, None]
  drift = 1 + 0.3 * np.sin(2 * np.pi * t / 200 + np.arange(5))
  return np.array([100.0, 1, 1, 1, 1]) * drift * np.exp(0.1 * rng.standard_normal((steps, 5)))


def _run(cfg, norms_TN, present_TN):
  """The tuner over T measurements (one scan): final state and the [T, N] shares each measurement saw."""
  def body(state, xs):
    state, metrics = balance.update(state, xs[0], xs[1], cfg)
    return state, jnp.stack([metrics[f"balance_share_{name}"] for name in cfg.objectives])
  return jax.lax.scan(body, balance.init_state(cfg), (jnp.asarray(norms_TN, jnp.float32), jnp.asarray(present_TN)))


def _inside(shares_TN):
  return bool(np.all((shares_TN >= LOW) & (shares_TN <= HIGH)))


def test_tuner_holds_shares_in_bounds_where_fixed_weights_fail():
  norms_TN, present_TN = _synthetic_norms(STEPS), np.ones((STEPS, 5), bool)
  state, shares_TN = _run(CFG, norms_TN, present_TN)
  shares_TN = np.asarray(shares_TN)
  assert _inside(shares_TN[-TAIL:]), (shares_TN[-TAIL:].min(0), shares_TN[-TAIL:].max(0))
  np.testing.assert_allclose(shares_TN.sum(1), 1.0, rtol=1e-5)
  assert float(state.lam_high_N[0]) > 0 and float(state.weights_N[0]) < 0.1  # The loud one was turned down.
  np.testing.assert_allclose(float(jnp.sum(state.weights_N)), sum(CFG.weights), rtol=1e-5)

  fixed = dataclasses.replace(CFG, mode="fixed")
  fixed_state, fixed_TN = _run(fixed, norms_TN, present_TN)
  fixed_TN = np.asarray(fixed_TN)
  assert not _inside(fixed_TN[-TAIL:])
  assert fixed_TN[-TAIL:, 0].mean() > 0.9  # ~100 / 104.
  chex.assert_trees_all_equal(fixed_state.weights_N, jnp.ones(5))


def test_a_zero_low_or_unit_high_bound_never_pulls():
  """A low of 0 is no constraint: an objective with a 1e-5 gradient keeps its configured weight (tightened by
  the slack into a low of 0.02, it would drain the weight sum from the others)."""
  cfg = dataclasses.replace(CFG, low=(0.1, 0.1, 0.1, 0.0, 0.1), high=(0.6, 0.6, 0.6, 1.0, 0.6))
  norms_TN = np.tile([1.0, 1, 1, 1e-5, 1], (100, 1))
  state, shares_TN = _run(cfg, norms_TN, np.ones((100, 5), bool))
  np.testing.assert_array_equal(np.asarray(state.lam_low_N), 0.0)
  np.testing.assert_array_equal(np.asarray(state.lam_high_N), 0.0)
  np.testing.assert_allclose(np.asarray(state.weights_N), 1.0, rtol=1e-6)
  slack_bound = dataclasses.replace(cfg, low=(0.1, 0.1, 0.1, 1e-3, 0.1))  # Any positive low does pull.
  pulled, _ = _run(slack_bound, norms_TN, np.ones((100, 5), bool))
  assert float(pulled.weights_N[3]) > 10 * float(pulled.weights_N[0])


def test_absent_objective_keeps_its_state_and_stays_out_of_shares():
  warm, _ = _run(CFG, _synthetic_norms(50), np.ones((50, 5), bool))
  update = jax.jit(balance.update, static_argnames="cfg")
  present_N = jnp.array([True, True, False, True, True])
  norms_N = jnp.asarray(_synthetic_norms(1, seed=1)[0], jnp.float32)
  after, metrics = update(warm, norms_N, present_N, cfg=CFG)
  for field in ("weights_N", "lam_low_N", "lam_high_N", "norm_ema_N", "measured_N"):
    assert getattr(after, field)[2] == getattr(warm, field)[2], field
  assert float(metrics["balance_share_align"]) == 0.0
  # Whatever norm the absent objective reports (garbage, NaN) changes nothing.
  for junk in (0.0, 1e6, jnp.nan):
    other, other_metrics = update(warm, norms_N.at[2].set(junk), present_N, cfg=CFG)
    chex.assert_trees_all_equal(other, after)
    chex.assert_trees_all_equal(other_metrics, metrics)
  # The others' shares are those of the four present objectives alone.
  kept = np.array([0, 1, 3, 4])
  ema_N = np.asarray(after.norm_ema_N)
  pull = np.asarray(warm.weights_N)[kept] * ema_N[kept]
  got = np.array([float(metrics[f"balance_share_{CFG.objectives[i]}"]) for i in kept])
  np.testing.assert_allclose(got, pull / pull.sum(), rtol=1e-5)
  # Its loss, even NaN, contributes nothing.
  losses = {name: jnp.float32(i + 1.0) for i, name in enumerate(CFG.objectives)} | {"align": jnp.float32(jnp.nan)}
  expected = sum(float(after.weights_N[i]) * (i + 1.0) for i in kept)
  np.testing.assert_allclose(float(jax.jit(balance.weighted_loss)(losses, present_N, after)), expected, rtol=1e-5)


def test_update_jits_once_and_state_round_trips_as_a_pytree():
  update = jax.jit(chex.assert_max_traces(balance.update, n=1), static_argnames="cfg")
  state = balance.init_state(CFG)
  for norms_N in _synthetic_norms(3):
    state, _ = update(state, jnp.asarray(norms_N, jnp.float32), jnp.ones(5, bool), cfg=CFG)
  leaves, treedef = jax.tree.flatten(state)
  assert len(leaves) == 5
  restored = jax.tree.unflatten(treedef, [np.asarray(leaf) for leaf in leaves])
  chex.assert_trees_all_equal(restored, state)
  assert restored.objectives == CFG.objectives
  chex.assert_tree_all_finite(state)


def test_trunk_grad_norms_match_jax_grad():
  rng = np.random.default_rng(0)
  params = {"trunk": {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)},
            "heads": {"text": rng.standard_normal(4), "vision": rng.standard_normal(4)}}
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  x_B3 = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)

  def losses_fn(p):
    h_B4 = jnp.tanh(x_B3 @ p["trunk"]["w"] + p["trunk"]["b"])
    return {"text": jnp.mean((h_B4 @ p["heads"]["text"] - 1.0) ** 2),
            "vision": jnp.mean(jnp.exp(h_B4 @ p["heads"]["vision"]))}

  got_N = jax.jit(lambda p: balance.trunk_grad_norms(losses_fn, p, lambda t: t["trunk"], CFG.objectives))(params)
  for i, name in enumerate(CFG.objectives):
    if name not in ("text", "vision"):
      assert float(got_N[i]) == 0.0
      continue
    grads = jax.tree.map(np.asarray, jax.jit(jax.grad(lambda p, name=name: losses_fn(p)[name]))(params))
    trunk = np.sqrt(sum(np.sum(g ** 2) for g in jax.tree.leaves(grads["trunk"])))
    whole = np.sqrt(sum(np.sum(g ** 2) for g in jax.tree.leaves(grads)))
    np.testing.assert_allclose(float(got_N[i]), float(trunk), rtol=1e-5)
    assert abs(float(whole) - float(trunk)) > 1e-3  # The heads' gradients would change the answer.


@pytest.mark.parametrize("change, field", [
    ({"low": (0.35, 0.1, 0.1, 0.1, 0.1), "high": (0.3, 0.4, 0.4, 0.4, 0.4)}, r"balance.low\[0\]=0.35"),
    ({"low": (0.3,) * 5}, "balance.low=.* must sum to at most 1, not 1.5"),
    ({"high": (0.15,) * 5}, "balance.high=.* must sum to at least 1, not 0.75"),
    ({"weights": (1.0, -1.0, 1.0, 1.0, 1.0)}, "balance.weights"),
    ({"weights": (1.0, 1.0)}, "balance.weights"),
    ({"mode": "auto"}, "balance.mode"),
    ({"dual_lr": 0.0}, "balance.dual_lr"),
    ({"ema_decay": 1.0}, "balance.ema_decay"),
    ({"measure_every": 0}, "balance.measure_every"),
])
def test_bad_config_names_the_field(change, field):
  with pytest.raises(ValueError, match=field):
    dataclasses.replace(CFG, **change)
