"""The gradient noise scale (train/noise_scale.py): the estimator against a problem whose B_simple is known;
its moving averages through a checkpoint; the batch ramp it caps (train/batch_ramp.py) and the micro-batch
split both use (train/accumulate.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codex_jax.config.errors import ConfigError
from codex_jax.config.schema import TrainConfig
from codex_jax.runtime import feed
from codex_jax.train import accumulate, batch_ramp, noise_scale
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


@pytest.mark.slow  # Compile-heavy: make test, not test-fast.
def test_probe_on_the_model_matches_gradients_of_each_micro_batch_and_logs_on_schedule():
  from codex_jax.parallel.mesh import build_mesh
  from codex_jax.runtime import feed
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
  probe = noise_scale.Probe.create(cfg, trainer.engine, lambda step, s: written.append((step, s)))
  for step in range(7):
    probe.maybe_measure(step, params, feed.to_global(host, trainer.engine.data_sharding))
    probe.collect()
  assert [step for step, _ in written] == [1, 4, 7]  # Steps 0, 3, 6, logged under the update they precede.
  # The reference: each 2-row micro-batch (rows i and i + 4: the strided split) differentiated on its own.
  grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, b, model=trainer.engine.model, z_loss=cfg.train.z_loss)[0]))
  grads = [grad(params, {k: v[i::4] for k, v in host.items()}) for i in range(4)]
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
  off = noise_scale.Probe.create(load(**MICRO), trainer.engine, None)
  off.maybe_measure(0, params, host)  # Off: nothing compiled, nothing written, no error.
  assert off.norms is None


def test_ema_state_survives_a_json_checkpoint_and_continues_as_if_uninterrupted():
  pairs = [(2.0, 30.0), (1.5, 40.0), (-0.5, 35.0), (1.0, 20.0), (0.8, 25.0)]
  whole, first = noise_scale.Ema(0.9), noise_scale.Ema(0.9)
  want = [whole.update(*p) for p in pairs]
  for p in pairs[:3]:
    first.update(*p)
  saved = json.loads(json.dumps(first.state(), allow_nan=False))  # The meta item is strict JSON.
  resumed = noise_scale.Ema(0.9)
  resumed.restore(saved)
  assert resumed.estimate() == want[2] and saved["b_simple"] == pytest.approx(want[2])
  assert [resumed.update(*p) for p in pairs[3:]] == want[3:]
  fresh = noise_scale.Ema(0.9)
  fresh.restore(None)  # A checkpoint from before the probe was on, or from before this key existed.
  assert fresh.estimate() is None and fresh.state() == {"g2": None, "trace": None, "b_simple": None}
  unbounded = noise_scale.Ema(0.9)
  unbounded.update(-1.0, 5.0)  # |G|^2 <= 0: B_simple is inf, saved as None, restored as inf again.
  assert unbounded.state()["b_simple"] is None and unbounded.estimate() == float("inf")
  assert noise_scale.Probe(0).state() is None and noise_scale.Probe(0).b_simple is None


def test_batch_ramp_grows_linearly_and_the_noise_cap_holds_it_at_b_simple():
  train = TrainConfig(global_batch=16, grad_accum=4, batch_ramp_steps=6, batch_ramp_start=1)
  assert train.micro_batch == 4
  assert [batch_ramp.micro_batches(train, s) for s in range(9)] == [1, 1, 2, 2, 3, 3, 4, 4, 4]
  assert batch_ramp.micro_batches(train, 3, b_simple=4.0) == 2  # The cap is off unless asked for.
  assert [batch_ramp.micro_batches(TrainConfig(global_batch=16, grad_accum=4), s) for s in (0, 5)] == [4, 4]
  capped = TrainConfig(global_batch=16, grad_accum=4, batch_ramp_steps=6, batch_ramp_noise_cap=True,
                       noise_scale_every=1)
  # B_simple in sequences over 4-row micro-batches: 9 -> at most 2 of them; under one micro-batch -> still 1.
  assert [batch_ramp.micro_batches(capped, 7, b) for b in (9.0, 16.0, 100.0, 3.0, -2.0)] == [2, 4, 4, 1, 1]
  assert batch_ramp.micro_batches(capped, 2, 100.0) == 2  # The ramp below the cap.
  for unknown in (None, float("inf"), float("nan")):  # No estimate yet, or unbounded: the ramp alone.
    assert batch_ramp.micro_batches(capped, 7, unknown) == 4
  from_two = TrainConfig(global_batch=16, grad_accum=4, batch_ramp_steps=4, batch_ramp_start=2)
  assert [batch_ramp.micro_batches(from_two, s) for s in range(5)] == [2, 2, 3, 3, 4]


def test_split_takes_every_kth_row_and_interleave_makes_micro_batch_m_pipeline_batch_m():
  k, rows_per_process, processes = 3, 4, 2
  rng = np.random.default_rng(0)
  # Pipeline batch m of each process (its rows of the global micro-batch m), as the data pipeline yields them.
  batches = [[{"x": rng.integers(0, 1000, (rows_per_process, 5)), "f": rng.normal(size=(rows_per_process, 5, 2))}
              for _ in range(k)] for _ in range(processes)]
  local = [feed.interleave(b) for b in batches]
  assert local[0]["x"].shape == (k * rows_per_process, 5) and local[0]["f"].shape == (k * rows_per_process, 5, 2)
  # feed.to_global puts process p's rows after process p-1's: the global batch is their concatenation.
  global_batch = {name: np.concatenate([b[name] for b in local]) for name in local[0]}
  for m in range(k):
    for name in ("x", "f"):
      want = np.concatenate([batches[p][m][name] for p in range(processes)])  # The global pipeline batch m.
      np.testing.assert_array_equal(accumulate.split(global_batch[name], k)[m], want)
  assert feed.interleave(batches[0][:1]) is batches[0][0]  # k = 1: the batch itself.
  # A contiguous split ([k, rows / k]) would give other rows: the identity above can fail.
  assert not np.array_equal(global_batch["x"].reshape(k, -1, 5)[1], accumulate.split(global_batch["x"], k)[1])


def test_split_of_data_sharded_rows_moves_no_row_between_devices():
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
  x = jax.device_put(np.arange(4 * 6 * 3, dtype=np.float32).reshape(24, 3), NamedSharding(mesh, P("data")))
  lowered = jax.jit(lambda x: accumulate.split(x, 3).sum(axis=2)).lower(x)
  hlo = lowered.compile().as_text()
  assert not any(op in hlo for op in ("all-to-all", "all-gather", "collective-permute", "all-reduce")), hlo
  np.testing.assert_array_equal(jax.jit(lambda x: accumulate.split(x, 3))(x), accumulate.split(np.asarray(x), 3))


def test_accumulate_averages_floats_sums_counts_and_ors_flags():
  batch = {"x": jnp.arange(12.0).reshape(6, 2)}

  def fn(mb, index):
    return {"mean": jnp.mean(mb["x"]), "count": jnp.sum(mb["x"] > 4).astype(jnp.int32),
            "any": jnp.any(mb["x"] == 11.0), "index": jnp.asarray(index, jnp.float32)}

  out = jax.jit(lambda b: accumulate.accumulate(fn, b, 3))(batch)
  assert float(out["mean"]) == pytest.approx(5.5) and int(out["count"]) == 7 and bool(out["any"])
  assert float(out["index"]) == pytest.approx(1.0)  # Micro-batches 0, 1, 2 each saw their own index.
  assert out["count"].dtype == jnp.int32 and out["mean"].dtype == jnp.float32
  one = accumulate.accumulate(fn, batch, 1)
  assert float(one["mean"]) == pytest.approx(5.5) and int(one["count"]) == 7 and float(one["index"]) == 0
  with pytest.raises(ValueError, match="no whole number of micro-batches of 4 rows"):
    accumulate.count(batch, 4)
