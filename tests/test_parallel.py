"""3D parallelism on the fake 8-device CPU mesh: every layout and schedule computes the one-device step.

Layouts are (data, tensor, pipeline). Each case runs 3 AdamW steps on one repeated batch and compares
the losses and the gradients at init with a single device (f32, rtol 1e-5).
"""

import chex
import jax
import numpy as np
import optax
import pytest

from codex_jax.config.errors import ConfigError
from codex_jax.parallel.mesh import build_mesh
from codex_jax.parallel.pipeline import Schedule
from codex_jax.parallel.rules import logical_axis_rules, sharding_scope
from codex_jax.runtime import feed
from codex_jax.train.bench import synthetic_batch
from codex_jax.train.setup import build_trainer
from codex_jax.train.step import value_and_grad
from tests.helpers import MICRO, load

# 8 layers (2 chunks per stage for circular on 4 stages) and 8 heads (tensor 8), still tiny. Whole
# attention and no remat keep each compile short; the cases marked REMAT put rematerialisation back.
MODEL = {**MICRO, "model.num_layers": 8, "model.num_heads": 8, "model.num_kv_heads": 8,
         "model.attention_chunks": 1, "model.remat": "none"}
REMAT = {"model.remat": "full", "model.attention_chunks": 2}


def _layout(data, tensor, pipeline, **mesh):
  return {"mesh.data": data, "mesh.tensor": tensor, "mesh.pipeline": pipeline,
          **{f"mesh.{k}": v for k, v in mesh.items()}}


def _trainer(overrides, devices=None):
  cfg = load("tiny", num_devices=len(devices or jax.devices()), **{**MODEL, **overrides})
  mesh = build_mesh(cfg.mesh, devices or jax.devices())
  return cfg, mesh, build_trainer(cfg, mesh)


def _run(overrides, devices=None, steps=3):
  """(losses of `steps` AdamW steps on one repeated batch, gradients at init) of a layout.

  One compile per layout: the objective's value and gradient (the part layouts change); the optimizer
  update is applied by a separate, elementwise jit. The whole jitted train step of every schedule is
  compiled by the memory tests below and run by `make bench` and test_train_run.
  """
  cfg, mesh, trainer = _trainer(overrides, devices)
  state = trainer.init_state()
  batch = feed.to_global(synthetic_batch(cfg, cfg.train.global_batch, seed=0), trainer.engine.data_sharding)

  def objective(params, batch):
    with sharding_scope(mesh, logical_axis_rules(cfg.mesh.fsdp, cfg.mesh.sequence_parallel)):
      return value_and_grad(params, batch, model=trainer.engine.model, z_loss=cfg.train.z_loss, pipeline=trainer.engine.pipeline,
                            mtp_weight=cfg.train.mtp_weight)

  def update(grads, opt_state, params):
    updates, opt_state = trainer.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  objective = jax.jit(objective, in_shardings=(trainer.shardings.params, trainer.engine.data_sharding))
  update = jax.jit(update, donate_argnums=(1, 2))
  params, opt_state, losses, init_grads = state.params, state.opt_state, [], None
  for _ in range(steps):
    (loss, _), grads = objective(params, batch)
    losses.append(float(loss))
    init_grads = jax.device_get(grads) if init_grads is None else init_grads
    params, opt_state = update(grads, opt_state, params)
  return np.array(losses), init_grads


@pytest.fixture(scope="module")
def one_device():
  return _run(_layout(1, 1, 1), jax.devices()[:1])


MTP = {"model.mtp_depth": 1}  # Multi-token prediction after the stages (1f1b: in its per-microbatch head).


@pytest.fixture(scope="module")
def one_device_mtp():
  return _run({**_layout(1, 1, 1), **MTP}, jax.devices()[:1])


@pytest.mark.slow  # Compile-heavy, as the two memory tests below: make test, not test-fast.
@pytest.mark.parametrize("layout", [
    _layout(8, 1, 1, fsdp=True),
    _layout(1, 8, 1),
    {**_layout(2, 2, 2, schedule="gpipe", microbatches=4, sequence_parallel=True), **REMAT},
    _layout(2, 2, 2, schedule="circular", repeats=2, microbatches=4),
    {**_layout(2, 2, 2, schedule="1f1b", microbatches=4, fsdp=True), **MTP},
    _layout(4, 1, 2, schedule="gpipe", microbatches=2),
    _layout(4, 1, 2, schedule="circular", repeats=2, microbatches=2),
    _layout(1, 2, 4, schedule="gpipe", microbatches=4),
    _layout(1, 2, 4, schedule="circular", repeats=2, microbatches=4),
    {**_layout(1, 2, 4, schedule="1f1b", microbatches=4), **REMAT},
], ids=lambda o: "x".join(str(o[f"mesh.{a}"]) for a in ("data", "tensor", "pipeline")) + "-" + "-".join(
    f"{k.split('.')[1]}={v}" for k, v in o.items() if k.split(".")[1] not in ("data", "tensor", "pipeline")))
