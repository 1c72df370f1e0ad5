"""The gradient noise scale (train/noise_scale.py): the estimator against a problem whose B_simple is known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codex_jax.config.errors import ConfigError
from codex_jax.train import noise_scale
from tests.helpers import load

# loss(w) = mean_i 0.5 |w - x_i|^2 with x_i ~ N(mu, diag(var)): the per-example gradient is w - x_i, so
# the true gradient is G = w - mu and the per-example covariance is Sigma = diag(var):
# B_simple = sum(var) / |w - mu|^2, here 40 (between B_small = 8 and B_big = 64, where it is hardest).
DIM, ROWS, K, DRAWS = 16, 64, 8, 400
TOLERANCE = 0.08  # Relative. Seeds 0-9: the averaged estimates land within 5%, the online EMA within 11%.


def _problem():
  rng = np.random.default_rng(0)
  var = rng.uniform(0.5, 2.0, DIM)
  g = rng.normal(size=DIM)
  g *= np.sqrt(var.sum() / 40.0) / np.linalg.norm(g)
  w, mu = np.zeros(DIM), -g
  return {"w": jnp.asarray(w, jnp.float32)}, mu, var, var.sum() / (g @ g)


def _grad(params, batch):
  return {"w": jnp.mean(params["w"][None] - batch["x"], axis=0)}  # d/dw of mean_i 0.5 |w - x_i|^2.


def _norms(seed=1):
  params, mu, var, analytic = _problem()
  x = np.random.default_rng(seed).normal(mu, np.sqrt(var), size=(DRAWS, ROWS, DIM)).astype(np.float32)
  measure = jax.jit(lambda b: noise_scale.micro_grad_norms(_grad, params, b, K))
  out = [jax.device_get(measure({"x": xb})) for xb in x]
  return np.array([o["small_sq"] for o in out]), np.array([o["big_sq"] for o in out]), analytic


def test_noise_scale_matches_the_analytic_value_on_a_quadratic():
  small, big, analytic = _norms()
  assert analytic == pytest.approx(40.0)
  g2, trace = noise_scale.unbiased(small, big, ROWS / K, ROWS)
  estimate = trace.mean() / g2.mean()
  assert estimate == pytest.approx(analytic, rel=TOLERANCE)
  # Online, through the moving averages as training logs it: within twice the tolerance of the truth.
  ema = noise_scale.Ema(0.98)
  online = [ema.update(a, b) for a, b in zip(g2, trace, strict=True)]
  assert online[-1] == pytest.approx(analytic, rel=2 * TOLERANCE)
  # Wrong estimators fail the same check: batch sizes swapped, or |G_big|^2 taken as |G|^2 (biased by
  # tr(Sigma) / B_big: it gives B_simple / (1 + B_simple / B_big), 25 here).
  g2_swapped, trace_swapped = noise_scale.unbiased(small, big, ROWS, ROWS / K)
  assert trace_swapped.mean() / g2_swapped.mean() != pytest.approx(analytic, rel=TOLERANCE)
  assert trace.mean() / big.mean() != pytest.approx(analytic, rel=TOLERANCE)


def test_noise_scale_keys_are_validated():
  assert load(**{"train.noise_scale_every": 10}).train.noise_scale_microbatches == 4
  with pytest.raises(ConfigError, match="train.noise_scale_microbatches"):
    load(**{"train.noise_scale_every": 10, "train.noise_scale_microbatches": 3})  # 3 does not divide 16.
  with pytest.raises(ConfigError, match="train.noise_scale_every"):
    load(**{"train.noise_scale_every": -1})
  with pytest.raises(ConfigError, match="train.noise_scale_ema"):
    load(**{"train.noise_scale_every": 1, "train.noise_scale_ema": 1.0})


def test_probe_on_the_model_matches_gradients_of_each_micro_batch_and_logs_on_schedule():
  from codex_jax.parallel.mesh import build_mesh
  from codex_jax.train import feed
  from codex_jax.train.bench import synthetic_batch
  from codex_jax.train.setup import build_trainer
  from codex_jax.train.step import loss_fn
  from tests.helpers import MICRO

  # One device: the probe's sharding is the train step's (same in/out shardings); compiling for 8 costs more.
  cfg = load(**MICRO, **{"train.noise_scale_every": 3, "train.noise_scale_microbatches": 4, "mesh.data": 1})
  mesh = build_mesh(cfg.mesh, jax.devices()[:1])
  trainer = build_trainer(cfg, mesh)
  # Random parameters of the model's shapes, drawn by numpy: jax's init would compile (seconds here).
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: jnp.asarray(0.02 * rng.normal(size=x.shape), x.dtype), trainer.abstract_state.params)
  host = synthetic_batch(cfg, cfg.train.global_batch, seed=0)
  written = []
  probe = noise_scale.Probe.create(cfg, trainer, mesh, lambda step, s: written.append((step, s)))
  for step in range(7):
    probe.maybe_measure(step, params, feed.to_global(host, trainer.data_sharding))
  assert [step for step, _ in written] == [1, 4, 7]  # Steps 0, 3, 6, logged under the update they precede.
  # The reference: each 2-row micro-batch differentiated on its own, on one device.
  grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, b, model=trainer.model, z_loss=cfg.train.z_loss)[0]))
  grads = [grad(params, {k: v[2 * i:2 * i + 2] for k, v in host.items()}) for i in range(4)]
  sq = lambda g: sum(float(jnp.sum(x.astype(jnp.float32) ** 2)) for x in jax.tree.leaves(g))  # noqa: E731
  small = np.mean([sq(g) for g in grads])
  big = sq(jax.tree.map(lambda *g: sum(g) / 4, *grads))
  scalars = written[0][1]
  assert scalars["noise_scale/g_small_sq"] == pytest.approx(small, rel=1e-4)
  assert scalars["noise_scale/g_big_sq"] == pytest.approx(big, rel=1e-4)
  g2, trace = noise_scale.unbiased(small, big, 2, 8)
  assert scalars["noise_scale/g2"] == pytest.approx(g2, rel=1e-3, abs=1e-3 * small)
  assert scalars["noise_scale/trace_sigma"] == pytest.approx(trace, rel=1e-3)
  # One batch's |G|^2 estimate can be negative (random parameters: here it is); B_simple is then unbounded.
  assert scalars["noise_scale/b_simple"] == (pytest.approx(trace / g2, rel=1e-2) if g2 > 0 else float("inf"))
  assert scalars["noise_scale/b_simple_tokens"] == pytest.approx(scalars["noise_scale/b_simple"] * 32)
  off = noise_scale.Probe.create(load(**MICRO), trainer, mesh, None)
  off.maybe_measure(0, params, host)  # Off: nothing compiled, nothing written, no error.
  assert off.norms is None
