"""Evals per objective: the metrics on hand-made arrays against NumPy, exact accumulation across batches, and
one end-to-end eval of a tiny multimodal model on hand-made batches."""

import math
import os

import chex
import jax
import numpy as np
import pytest

from codex_jax.eval import objective_scores as evals
from codex_jax.eval import report
from codex_jax.parallel.mesh import build_mesh
from codex_jax.runtime import feed
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


def test_caption_match_retrieval_and_its_chance_on_duplicate_captions():
  # Pairs 0, 1 share caption A, 2 and 3 have B and C. Same similarity matrix as above: image 1's best text
  # is text 0, a miss by index but a hit by caption (both "A").
  text = np.eye(4) * 5.0
  media = np.array([[0.9, 0.1, 0, 0], [0.8, 0.2, 0, 0], [0, 0, 1.0, 0.5], [0, 0, 0.2, 0.9]])
  got = evals.retrieval_scores(media, text, np.array([7, 7, 3, 5]))
  assert (got["retrieval_i2t"], got["retrieval_t2i"], got["retrieval_chance"]) == (0.75, 1.0, 0.25)
  assert (got["retrieval_caption_i2t"], got["retrieval_caption_t2i"]) == (1.0, 1.0)
  # Chance: a random pick shares the query's caption with probability 2/4 for pairs 0, 1 and 1/4 for 2, 3.
  assert got["retrieval_caption_chance"] == np.mean([2 / 4, 2 / 4, 1 / 4, 1 / 4]) and got["retrieval_captions"] == 3
  # Ranks: image 1's own text is second (one better of 3 others): i2t ranks (0, 1, 0, 0) / 3; t2i all first.
  assert (got["retrieval_i2t_rank"], got["retrieval_t2i_rank"]) == (1 / 12, 0.0)
  assert (got["retrieval_i2t_r10"], got["retrieval_r10_chance"]) == (1.0, 1.0)  # K = 10 > 4 pairs: all in.
  unit = media / np.linalg.norm(media, axis=1, keepdims=True)
  np.testing.assert_allclose(got["retrieval_cos_pair"], np.mean(np.diag(unit)), rtol=1e-12)
  other = [unit[i, j] for i in range(4) for j in range(4) if not (i < 2 and j < 2) and i != j]
  np.testing.assert_allclose(got["retrieval_cos_other"], np.mean(other), rtol=1e-12)
  # Every caption distinct: caption match is exact-index retrieval and its chance 1 / N.
  distinct = evals.retrieval_scores(media, text, np.arange(4))
  assert (distinct["retrieval_caption_i2t"], distinct["retrieval_caption_chance"]) == (0.75, 0.25)
  # Chance by simulation: a random similarity matrix's caption-match rate averages to the formula.
  rng, ids = np.random.default_rng(0), np.array([0, 0, 0, 1, 1, 2])
  draws = [evals.retrieval_scores(rng.normal(size=(6, 3)), rng.normal(size=(6, 3)), ids) for _ in range(3000)]
  assert abs(np.mean([d["retrieval_caption_i2t"] for d in draws]) - (9 + 4 + 1) / 36) < 0.02
  assert abs(np.mean([d["retrieval_i2t_rank"] for d in draws]) - 0.5) < 0.02  # Chance rank: 0.5.
  # Recall@10 over 40 pairs: partner ranked 0-9 of the 39 others; by chance 10 / 40.
  got = evals.retrieval_scores(np.eye(40), np.roll(np.eye(40), 1, axis=1) + 0.5 * np.eye(40))
  assert got["retrieval_i2t_r10"] == 1.0 and got["retrieval_r10_chance"] == 0.25
  far = evals.retrieval_scores(np.eye(40), np.roll(np.eye(40), 1, axis=1))  # Own partner tied at 0 with 38.
  assert far["retrieval_i2t_r10"] == 1.0 and far["retrieval_i2t"] == 0.0
  draws = [evals.retrieval_scores(rng.normal(size=(40, 3)), rng.normal(size=(40, 3))) for _ in range(300)]
  assert abs(np.mean([d["retrieval_i2t_r10"] for d in draws]) - 0.25) < 0.02


