"""Evals per objective on the held-out batches: each objective's loss, and what each one is for, beside a baseline.

For one set of parameters (and the EMA target encoder's), over the first `eval.batches` held-out batches:
- `<name>_loss` per objective (text, vision, align, world, action): the training loss on held-out data, each
  batch's loss weighted by its units (text tokens, masked images, align pairs, world transitions, action
  chunks). For text, world and action that is the mean over all units; vision (MAE over patches + InfoNCE
  over images) and align (contrastive within a batch) are batch losses, so theirs is the units-weighted mean.
  Beside align's (clip), `align_chance`: the same mean of log C, CLIP's loss when a batch's C pairs all look
  alike, its baseline (it depends on how many pairs each held-out batch packs, not on the model).
- retrieval: image->text and text->image top-1 accuracy over every held-out align pair, pooled across
  batches (cosine similarity of the projected latents), scored two ways. Exact index: a hit only when the
  retrieved item is the query's own partner (chance 1 / pairs). Caption match: a hit when the retrieved
  caption (i2t), or the retrieved image's caption (t2i), is token for token the query's true caption, since
  captions can repeat (the default corpus's are templates over digit, stroke and slant: 460 distinct for
  1,797 digits); its chance is exact for the duplicate structure: the mean over queries of (pairs sharing
  the query's caption) / pairs. Top-1 over a hundred candidates moves late; the mean rank of the true
  partner among the N - 1 others, as a fraction (0: always first, 0.5: chance, whatever N), and recall@10
  (the partner among the 10 most similar, chance 10 / N, CLIP's R@10) show progress before it. Beside them the mean cosine of matched pairs and of pairs with different captions: the gap
  shows whether align separates the latents at all, whatever the top-1 says.
- reconstruction: MSE of the pixel head on masked patches against the normalised pixels, and of predicting
  zero (each patch's own mean, the normalised target's mean) as the baseline; their ratio.
- world: MSE of the predicted latent of chunk t+1 against its layer-normed EMA target, and of copying
  chunk t's target (copy-last-chunk); the ratio model / baseline (< 1: the predictor beats copying). The
  target is the moving EMA encoder, so the raw MSE of two evals has two different yardsticks; `world_nmse`
  divides it by the variance of the same eval's targets across transitions (mean over D): the fraction
  of the target's variance left unexplained (1 - R^2), scale-free, the world loss to compare over a run.
- actions: MSE of Euler-sampled action chunks against the true ones, and of the mean held-out chunk;
  the ratio model / baseline (< 1: sampling beats the mean action).
Every number is built from sums that add across batches (float64 on the host), so any split of the same
batches gives the same metrics. The layout's masking and blinding, the flow-matching noise and the
sampler's noise come from one fixed key per batch index, and eval/suite.py passes the first mixture phase's
held-out pass at every eval: every eval of a run sees the same batches and draws.
Letters: C slots, P patches, X values per patch, D model width, E align width, T horizon, A action values.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
from absl import logging

from codex_jax.config.schema import OBJECTIVES, Config
from codex_jax.runtime import multimodal
from codex_jax.runtime.engine import Engine

PREFIX = "objectives/"
EVAL_STREAM = 0x0E7A1  # Folded into the run's seed: the evals' own key, apart from training's.
SAMPLE_STREAM = 2      # fold_in(batch key, 2): the sampler's noise (the slot draw uses 0, flow matching 1).
ACTION_SAMPLES = 8     # Sampled chunks per condition whose mean is scored beside the single sample.
RECALL_K = 10          # Retrieval recall@K: the true partner among the K most similar.
MAX_BATCHES = 64       # The held-out pass is read whole (the media sources hold few held-out records), up to this.
COUNTS = ("_units", "_pairs", "_captions", "_patches", "_transitions", "_chunks")  # Metrics that count, not score.


# --- Per-batch sums (numpy, float64): they add across batches. -----------------------------------------

def _sq_mean(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
  return np.mean(np.square(np.asarray(x, np.float64)), axis=axes)


def loss_sums(losses: dict, present, units: dict[str, float]) -> dict[str, float]:
  """`<name>_loss_sum` (loss x units) and `<name>_units` per objective; an absent one adds nothing."""
  out = {}
  for i, name in enumerate(OBJECTIVES):
    if name not in losses:
      continue
    n = float(units.get(name, 0.0)) if bool(np.asarray(present)[i]) else 0.0
    out[f"{name}_loss_sum"] = float(losses[name]) * n if n else 0.0
    out[f"{name}_units"] = n
  return out


def reconstruction_sums(pixels_CPX, targets_CPX, patch_masked_CP) -> dict[str, float]:
  """Squared error (mean over X) of the pixel head and of predicting zero, summed over masked patches."""
  m = np.asarray(patch_masked_CP, bool)
  targets = np.asarray(targets_CPX, np.float64)
  return {"recon_sq": float(_sq_mean(np.asarray(pixels_CPX, np.float64) - targets, (-1,))[m].sum()),
          "recon_zero_sq": float(_sq_mean(targets, (-1,))[m].sum()), "recon_patches": float(m.sum())}


def world_sums(prediction_CD, target_CD, last_CD, valid_C) -> dict[str, Any]:
  """Squared error (mean over D) of the prediction and of copying chunk t's target, over valid transitions,
  and the targets' first two moments per D (their variance across transitions, known only at the end)."""
  v = np.asarray(valid_C, bool)
  target = np.asarray(target_CD, np.float64)
  return {"world_sq": float(_sq_mean(np.asarray(prediction_CD, np.float64) - target, (-1,))[v].sum()),
          "world_copy_sq": float(_sq_mean(np.asarray(last_CD, np.float64) - target, (-1,))[v].sum()),
          "world_t1": target[v].sum(0), "world_t2": np.square(target[v]).sum(0), "world_transitions": float(v.sum())}


