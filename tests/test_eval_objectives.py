"""Evals per objective: the metrics on hand-made arrays against NumPy, exact accumulation across batches, and
one end-to-end eval of a tiny multimodal model on hand-made batches."""

import math
import os

import jax
import numpy as np
import pytest

from codex_jax.eval import objectives as evals
from codex_jax.eval import report
from codex_jax.parallel.mesh import build_mesh
from codex_jax.train import feed
from codex_jax.train.setup import build_trainer
from tests.helpers import MICRO, load
from tests.objective_batch import make_batch

# --- metrics on hand-made arrays -------------------------------------------------------------------------


def test_retrieval_accuracy_on_a_known_similarity_matrix():
  # Text latents are the unit axes, so cosine(media i, text j) = media[i, j] / |media[i]|: the matrix is
  # written by hand. Row 1 prefers text 0 (one image->text miss); every column's best row is its own.
  text = np.eye(4) * 5.0  # Scale must not matter.
  media = np.array([[0.9, 0.1, 0, 0], [0.8, 0.2, 0, 0], [0, 0, 1.0, 0.5], [0, 0, 0.2, 0.9]])
  assert evals.retrieval_accuracy(media, text) == (0.75, 1.0)
  assert evals.retrieval_accuracy(text, media) == (1.0, 0.75)  # Swapping the sides swaps the directions.
  collapsed = np.ones((5, 3))  # All ties: only pair 0 is "right", as chance would have it.
  assert evals.retrieval_accuracy(collapsed, collapsed) == (0.2, 0.2)
  assert all(math.isnan(x) for x in evals.retrieval_accuracy(media[:1], text[:1]))


def test_reconstruction_world_and_action_baselines_match_numpy():
  rng = np.random.default_rng(0)
  pixels, targets = rng.normal(size=(3, 4, 6)), rng.normal(size=(3, 4, 6))
  masked = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 0]], bool)
  got = evals.reconstruction_sums(pixels, targets, masked)
  assert got["recon_patches"] == 5
  np.testing.assert_allclose(got["recon_sq"] / 5, np.mean(((pixels - targets) ** 2).mean(-1)[masked]), rtol=1e-12)
  np.testing.assert_allclose(got["recon_zero_sq"] / 5, np.mean((targets ** 2).mean(-1)[masked]), rtol=1e-12)

  pred, target, last = rng.normal(size=(3, 5, 8))
  valid = np.array([True, False, True, True, False])
  got = evals.world_sums(pred, target, last, valid)
  np.testing.assert_allclose(got["world_copy_sq"] / 3, np.mean(((last - target) ** 2).mean(-1)[valid]), rtol=1e-12)
  np.testing.assert_allclose(got["world_sq"] / 3, np.mean(((pred - target) ** 2).mean(-1)[valid]), rtol=1e-12)

  sampled, actions = rng.normal(size=(2, 6, 3, 2))
  valid = np.array([True, True, False, True, True, False])
  got = evals.action_sums(sampled, actions, valid)
  kept = actions[valid]
  want_mean = np.mean((kept - kept.mean(0)) ** 2)  # Every chunk predicted by the mean chunk.
  np.testing.assert_allclose(evals.action_baseline_mse(got["action_s1"], got["action_s2"], 4), want_mean, rtol=1e-12)
  np.testing.assert_allclose(got["action_sq"] / 4, np.mean((sampled[valid] - kept) ** 2), rtol=1e-12)


def _outputs(rng, C: int, present_align: bool = True) -> dict:
  """One batch's objective outputs by hand; the world and action losses are NumPy means of per-unit errors."""
  valid = rng.uniform(size=C) < 0.7
  valid[:2] = True
  world_err, action_err = rng.uniform(size=C), rng.uniform(size=C)
  tokens = float(rng.integers(5, 50))
  out = {"metrics": {"tokens": tokens},
         "vision": {"pixels": rng.normal(size=(C, 4, 6)), "targets": rng.normal(size=(C, 4, 6)),
                    "patch_masked": rng.uniform(size=(C, 4)) < 0.75, "valid": valid},
         "align": {"media": rng.normal(size=(C, 5)), "text": rng.normal(size=(C, 5)), "valid": valid},
         "world": {"prediction": rng.normal(size=(C, 8)), "target": rng.normal(size=(C, 8)),
                   "last": rng.normal(size=(C, 8)), "valid": valid, "err": world_err},
         "action": {"sampled": rng.normal(size=(C, 3, 2)), "actions": rng.normal(size=(C, 3, 2)) + 0.5,
                    "valid": valid, "err": action_err}}
  out["losses"] = {"text": rng.uniform(2, 4), "vision": rng.uniform(1, 2), "align": rng.uniform(1, 2),
                   "world": world_err[valid].mean(), "action": action_err[valid].mean()}
  out["present"] = np.array([True, True, present_align, True, True])
  return out