def test_caption_keys_name_token_sequences_per_pair_slot():
  from codex_jax.objectives.slots import caption_keys
  # Slots 0..3 (4 = trash): captions [5, 6], [5, 6] (equal), [6, 5] (same tokens, other order), [5] (prefix).
  tokens = np.array([0, 5, 6, 0, 5, 6, 9, 6, 5, 0, 5, 8])
  slot = np.array([0, 0, 0, 1, 1, 1, 4, 2, 2, 3, 3, 4])
  text = np.array([0, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 1], np.float32)
  keys = np.asarray(caption_keys(tokens, slot, text, 4))
  assert keys.shape == (4, 3) and keys.dtype == np.uint32
  assert (keys[0] == keys[1]).all() and len({tuple(k) for k in keys}) == 3
  assert list(keys[:, 2]) == [2, 2, 2, 1]


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
  np.testing.assert_allclose(evals.variance_of_moments(got["world_t1"], got["world_t2"], 3),
                             np.mean(np.var(target[valid], axis=0)), rtol=1e-12)
  totals = evals.Totals(sums=got)
  m = totals.metrics()  # Normalised: scale-free, so a target (and prediction) twice as large reads the same.
  twice = evals.Totals(sums=evals.world_sums(2 * pred, 2 * target, 2 * last, valid)).metrics()
  np.testing.assert_allclose(twice["world_nmse"], m["world_nmse"], rtol=1e-12)
  np.testing.assert_allclose(twice["world_mse"], 4 * m["world_mse"], rtol=1e-12)
  np.testing.assert_allclose(m["world_nmse"], m["world_mse"] / np.mean(np.var(target[valid], axis=0)), rtol=1e-12)

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
         "align": {"media": rng.normal(size=(C, 5)), "text": rng.normal(size=(C, 5)), "valid": valid,
                   "caption": rng.integers(0, 3, size=(C, 3)).astype(np.uint32)},
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
  assert got.keys() == want.keys() and len(got) == 41
  for k in set(got) - {"align_chance"}:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-12, err_msg=k)
  # Align's chance level is per batch (log of its pairs): two batches of n_a, n_b pairs, not one of n_a + n_b.
  n_a, n_b = a["align"]["valid"].sum(), b["align"]["valid"].sum()
  np.testing.assert_allclose(got["align_chance"], (n_a * np.log(n_a) + n_b * np.log(n_b)) / (n_a + n_b), rtol=1e-12)
  np.testing.assert_allclose(want["align_chance"], np.log(n_a + n_b), rtol=1e-12)
  assert "align_chance" not in _totals_of(a, align_kind="siglip").metrics()  # Sigmoid pairs: no log-C chance.
  # World and action losses are per-unit means: across batches, the mean over every held-out unit.
  world = np.concatenate([a["world"]["err"][a["world"]["valid"]], b["world"]["err"][b["world"]["valid"]]])
  np.testing.assert_allclose(got["world_loss"], world.mean(), rtol=1e-12)
  assert got["retrieval_pairs"] == a["align"]["valid"].sum() + b["align"]["valid"].sum()
  assert got["retrieval_chance"] == 1 / got["retrieval_pairs"]


def _totals_of(*outputs, **kwargs) -> evals.Totals:
  totals = evals.Totals(**kwargs)
  for out in outputs:
    totals.add(out)
  return totals


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
  for words in ("objectives held-out loss: text", "align at chance", "retrieval top-1, exact pair: image->text", "retrieval recall@10: image->text",
                "retrieval top-1, caption match: image->text", "world model / target variance", "copy-last-chunk",
                "vs", "mean action", "predicting zero"):
    assert words in text, text


# --- end to end ----------------------------------------------------------------------------------------

PATCHES = 4  # data.image_size 8 / data.patch_size 4.
MM = {**MICRO, "data.image_size": 8, "objectives.weights": (1.0, 1.0, 1.0, 1.0, 1.0), "objectives.action.horizon": 2,
      "objectives.align.blind_fraction": 1.0, "objectives.action.sample_steps": 3,
      "eval.batches": 2, "model.num_layers": 1, "model.remat": "none", "model.attention_chunks": 1,  # Quick to compile.
      "model.mtp_depth": 1}  # Multi-token prediction beside every objective: the evals must not mind its modules.


@pytest.fixture(scope="module")
def tiny_eval():
  cfg = load("tiny", num_devices=1, **MM)
  trainer = build_trainer(cfg, build_mesh(cfg.mesh, jax.devices()[:1]))
  # Parameters drawn directly in the state's shapes: jitting init would cost more than the eval itself.
  rng = np.random.default_rng(0)
  abstract = jax.eval_shape(trainer.init)
  params = jax.tree.map(lambda a: (0.1 * rng.normal(size=a.shape)).astype(a.dtype), abstract.params)
  target = {k: jax.tree.map(lambda x: x * 0.9, params[k]) for k in abstract.target_params}
  ev = evals.ObjectiveEval.create(cfg, trainer.engine, lambda b: feed.to_global(b, trainer.engine.data_sharding))
  return cfg, ev, params, target