def variance_of_moments(s1_D: np.ndarray, s2_D: np.ndarray, n: float) -> float:
  """Mean over D of the variance across n vectors, from their sums and sums of squares."""
  if not n:
    return float("nan")
  return float(np.mean(s2_D / n - np.square(s1_D / n)))


def action_sums(sampled_CTA, actions_CTA, valid_C, sampled_mean_CTA=None) -> dict[str, Any]:
  """Squared error (mean over T, A) of sampled chunks (and of the mean of several samples, when given), and
  the first two moments of the true chunks.

  The mean-action baseline needs the mean over every held-out chunk, known only at the end: with
  S1 = sum a, S2 = sum a^2 over n chunks, sum (a - S1/n)^2 = S2 - S1^2 / n, per (t, a).
  """
  v = np.asarray(valid_C, bool)
  actions = np.asarray(actions_CTA, np.float64)[v]
  out = {"action_sq": float(_sq_mean(np.asarray(sampled_CTA, np.float64)[v] - actions, (1, 2)).sum()),
         "action_s1": actions.sum(0), "action_s2": np.square(actions).sum(0), "action_chunks": float(v.sum())}
  if sampled_mean_CTA is not None:
    out["action_mean_of_samples_sq"] = float(_sq_mean(np.asarray(sampled_mean_CTA, np.float64)[v] - actions,
                                                      (1, 2)).sum())
  return out


def action_baseline_mse(s1_TA: np.ndarray, s2_TA: np.ndarray, n: float) -> float:
  """MSE (mean over chunks, T and A) of predicting every chunk by the mean chunk, from the moments."""
  if not n:
    return float("nan")
  return float(np.sum(s2_TA - np.square(s1_TA) / n) / (n * s1_TA.size))


def align_chance_sums(out: dict) -> dict[str, float]:
  """CLIP's loss at chance in one batch, log C for its C pairs (every similarity alike), times C: summed and
  divided by the pairs like align_loss, the pairs-weighted mean of log C, the loss's baseline across batches."""
  n = float(np.sum(out["align"]["valid"])) if bool(np.asarray(out["present"])[OBJECTIVES.index("align")]) else 0.0
  return {"align_chance_sum": n * math.log(n) if n else 0.0}


def retrieval_accuracy(media_NE: np.ndarray, text_NE: np.ndarray) -> tuple[float, float]:
  """(image->text, text->image) top-1 accuracy: pair i is right when its own partner is the most cosine-similar.

  Ties go to the lower index (argmax), so a collapsed embedding scores chance, not 1.
  """
  if len(media_NE) < 2:
    return float("nan"), float("nan")
  unit = lambda x: x / np.sqrt(np.sum(x * x, -1, keepdims=True) + 1e-12)  # noqa: E731
  sim_NN = unit(np.asarray(media_NE, np.float64)) @ unit(np.asarray(text_NE, np.float64)).T
  idx = np.arange(len(sim_NN))
  return float(np.mean(np.argmax(sim_NN, axis=1) == idx)), float(np.mean(np.argmax(sim_NN, axis=0) == idx))


