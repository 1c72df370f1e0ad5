"""The five-objective step trains the same on every layout: 3 steps of the tuned multimodal step (EMA target,
Lagrangian tuner measuring at steps 0 and 2) on the fake 8-device CPU mesh against one device: losses,
per-objective losses, tuner weights, shares, multipliers and norms, the first step's gradients (Adam's first
moment) and the final parameters and EMA target; one layout with 2 accumulated micro-batches. (Circular
pipelines: tests/test_objective_combos.py.)

The batch is 16 rows of 256 positions: at that size the vmapped tuner measurement that one device used to
compile hit an XLA:CPU miscompile (docs/objectives.md, "A miscompiled vmap") that sharded layouts, with fewer rows per
device, did not; a smaller batch would hide it. 1f1b is not here: config refuses it with non-text objectives
(its per-microbatch backward cannot take a loss that couples the microbatches, as align's contrastive loss does).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codex_jax.config.schema import OBJECTIVES
from codex_jax.objectives import balance
from codex_jax.parallel.mesh import build_mesh
from codex_jax.runtime import feed
from codex_jax.train.setup import build_trainer
from tests.helpers import load
from tests.objective_batch import make_batch
from tests.test_objectives import MM, PATCHES, _adam_mu

pytestmark = pytest.mark.slow  # Compile-heavy (one multimodal step per layout): make test, not test-fast.

# Eight heads for tensor 8; 16 rows of 256 positions (see the docstring).
MODEL = {**MM, "model.num_heads": 8, "model.num_kv_heads": 8, "data.seq_len": 256, "train.global_batch": 16}
STEPS = 3
TUNER = ("weight", "share", "lam_low", "lam_high", "trunk_grad_norm")


def _layout(data, tensor, pipeline, **more):
  return {"mesh.data": data, "mesh.tensor": tensor, "mesh.pipeline": pipeline, **more}


def _run(overrides: dict, devices: int, initial=None):
  """(metrics per step, Adam's first moment after step 1, the state after the last step, the initial state),
  host copies. Every layout starts from the one-device initial state, put into its own shardings (one init
  compile for all)."""
  cfg = load("tiny", num_devices=devices, **{**MODEL, **overrides})
  trainer = build_trainer(cfg, build_mesh(cfg.mesh, jax.devices()[:devices]))
  rows = make_batch(16, 256, cfg.model.feature_dim, PATCHES, cfg.model.vocab_size, seed=7)
  batch = feed.to_global(rows, trainer.engine.data_sharding)
  initial = jax.device_get(trainer.init_state()) if initial is None else initial
  state, history, first_mu = jax.device_put(initial, trainer.shardings), [], None
  for _ in range(STEPS):
    state, metrics = trainer.train_step(state, batch)
    history.append(jax.device_get(metrics))
    if first_mu is None:
      first_mu = jax.device_get(_adam_mu(state))
  return history, first_mu, jax.device_get(state), initial


@pytest.fixture(scope="module")
def one_device():
  """{micro-batches: the one-device run}; both from the same initial state."""
  plain = _run(_layout(1, 1, 1), 1)
  return {1: plain, 2: _run({**_layout(1, 1, 1), "train.grad_accum": 2}, 1, initial=plain[3])}


LAYOUTS = [
    _layout(8, 1, 1),
    _layout(8, 1, 1, **{"mesh.fsdp": True}),
    _layout(1, 8, 1),
    _layout(2, 2, 2, **{"mesh.schedule": "gpipe", "mesh.microbatches": 4}),
    _layout(4, 1, 2, **{"mesh.schedule": "gpipe", "mesh.microbatches": 2, "train.grad_accum": 2}),
]


def _name(layout):
  shape = "x".join(str(layout[f"mesh.{a}"]) for a in ("data", "tensor", "pipeline"))
  return "-".join([shape] + [f"{k.split('.')[-1]}={v}" for k, v in layout.items() if k.split(".")[-1] not in (
      "data", "tensor", "pipeline")])


@pytest.mark.parametrize("layout", LAYOUTS, ids=_name)
def test_the_five_objective_step_matches_one_device(one_device, layout):
  ref_history, ref_mu, ref_state, initial = one_device[layout.get("train.grad_accum", 1)]
  history, first_mu, state, _ = _run(layout, 8, initial)
  for step, (got, want) in enumerate(zip(history, ref_history, strict=True)):
    assert got["skipped"] == 0 and got["balance_measured"] == want["balance_measured"]
    keys = ["loss"] + [f"loss_{n}" for n in OBJECTIVES] + [f"balance_{t}_{n}" for t in TUNER for n in OBJECTIVES]
    for key in keys:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7, err_msg=f"step {step + 1} {key}")
  # The tuner moved the weights (a measured step at 0 and 2), so the comparison covers its update.
  assert not np.allclose(ref_state.balance.weights_N, 1.0)
  np.testing.assert_allclose(state.balance.lam_low_N, ref_state.balance.lam_low_N, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(state.balance.lam_high_N, ref_state.balance.lam_high_N, rtol=1e-5, atol=1e-7)
  # As tests/test_parallel.py: rtol 1e-5 per element plus 1e-6 of the largest element (summation order).
  for name, got, want in (("first gradients (Adam mu)", first_mu, ref_mu), ("params", state.params, ref_state.params),
                          ("EMA target", state.target_params, ref_state.target_params)):
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(want))
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6 * scale, custom_message=name)


def test_the_tuner_measures_the_same_norms_at_a_size_where_a_vmapped_measurement_was_miscompiled():
  """The measurement itself, on a function with the RMSNorm backward that XLA:CPU (jaxlib 0.10.2) got wrong under
  jax.vmap at [16, 256, D]: trunk_grad_norms equals each loss's own jax.grad."""
  rng = np.random.default_rng(0)
  x_BLD = jnp.asarray(rng.normal(size=(16, 256, 32)), jnp.float32)
  weights = {"w": jnp.asarray(rng.normal(size=(32, 32)) / 6, jnp.float32)}
  masks = [jnp.asarray(rng.uniform(size=(16, 256, 1)) < p, jnp.float32) for p in (1.0, 0.01, 0.3)]

  def losses(p):
    h_BLD = x_BLD @ p["w"]  # The weights sit before the norm: their gradient goes through its backward.
    normed = h_BLD * jax.lax.rsqrt(jnp.mean(h_BLD * h_BLD, -1, keepdims=True) + 1e-6)
    scales = (1.0, 1e3, 1e-3)  # Rows of very different sizes: a row reusing another's sums shows.
    return {name: jnp.sum(jnp.sin(normed) * m) * k for name, m, k in zip("abc", masks, scales, strict=True)}

  got = jax.jit(lambda p: balance.trunk_grad_norms(losses, p, lambda g: g, ("a", "b", "c")))(weights)
  want = [float(jnp.linalg.norm(jax.jit(jax.grad(lambda p, n=n: losses(p)[n]))(weights)["w"])) for n in "abc"]
  np.testing.assert_allclose(got, want, rtol=1e-5)