def test_layout_matches_one_device(request, layout):
  ref_losses, ref_grads = request.getfixturevalue("one_device_mtp" if layout.get("model.mtp_depth") else "one_device")
  losses, grads = _run(layout)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  # rtol 1e-5 per element, plus an atol of 1e-6 of the largest gradient: an element that is a sum with
  # cancellation (an embedding row summed over its tokens) carries the f32 rounding of its terms, which
  # the summation order across shards moves (seen: 2e-9 on elements of 1e-4, with max |g| 0.05).
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref_grads))
  chex.assert_trees_all_close(grads, ref_grads, rtol=1e-5, atol=1e-6 * scale)


def _compiled(overrides, devices):
  """(the compiled train step, per-device bytes of the state it takes: arguments less the batch)."""
  cfg, _, trainer = _trainer({"model.remat": "none", **overrides}, devices)
  batch = feed.to_global(synthetic_batch(cfg, cfg.train.global_batch), trainer.engine.data_sharding)
  compiled = trainer.train_step.lower(trainer.restore_target(), batch).compile()
  batch_bytes = sum(a.addressable_shards[0].data.nbytes for a in jax.tree.leaves(batch))
  return compiled, compiled.memory_analysis().argument_size_in_bytes - batch_bytes


@pytest.mark.slow
def test_fsdp_and_tensor_sharding_cut_state_bytes_per_device_about_n_fold():
  """Parameters + AdamW moments per device, from XLA's memory analysis of the compiled step."""
  small = {"model.num_layers": 2, "model.d_model": 128, "model.mlp_dim": 512}
  _, one = _compiled({**small, **_layout(1, 1, 1)}, jax.devices()[:1])
  _, fsdp = _compiled({**small, **_layout(8, 1, 1, fsdp=True)}, jax.devices())
  tensor_step, tensor = _compiled({**small, **_layout(1, 8, 1)}, jax.devices())
  # Measured: 7.9x and 6.9x less. Tensor parallelism leaves the norm scales and the (features, embed)
  # input projection replicated, as Megatron does; FSDP shards everything with an `embed` axis.
  assert one / 8 <= fsdp < one / 7.5, (one, fsdp)
  assert one / 8 <= tensor < one / 6.5, (one, tensor)
  # Vocab-parallel embedding and cross-entropy: nothing is all-gathered, the full logits least of all.
  assert "all-gather" not in tensor_step.as_text()


@pytest.mark.slow
def test_1f1b_activation_memory_is_bounded_where_gpipe_grows_with_microbatches():
  def temp_bytes(schedule, microbatches):
    compiled, _ = _compiled({**_layout(1, 1, 2, schedule=schedule, microbatches=microbatches),
                             "model.num_layers": 4, "train.global_batch": 2 * microbatches}, jax.devices()[:2])
    assert "collective-permute" in compiled.as_text()  # Stages hand activations on device to device.
    return compiled.memory_analysis().temp_size_in_bytes
  gpipe = temp_bytes("gpipe", 12) / temp_bytes("gpipe", 4)
  one_f_one_b = temp_bytes("1f1b", 12) / temp_bytes("1f1b", 4)
  assert gpipe > 2.0, gpipe  # 3x the microbatches (of 2 rows each): GPipe keeps every tick's inputs.
  assert one_f_one_b < 1.3, one_f_one_b  # 1F1B keeps 2 x stages of them, whatever their number.


def test_schedule_ticks_and_bubble():
  assert Schedule("gpipe", stages=4, microbatches=12).ticks == 15
  assert Schedule("gpipe", stages=4, microbatches=12).bubble_fraction == pytest.approx(3 / 15)
  circular = Schedule("circular", stages=4, microbatches=12, repeats=2)
  assert circular.ticks == 27 and circular.bubble_fraction == pytest.approx(3 / 27)
  one_f_one_b = Schedule("1f1b", stages=4, microbatches=12)
  assert one_f_one_b.ticks == 19 and one_f_one_b.bubble_fraction == pytest.approx(7 / 19)


@pytest.mark.parametrize("overrides,message", [
    ({**_layout(2, 1, 4), "model.scan_layers": False}, r"model.scan_layers=False: must be True with pipeline stages"),
    ({**_layout(1, 1, 8), "model.num_layers": 4}, r"model.num_layers=4: must be divisible by pipeline stages x mesh.repeats = 8 x 1"),
    (_layout(1, 2, 4, schedule="circular", repeats=2, microbatches=2),
     r"mesh.microbatches=2: must be at least the 4 pipeline stages with the circular schedule"),
    (_layout(2, 2, 2, schedule="gpipe", repeats=2), r"mesh.repeats=2: must be 1 with mesh.schedule='gpipe'"),
    (_layout(2, 2, 2, schedule="circular"), r"mesh.repeats=1: must be at least 2 with mesh.schedule='circular'"),
    (_layout(2, 2, 2, schedule="zigzag"), r"mesh.schedule='zigzag': must be one of \('gpipe', 'circular', '1f1b'\)"),
    (_layout(2, 2, 2, microbatches=8), r"train.global_batch=8: must be divisible by the data axis size x pipeline microbatches = 2 x 8"),
    ({**_layout(1, 8, 1, sequence_parallel=True), "data.seq_len": 36, "model.attention_chunks": 1},
     r"data.seq_len=36: must be divisible by the tensor axis size 8 when mesh.sequence_parallel is on"),
])
def test_impossible_layouts_are_refused_naming_the_key(overrides, message):
  with pytest.raises(ConfigError, match=message):
    load("tiny", num_devices=8, **{**MODEL, **overrides})