def caption_ids(keys_NK: np.ndarray) -> np.ndarray:
  """Caption keys [N, K] (objectives/slots.caption_keys) -> one small int per distinct caption [N]."""
  return np.unique(np.asarray(keys_NK).reshape(len(keys_NK), -1), axis=0, return_inverse=True)[1].reshape(-1)


def retrieval_scores(media_NE: np.ndarray, text_NE: np.ndarray, caption_N: np.ndarray | None = None
                     ) -> dict[str, float]:
  """Every retrieval metric of N pairs (see the module docstring); `caption_N` names each pair's caption
  (equal ids: equal token sequences), None when unknown: then only the exact-index scores and the cosines.

  Caption match and its chance, with n_c pairs of caption c: a random pick hits for query i with
  probability n_{c(i)} / N, so chance = mean_i n_{c(i)} / N = sum_c n_c^2 / N^2 (both directions alike).
  """
  N = len(media_NE)
  if N < 2:  # One pair has nothing to be confused with.
    return {"retrieval_pairs": float(N), **{f"retrieval_{k}": float("nan") for k in ("i2t", "t2i", "chance")}}
  out = {"retrieval_pairs": float(N), "retrieval_chance": 1.0 / N}
  out["retrieval_i2t"], out["retrieval_t2i"] = retrieval_accuracy(media_NE, text_NE)
  unit = lambda x: x / np.sqrt(np.sum(x * x, -1, keepdims=True) + 1e-12)  # noqa: E731
  sim_NN = unit(np.asarray(media_NE, np.float64)) @ unit(np.asarray(text_NE, np.float64)).T
  same_NN = np.eye(N, dtype=bool) if caption_N is None else caption_N[:, None] == caption_N[None, :]
  own_N = np.diag(sim_NN)
  better_i2t_N, better_t2i_N = np.sum(sim_NN > own_N[:, None], axis=1), np.sum(sim_NN > own_N[None, :], axis=0)
  out["retrieval_i2t_rank"] = float(np.mean(better_i2t_N) / (N - 1))
  out["retrieval_t2i_rank"] = float(np.mean(better_t2i_N) / (N - 1))
  # Recall@K (CLIP's R@K): the true partner among the K best; chance K / N.
  out["retrieval_i2t_r10"], out["retrieval_t2i_r10"] = float(np.mean(better_i2t_N < RECALL_K)), float(
      np.mean(better_t2i_N < RECALL_K))
  out["retrieval_r10_chance"] = min(RECALL_K / N, 1.0)
  out["retrieval_cos_pair"] = float(np.mean(own_N))
  out["retrieval_cos_other"] = float(np.mean(sim_NN[~same_NN])) if (~same_NN).any() else float("nan")
  if caption_N is not None:
    out["retrieval_caption_i2t"] = float(np.mean(same_NN[np.arange(N), np.argmax(sim_NN, axis=1)]))
    out["retrieval_caption_t2i"] = float(np.mean(same_NN[np.argmax(sim_NN, axis=0), np.arange(N)]))
    out["retrieval_caption_chance"] = float(np.mean(same_NN.sum(1)) / N)
    out["retrieval_captions"] = float(len(np.unique(caption_N)))
  return out


def units_of(out: dict) -> dict[str, float]:
  """Each objective's units in one batch's outputs: what its loss is a mean over."""
  units = {"text": float(out["metrics"].get("tokens", 0.0))}
  for name in ("vision", "align", "world", "action"):
    if name in out:
      units[name] = float(np.sum(out[name]["valid"]))
  return units


# --- Accumulation over batches. --------------------------------------------------------------------------