def test_the_eval_of_a_tiny_multimodal_model_returns_every_metric_finite_and_reproducibly(tiny_eval):
  cfg, ev, params, target = tiny_eval
  batches = [make_batch(8, 32, 96, PATCHES, 256, seed=s) for s in range(3)]  # The whole pass is read.
  scores = ev.scores(params, target, lambda: iter(batches))
  names = [f"{n}_{m}" for n in ("text", "vision", "align", "world", "action") for m in ("loss", "units")]
  names += ["align_chance"]
  names += [f"retrieval_{m}" for m in ("i2t", "t2i", "chance", "pairs", "caption_i2t", "caption_t2i",
                                       "caption_chance", "captions", "cos_pair", "cos_other", "i2t_rank",
                                       "t2i_rank", "i2t_r10", "t2i_r10", "r10_chance")]
  names += [f"recon_{m}" for m in ("mse", "zero_mse", "ratio", "patches")]
  names += [f"world_{m}" for m in ("mse", "copy_last_mse", "ratio", "transitions", "target_var", "nmse",
                                   "copy_last_nmse")]
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
  from codex_jax.checkpoint.files import write_files
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
    write_files(checkpointer.step_dir(1))  # Re-listed: the tensor's own hash must refuse it.
    with pytest.raises(CheckpointIntegrityError, match=r"do not match their recorded hash: tensor target_params/w"):
      checkpointer.restore_fields(1, {"params": abstract(state["params"]),
                                      "target_params": abstract(state["target_params"])}, meta=meta)
  finally:
    checkpointer.close()


# --- align and action only: no EMA target encoder, through a checkpoint and the evals --------------------

def test_an_align_and_action_model_has_no_target_encoder_checkpoints_and_is_evaluated(tmp_path):
  """Neither vision nor world: the EMA target is empty, a checkpoint holds it as such, and the evals score
  align and action without it (and MTP beside them). (A subprocess `codex train` + `codex eval` of this config
  passed when it was built; at 135 s of test time it gave way to this in-process check.)"""
  import grain

  from codex_jax.checkpoint import merkle
  from codex_jax.checkpoint.manager import Checkpointer
  from codex_jax.config.schema import CheckpointConfig

  cfg = load("tiny", num_devices=1, **{**MM, "objectives.weights": (1.0, 0.0, 1.0, 0.0, 1.0)})
  trainer = build_trainer(cfg, build_mesh(cfg.mesh, jax.devices()[:1]))
  abstract = jax.eval_shape(trainer.init)
  assert abstract.target_params == {} and "mtp" in abstract.params
  assert {"align_media", "flow_head"} <= set(abstract.params["objectives"])
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: (0.1 * rng.normal(size=a.shape)).astype(a.dtype), abstract.params)
  checkpointer = Checkpointer(str(tmp_path), CheckpointConfig(async_save=False))
  checkpointer.start_fresh({"kind": "init", "seed": 0, "content_root": merkle.EMPTY_ROOT})
  try:
    checkpointer.save(1, {"params": params, "target_params": {}, "step": np.int32(1)},
                      iter(grain.MapDataset.range(4).to_iter_dataset()), {}, {})
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    restored = checkpointer.restore_params(1, shapes, meta=checkpointer.read_meta(1))
  finally:
    checkpointer.close()
  chex.assert_trees_all_equal(jax.device_get(restored), params)
  ev = evals.ObjectiveEval.create(cfg, trainer.engine, lambda b: feed.to_global(b, trainer.engine.data_sharding))
  batches = [make_batch(8, 32, 96, PATCHES, 256, seed=s) for s in range(2)]
  scores = ev.scores(restored, {}, lambda: iter(batches))
  for key in ("text_loss", "align_loss", "action_loss", "action_ratio", "retrieval_pairs", "retrieval_i2t_r10"):
    assert np.isfinite(scores[f"objectives/{key}"]), key
  assert not any(k.startswith(("objectives/vision", "objectives/world", "objectives/recon")) for k in scores)


def test_every_eval_of_a_run_scores_the_objectives_on_the_first_phases_batches():
  """A later mixture phase packs other pairs together; the contrastive losses would move with it alone."""
  import types

  from codex_jax.config.schema import CheckpointConfig
  from codex_jax.eval.suite import Suite

  asked, seen = [], []
  stub = types.SimpleNamespace(
      cfg=types.SimpleNamespace(checkpoint=CheckpointConfig(average_count=0)), scores=lambda params, step: {},
      eval_batches=lambda step: asked.append(step) or iter([step]),
      objectives=types.SimpleNamespace(scores=lambda p, t, batches: seen.append(list(batches())) or {}))
  for step in (100, 300):
    Suite.evaluate(stub, step, params=None, target_params={})
  assert asked == [0, 0] and seen == [[0], [0]]