def _concatenated(a: dict, b: dict) -> dict:
  """The two batches as one: every slot array concatenated; losses pooled as the per-unit means they are."""
  out = {"metrics": {"tokens": a["metrics"]["tokens"] + b["metrics"]["tokens"]}, "present": a["present"] | b["present"]}
  for name in ("vision", "align", "world", "action"):
    out[name] = {k: np.concatenate([a[name][k], b[name][k]]) for k in a[name]}
  n_a, n_b = a["vision"]["valid"].sum(), b["vision"]["valid"].sum()
  mean = lambda name: (a["losses"][name] * n_a + b["losses"][name] * n_b) / (n_a + n_b)  # noqa: E731
  t_a, t_b = a["metrics"]["tokens"], b["metrics"]["tokens"]
  out["losses"] = {"text": (a["losses"]["text"] * t_a + b["losses"]["text"] * t_b) / (t_a + t_b),
                   **{name: mean(name) for name in ("vision", "align")},
                   "world": out["world"]["err"][out["world"]["valid"]].mean(),
                   "action": out["action"]["err"][out["action"]["valid"]].mean()}
  return out


def test_two_batches_accumulate_to_exactly_one_pass_over_both():
  rng = np.random.default_rng(1)
  a, b = _outputs(rng, 7), _outputs(rng, 9)
  two = evals.Totals()
  two.add(a)
  two.add(b)
  one = evals.Totals()
  one.add(_concatenated(a, b))
  got, want = two.metrics(), one.metrics()
  assert got.keys() == want.keys() and len(got) == 26
  for k in got:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-12, err_msg=k)
  # World and action losses are per-unit means: across batches, the mean over every held-out unit.
  world = np.concatenate([a["world"]["err"][a["world"]["valid"]], b["world"]["err"][b["world"]["valid"]]])
  np.testing.assert_allclose(got["world_loss"], world.mean(), rtol=1e-12)
  assert got["retrieval_pairs"] == a["align"]["valid"].sum() + b["align"]["valid"].sum()
  assert got["retrieval_chance"] == 1 / got["retrieval_pairs"]


def test_an_absent_objective_adds_nothing_and_no_units_give_nan():
  rng = np.random.default_rng(2)
  a, b = _outputs(rng, 6, present_align=False), _outputs(rng, 6)
  totals = evals.Totals()
  totals.add(a)
  totals.add(b)
  np.testing.assert_allclose(totals.metrics()["align_loss"], b["losses"]["align"], rtol=1e-12)
  empty = evals.Totals()
  empty.add(a)
  assert math.isnan(empty.metrics()["align_loss"]) and empty.metrics()["align_units"] == 0


def test_the_report_prints_each_objective_beside_its_baseline():
  totals = evals.Totals()
  totals.add(_outputs(np.random.default_rng(3), 6))
  scores = {f"{evals.PREFIX}{k}": v for k, v in totals.metrics().items()}
  text = report.format_report(report.build_report([], scores, 10))
  for words in ("objectives held-out loss: text", "retrieval top-1: image->text", "copy-last-chunk",
                "vs", "mean action", "predicting zero"):
    assert words in text, text


# --- end to end ----------------------------------------------------------------------------------------

PATCHES = 4  # data.image_size 8 / data.patch_size 4.
MM = {**MICRO, "data.image_size": 8, "objectives.weights": (1.0, 1.0, 1.0, 1.0, 1.0), "objectives.action.horizon": 2,
      "objectives.align.blind_fraction": 1.0, "objectives.action.sample_steps": 3,
      "eval.batches": 2, "model.num_layers": 1, "model.remat": "none", "model.attention_chunks": 1}  # Quick to compile.