@dataclasses.dataclass
class Totals:
  """The sums of every batch so far, and the valid align latents (retrieval is over all pairs at once)."""

  sums: dict[str, Any] = dataclasses.field(default_factory=dict)
  media: list[np.ndarray] = dataclasses.field(default_factory=list)
  text: list[np.ndarray] = dataclasses.field(default_factory=list)
  captions: list[np.ndarray] = dataclasses.field(default_factory=list)
  align_kind: str = "clip"  # objectives.align.kind: CLIP's InfoNCE has a chance level, log(pairs in the batch).

  def add(self, out: dict) -> None:
    """One batch's objective outputs (runtime/multimodal.objective_outputs, numpy; action with `sampled`)."""
    parts = [loss_sums(out["losses"], out["present"], units_of(out))]
    if "vision" in out:
      v = out["vision"]
      parts.append(reconstruction_sums(v["pixels"], v["targets"], v["patch_masked"]))
    if "world" in out:
      w = out["world"]
      parts.append(world_sums(w["prediction"], w["target"], w["last"], w["valid"]))
    if "action" in out and "sampled" in out["action"]:
      a = out["action"]
      parts.append(action_sums(a["sampled"], a["actions"], a["valid"], a.get("sampled_mean")))
    if "align" in out and self.align_kind == "clip":
      parts.append(align_chance_sums(out))
    for part in parts:
      for k, value in part.items():
        self.sums[k] = self.sums[k] + value if k in self.sums else value
    if "align" in out:
      valid = np.asarray(out["align"]["valid"], bool)
      self.media.append(np.asarray(out["align"]["media"])[valid])
      self.text.append(np.asarray(out["align"]["text"])[valid])
      if "caption" in out["align"]:
        self.captions.append(np.asarray(out["align"]["caption"])[valid])

  def metrics(self) -> dict[str, float]:
    """The flat metrics, without the `objectives/` prefix; NaN where an objective had no held-out units."""
    s, out = self.sums, {}
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    for name in OBJECTIVES:
      if f"{name}_units" in s:
        out[f"{name}_loss"] = ratio(s[f"{name}_loss_sum"], s[f"{name}_units"])
        out[f"{name}_units"] = s[f"{name}_units"]
    if "align_chance_sum" in s:
      out["align_chance"] = ratio(s["align_chance_sum"], s["align_units"])
    if self.media:
      media, text = np.concatenate(self.media), np.concatenate(self.text)
      captions = caption_ids(np.concatenate(self.captions)) if len(self.captions) == len(self.media) else None
      out.update(retrieval_scores(media, text, captions))
    if "recon_patches" in s:
      out["recon_mse"] = ratio(s["recon_sq"], s["recon_patches"])
      out["recon_zero_mse"] = ratio(s["recon_zero_sq"], s["recon_patches"])
      out["recon_ratio"] = ratio(out["recon_mse"], out["recon_zero_mse"])
      out["recon_patches"] = s["recon_patches"]
    if "world_transitions" in s:
      out["world_mse"] = ratio(s["world_sq"], s["world_transitions"])
      out["world_copy_last_mse"] = ratio(s["world_copy_sq"], s["world_transitions"])
      out["world_ratio"] = ratio(out["world_mse"], out["world_copy_last_mse"])
      out["world_target_var"] = variance_of_moments(s["world_t1"], s["world_t2"], s["world_transitions"])
      out["world_nmse"] = ratio(out["world_mse"], out["world_target_var"])
      out["world_copy_last_nmse"] = ratio(out["world_copy_last_mse"], out["world_target_var"])
      out["world_transitions"] = s["world_transitions"]
    if "action_chunks" in s:
      out["action_mse"] = ratio(s["action_sq"], s["action_chunks"])
      out["action_mean_mse"] = action_baseline_mse(s["action_s1"], s["action_s2"], s["action_chunks"])
      out["action_ratio"] = ratio(out["action_mse"], out["action_mean_mse"])
      if "action_mean_of_samples_sq" in s:
        out["action_samples_mean_mse"] = ratio(s["action_mean_of_samples_sq"], s["action_chunks"])
        out["action_samples_mean_ratio"] = ratio(out["action_samples_mean_mse"], out["action_mean_mse"])
      out["action_chunks"] = s["action_chunks"]
    return {k: float(v) for k, v in out.items()}


# --- The device side and the whole eval. -----------------------------------------------------------------

