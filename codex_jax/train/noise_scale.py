"""The gradient noise scale B_simple = tr(Sigma) / |G|^2, estimated online from micro-batch gradients.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training"), appendix A: for gradients averaged
over batches of B_small and B_big examples, E|G_B|^2 = |G|^2 + tr(Sigma) / B, so

  |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
  tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

are unbiased; each is smoothed by an exponential moving average before the ratio is taken (the ratio of
unbiased estimates is not unbiased, and one step's estimate of |G|^2 can even be negative). Here the
update's batch of B rows (all its accumulated micro-batches) is split into k parts: B_small = B / k
(|G_small|^2 is the mean of the k parts' gradients' squared norms, so all of them count) and B_big = B
(the mean of the k gradients). The averages are checkpointed (the meta item) and restored on resume: the
batch ramp's cap (train/batch_ramp.py) reads the estimate.
The example is one sequence (row): B_simple is in sequences; times seq_len, in tokens. Each row's loss is
the mean over its targets, so micro-batch gradients average to the global one when rows hold equal
counts of targets (packed rows do, up to their last document). The gradient is that of the next-token
objective (with z-loss); multi-token-prediction terms are left out.

The probe is jitted apart from train_step, so a run with train.noise_scale_every = 0 compiles nothing
more; when on, every noise_scale_every steps it differentiates the update's batch again, k times (one
compile per distinct batch size when the batch ramps).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import optax
from absl import logging

from codex_jax.config.schema import Config
from codex_jax.runtime.engine import Engine
from codex_jax.train import accumulate
from codex_jax.train import step as step_lib


def unbiased(small_sq, big_sq, b_small: float, b_big: float):
  """(|G|^2, tr(Sigma)) estimates from squared gradient norms at batch sizes b_small < b_big."""
  g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
  trace = (small_sq - big_sq) / (1 / b_small - 1 / b_big)
  return g2, trace


def micro_grad_norms(grad_fn: Callable, params, batch: dict, k: int) -> dict:
  """Mean squared norm of the k micro-batch gradients (rows split in k, train/accumulate.py's strided split)
  and squared norm of their mean."""
  def one(mb, _):
    g = grad_fn(params, mb)
    return g, optax.tree.norm(g, squared=True)

  mean, small_sq = accumulate.accumulate(one, batch, k)
  return {"small_sq": small_sq, "big_sq": optax.tree.norm(mean, squared=True)}


def _finite(x: float | None) -> float | None:
  return x if x is not None and math.isfinite(x) else None  # Checkpoint meta is strict JSON.


class Ema:
  """Moving averages of |G|^2 and tr(Sigma), started at their first values (no zero-start bias)."""

  def __init__(self, decay: float):
    self.decay, self.g2, self.trace = decay, None, None

  def update(self, g2: float, trace: float) -> float:
    """Folds in one pair of estimates; returns B_simple of the averages (inf while |G|^2 <= 0)."""
    if self.g2 is None:
      self.g2, self.trace = g2, trace
    else:
      self.g2 = self.decay * self.g2 + (1 - self.decay) * g2
      self.trace = self.decay * self.trace + (1 - self.decay) * trace
    return self.estimate()

  def estimate(self) -> float | None:
    """B_simple of the averages: None before the first measurement, inf while |G|^2 <= 0."""
    if self.g2 is None:
      return None
    return self.trace / self.g2 if self.g2 > 0 else float("inf")

  def state(self) -> dict:
    """The averages for the checkpoint's meta (JSON; a non-finite value is saved as None)."""
    return {"g2": _finite(self.g2), "trace": _finite(self.trace), "b_simple": _finite(self.estimate())}

  def restore(self, saved: dict | None) -> None:
    """Continues from a checkpoint's averages, so a resumed run's estimates (and the batch ramp's caps they
    set) are an uninterrupted run's."""
    if saved and saved.get("g2") is not None and saved.get("trace") is not None:
      self.g2, self.trace = float(saved["g2"]), float(saved["trace"])


@dataclasses.dataclass
class Probe:
  """Measures and logs noise_scale/* every `every` steps; a no-op when every is 0."""

  every: int
  k: int = 1
  seq_len: int = 1
  norms: Callable | None = None  # jitted (params, batch) -> {small_sq, big_sq}.
  ema: Ema | None = None
  write: Callable | None = None  # (step, scalars) -> None.
  pending: tuple | None = None  # (step, rows, dispatched norms) until `collect`.

  @classmethod
  def create(cls, cfg: Config, engine: Engine, write: Callable) -> Probe:
    t = cfg.train
    if t.noise_scale_every == 0:
      return cls(0)

    def grad_fn(params, mb):
      return step_lib.value_and_grad(params, mb, model=engine.model, z_loss=t.z_loss, pipeline=engine.pipeline)[1]

    jitted = engine.jit(lambda params, batch: micro_grad_norms(grad_fn, params, batch, t.noise_scale_microbatches),
                        in_shardings=(engine.param_shardings, engine.data_sharding))
    return cls(t.noise_scale_every, t.noise_scale_microbatches, cfg.data.seq_len, jitted, Ema(t.noise_scale_ema),
               write)

  @property
  def b_simple(self) -> float | None:
    """The current estimate in sequences (None while off or before the first measurement)."""
    return None if self.ema is None else self.ema.estimate()

  def state(self) -> dict | None:
    """What a checkpoint keeps of the probe: its moving averages (None while off)."""
    return None if self.ema is None else self.ema.state()

  def restore(self, saved: dict | None) -> None:
    if self.ema is not None:
      self.ema.restore(saved)

  def maybe_measure(self, step: int, params, batch: dict) -> None:
    """At every `every`-th step (0-based, before its update), dispatches the measurement at `params` on `batch`
    (the update's batch on the mesh, feed.to_global: B_big is its rows, B_small = B_big / k); `collect` reads
    it. Nothing here waits for the device: the loop dispatches the update first, then collects."""
    if not self.every or step % self.every:
      return
    self.collect()
    self.pending = (step, jax.tree.leaves(batch)[0].shape[0], self.norms(params, batch))

  def collect(self) -> None:
    """Folds the dispatched measurement (if any) into the moving averages and logs it; blocks until it is done."""
    if self.pending is None:
      return
    (step, rows, norms), self.pending = self.pending, None
    out = jax.device_get(norms)
    small, big = float(out["small_sq"]), float(out["big_sq"])
    g2, trace = unbiased(small, big, rows / self.k, rows)
    b_simple = self.ema.update(g2, trace)
    scalars = {"noise_scale/b_simple": b_simple, "noise_scale/b_simple_tokens": b_simple * self.seq_len,
               "noise_scale/g2": g2, "noise_scale/trace_sigma": trace, "noise_scale/g_small_sq": small,
               "noise_scale/g_big_sq": big}
    logging.info("step %d noise scale B_simple %.4g sequences (%.4g tokens): |G|^2 %.4g, tr(Sigma) %.4g",
                 step + 1, b_simple, b_simple * self.seq_len, g2, trace)
    self.write(step + 1, scalars)  # Logged under the update it precedes, as the step's own metrics are.