@pytest.fixture(scope="module")
def tiny_eval():
  cfg = load("tiny", num_devices=1, **MM)
  trainer = build_trainer(cfg, build_mesh(cfg.mesh, jax.devices()[:1]))
  # Parameters drawn directly in the state's shapes: jitting init would cost more than the eval itself.
  rng = np.random.default_rng(0)
  abstract = jax.eval_shape(trainer.init)
  params = jax.tree.map(lambda a: (0.1 * rng.normal(size=a.shape)).astype(a.dtype), abstract.params)
  target = {k: jax.tree.map(lambda x: x * 0.9, params[k]) for k in abstract.target_params}
  ev = evals.ObjectiveEval.create(cfg, trainer, lambda b: feed.to_global(b, trainer.data_sharding))
  return cfg, ev, params, target


def test_the_eval_of_a_tiny_multimodal_model_returns_every_metric_finite_and_reproducibly(tiny_eval):
  cfg, ev, params, target = tiny_eval
  batches = [make_batch(8, 32, 96, PATCHES, 256, seed=s) for s in range(3)]  # The whole pass is read.
  scores = ev.scores(params, target, lambda: iter(batches))
  names = [f"{n}_{m}" for n in ("text", "vision", "align", "world", "action") for m in ("loss", "units")]
  names += [f"retrieval_{m}" for m in ("i2t", "t2i", "chance", "pairs")]
  names += [f"recon_{m}" for m in ("mse", "zero_mse", "ratio", "patches")]
  names += [f"world_{m}" for m in ("mse", "copy_last_mse", "ratio", "transitions")]
  names += [f"action_{m}" for m in ("mse", "mean_mse", "ratio", "chunks", "samples_mean_mse", "samples_mean_ratio")]
  assert sorted(scores) == sorted(f"objectives/{n}" for n in names)
  assert all(np.isfinite(v) for v in scores.values()), scores
  assert scores["objectives/retrieval_pairs"] >= 2 and scores["objectives/action_chunks"] > 0
  # The world model's eval MSE is its training loss on the same transitions.
  np.testing.assert_allclose(scores["objectives/world_mse"], scores["objectives/world_loss"], rtol=1e-5)
  assert ev.scores(params, target, lambda: iter(batches)) == scores  # A fixed key per batch: the same draws.
  assert ev.scores(params, None, lambda: iter(batches)) == {}  # Vision and world cannot run without the target.


# --- the offline eval's restore: the EMA target encoder beside the parameters ---------------------------

def test_the_target_encoder_restores_beside_the_params_and_a_changed_byte_is_refused(tmp_path):
  import grain

  from codex_jax.checkpoint import merkle
  from codex_jax.checkpoint.errors import CheckpointIntegrityError
  from codex_jax.checkpoint.manager import Checkpointer, tensor_files
  from codex_jax.config.schema import CheckpointConfig

  rng = np.random.default_rng(4)
  state = {"params": {"w": rng.normal(size=(64, 8)).astype(np.float32)},
           "target_params": {"w": rng.normal(size=(64, 8)).astype(np.float32)},
           "opt_state": {"mu": np.zeros((64, 8), np.float32)}, "step": np.int32(1)}
  abstract = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)  # noqa: E731
  checkpointer = Checkpointer(str(tmp_path), CheckpointConfig(async_save=False))
  checkpointer.start_fresh({"kind": "init", "seed": 0, "content_root": merkle.EMPTY_ROOT})
  try:
    checkpointer.save(1, state, iter(grain.MapDataset.range(4).to_iter_dataset()), {}, {})
    meta = checkpointer.read_meta(1)
    got = checkpointer.restore_fields(1, {"params": abstract(state["params"]),
                                          "target_params": abstract(state["target_params"])}, meta=meta)
    assert sorted(got) == ["params", "target_params"]  # The optimizer moments stay on disk.
    for name in ("params", "target_params"):
      np.testing.assert_array_equal(got[name]["w"], state[name]["w"])
    only = checkpointer.restore_params(1, abstract(state["params"]), meta=meta)
    np.testing.assert_array_equal(only["w"], state["params"]["w"])
    chunk = max(tensor_files(checkpointer.step_dir(1), "target_params/w"), key=lambda f: os.path.getsize(f))
    data = bytearray(open(chunk, "rb").read())
    data[len(data) // 2] ^= 0x04
    with open(chunk, "wb") as f:
      f.write(bytes(data))
    with pytest.raises(CheckpointIntegrityError, match=r"tensor target_params/w .*expected"):
      checkpointer.restore_fields(1, {"params": abstract(state["params"]),
                                      "target_params": abstract(state["target_params"])}, meta=meta)
  finally:
    checkpointer.close()