def eval_specs(spec: multimodal.Spec) -> tuple[multimodal.Spec, multimodal.Spec]:
  """(every image masked, every caption blind; no image masked, every caption blind): the held-out draws.

  Training splits each batch at random (a share of images masked for MAE, a share of captions blind for
  align); the evals take every unit instead, in two passes: the first scores MAE on every image and the
  other objectives, the second scores align on every pair (align needs the picture unmasked).
  """
  o = spec.objectives
  first = dataclasses.replace(o, vision=dataclasses.replace(o.vision, masked_fraction=1.0),
                              align=dataclasses.replace(o.align, blind_fraction=1.0))
  second = dataclasses.replace(first, vision=dataclasses.replace(o.vision, masked_fraction=0.0))
  return dataclasses.replace(spec, objectives=first), dataclasses.replace(spec, objectives=second)


def make_runner(cfg: Config, engine: Engine) -> Callable[..., dict]:
  """(params, target_params, global batch, key) -> objective_outputs with `action.sampled`, replicated.

  One jit on the run's engine: the two held-out passes of `eval_specs` (align from the second),
  the heads and the Euler sampler (objectives.action.sample_steps): one sampled chunk per condition, and
  the mean of ACTION_SAMPLES chunks (the policy's MSE-optimal prediction) as `sampled_mean`.
  """
  model, steps = engine.model, cfg.objectives.action.sample_steps
  first, second = eval_specs(engine.spec)

  def run(params, target_params, batch, key):
    outputs = functools.partial(multimodal.objective_outputs, params, target_params, batch, key, model=model,
                                pipeline=engine.pipeline)
    out = outputs(spec=first)
    if "align" in out:
      paired = outputs(spec=second)
      out["align"] = paired["align"]
      out["losses"] = {**out["losses"], "align": paired["losses"]["align"]}
      out["present"] = out["present"].at[OBJECTIVES.index("align")].set(paired["present"][OBJECTIVES.index("align")])
    if "action" in out:
      noise = jax.random.split(jax.random.fold_in(key, SAMPLE_STREAM), ACTION_SAMPLES)
      sample = lambda k: multimodal.sample_actions(params, out["action"]["condition"], k, model=model,  # noqa: E731
                                                   steps=steps)
      sampled_SCTA = jax.vmap(sample)(noise)
      out["action"] = {**out["action"], "sampled": sampled_SCTA[0], "sampled_mean": sampled_SCTA.mean(0)}
    return out

  return engine.jit(run, in_shardings=(engine.param_shardings, engine.target_shardings, engine.data_sharding,
                                       engine.replicated))


@dataclasses.dataclass
class ObjectiveEval:
  """The per-objective evals of one run: built once (the jit is compiled at the first eval)."""

  run: Callable[..., dict]           # make_runner's function.
  to_global: Callable[[dict], dict]  # A process's host batch -> the global batch.
  key: jax.Array                     # The evals' key; batch i uses fold_in(key, i).
  num_batches: int
  needs_target: bool                 # Vision or world on: no metrics without the EMA target's parameters.
  align_kind: str = "clip"

  @classmethod
  def create(cls, cfg: Config, engine: Engine, to_global: Callable[[dict], dict]) -> ObjectiveEval:
    key = jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed), EVAL_STREAM)
    return cls(make_runner(cfg, engine), to_global, key, MAX_BATCHES, engine.has_target,
               cfg.objectives.align.kind)

  def scores(self, params, target_params, batches: Callable[[], Iterable[dict]]) -> dict[str, float]:
    """`objectives/...` over the first num_batches of `batches()` (a fresh held-out pass, closed after); {}
    without the EMA target's parameters when vision or world needs them."""
    if target_params is None and self.needs_target:
      logging.info("Objective evals skipped: vision / world need the EMA target encoder's parameters")
      return {}
    target_params = {} if target_params is None else target_params
    totals, start, iterator = Totals(align_kind=self.align_kind), time.perf_counter(), batches()
    try:
      for i, batch in enumerate(iterator):
        if i >= self.num_batches:
          break
        out = self.run(params, target_params, self.to_global(batch), jax.random.fold_in(self.key, i))
        totals.add(jax.device_get(out))
    finally:
      close = getattr(iterator, "close", None)
      if close is not None:
        close()
    metrics = totals.metrics()
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if math.isfinite(v) and not k.endswith(COUNTS))
    logging.info("Objective evals: %s (%.1f s)", shown, time.perf_counter() - start)
    return {f"{PREFIX}{k}": v for k, v in metrics.items()}
