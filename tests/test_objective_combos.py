"""The multimodal objectives through a pipelined layer stack (gpipe, circular): the one-device losses and
gradients on the same batch. (MTP beside the objectives: tests/test_eval_objectives.py, its eval fixture
and its align + action run.)"""

import chex
import jax
import numpy as np
import pytest

from codex_jax.parallel.mesh import build_mesh
from codex_jax.runtime import feed, multimodal
from codex_jax.train.setup import build_trainer
from tests.helpers import load
from tests.objective_batch import make_batch
from tests.test_objectives import MM, PATCHES

pytestmark = pytest.mark.slow  # Compile-heavy (pipelined multimodal programs): make test, not test-fast.

NAMES = ("text", "vision", "align", "world", "action")


def _trainer(devices: int, **overrides):
  cfg = load("tiny", num_devices=devices, **{**MM, **overrides})
  return cfg, build_trainer(cfg, build_mesh(cfg.mesh, jax.devices()[:devices]))


def _objective_and_grads(tr, cfg, batch_rows):
  """(each objective's loss, gradient of their sum) at the trainer's initial parameters, jitted with its shardings."""
  engine = tr.engine
  # Parameters drawn on the host in the state's shapes (the same draws for every layout): compiling init
  # would cost more than the comparison.
  rng, abstract = np.random.default_rng(0), jax.eval_shape(tr.init)
  params = jax.tree.map(lambda a: (0.1 * rng.normal(size=a.shape)).astype(a.dtype), abstract.params)
  target = {k: jax.tree.map(lambda x: 0.9 * x, params[k]) for k in abstract.target_params}

  def total(params, target_params, batch, key):
    out = multimodal.objective_outputs(params, target_params, batch, key, model=engine.model, spec=engine.spec,
                                       pipeline=engine.pipeline)
    return sum(out["losses"].values()), out["losses"]

  fn = engine.jit(jax.value_and_grad(total, has_aux=True), in_shardings=(
      engine.param_shardings, engine.target_shardings, engine.data_sharding, engine.replicated))
  (_, losses), grads = fn(params, target, feed.to_global(batch_rows, engine.data_sharding),
                          jax.random.PRNGKey(3))
  return jax.device_get(losses), jax.device_get(grads)


LAYERS = {"model.num_layers": 4}  # 2 stages x 2 repeats for circular.


@pytest.fixture(scope="module")
def one_device():
  cfg, tr = _trainer(1, **LAYERS)
  return _objective_and_grads(tr, cfg, make_batch(8, 32, 96, PATCHES, 256, seed=5))


@pytest.mark.parametrize("mesh", [
    {"mesh.pipeline": 2, "mesh.schedule": "gpipe", "mesh.microbatches": 2},
    {"mesh.pipeline": 2, "mesh.schedule": "circular", "mesh.repeats": 2, "mesh.microbatches": 2},
], ids=lambda m: m["mesh.schedule"])
def test_a_pipelined_stack_gives_the_one_device_objective_losses_and_gradients(one_device, mesh):
  cfg, tr = _trainer(2, **LAYERS, **mesh, **{"mesh.data": 1, "mesh.tensor": 1})
  assert tr.engine.pipeline is not None
  losses, grads = _objective_and_grads(tr, cfg, make_batch(8, 32, 96, PATCHES, 256, seed=5))
  ref_losses, ref_grads = one_device
  assert sorted(losses) == sorted(NAMES) and all(ref_losses[k] > 0 for k in NAMES)
  for k in NAMES:
    np.testing.assert_allclose(losses[k], ref_losses[k], rtol=1e-5, err_msg=k)
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref_grads))  # As tests/test_parallel.py.
  chex.assert_trees_all_close(grads, ref_grads, rtol=1e-5, atol=1e-6 * scale)
