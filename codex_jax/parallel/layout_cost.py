"""Candidate parallel layouts for a config on a topology, ranked by a cost model of memory and step time.

Per device, in bytes: parameters and AdamW's two f32 moments (sharded over `tensor`, over `data` with
FSDP, the layer stack over `pipeline`), gradients, FSDP's gathered layer, the batch, and activations as
the remat policy keeps them (times the pipeline's stash). Step time, nothing overlapped: matmuls (6N +
attention model FLOPs, plus recomputed forwards, over the device peak times an efficiency that falls for
narrow per-device matmuls) and elementwise HBM traffic (activations, the optimizer update), stretched by
the pipeline bubble; plus every collective over the link its mesh axis maps to (parallel/placement.py, the
rule the mesh builder follows: `tensor` innermost, then `pipeline`, then `data`; an axis wider than what is
left of a fast domain also crosses the slow link): Megatron all-reduces of the residual stream (2 per block
forward, 2 backward, 2 more when full remat recomputes the forward), FSDP all-gathers (forward, backward) and
reduce-scatter of each layer's weights, the data-parallel gradient all-reduce without FSDP, and the pipeline's
per-tick sends.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from codex_jax.config import schema
from codex_jax.config.validate import validate
from codex_jax.parallel import placement
from codex_jax.parallel.pipeline import Schedule
from codex_jax.parallel.topology import Topology
from codex_jax.telemetry import flops

REMATS = ("none", "dots", "full")  # dots_no_batch sits between dots and full; ranked on request.
MEMORY_HEADROOM = 0.9  # Share of a device's memory a layout may plan to use (XLA needs scratch space).
# Matmul efficiency: `base` x m / (m + half) for the narrowest per-device matmul dimension m (rows per
# microbatch, sharded head or MLP width, model width): small shards under-fill MXUs / tensor cores / SIMD.
EFFICIENCY = {"tpu": (0.6, 128), "gpu": (0.55, 64), "cpu": (0.5, 16)}


@dataclasses.dataclass(frozen=True)
class Layout:
  """One way to run the config: mesh sizes, FSDP, pipeline schedule and microbatches, remat policy."""

  data: int
  tensor: int
  pipeline: int = 1
  fsdp: bool = False
  schedule: str = "gpipe"
  microbatches: int = 1  # Resolved: 1 without a pipeline.
  repeats: int = 1
  remat: str = "full"

  def sizes(self) -> dict[str, int]:
    """The mesh axis sizes (what parallel/placement.py places)."""
    return {"data": self.data, "tensor": self.tensor, "pipeline": self.pipeline}

  def mesh_values(self) -> dict:
    """The `mesh` config keys this layout sets (auto is left to the caller)."""
    return {"data": self.data, "tensor": self.tensor, "pipeline": self.pipeline, "fsdp": self.fsdp,
            "schedule": self.schedule, "microbatches": self.microbatches if self.pipeline > 1 else 0,
            "repeats": self.repeats}

  def config_values(self) -> dict[str, dict]:
    """Every config key this layout sets, by group: the one place a layout becomes config (`apply`, mesh.auto)."""
    return {"mesh": self.mesh_values(), "model": {"remat": self.remat}}

  def label(self) -> str:
    text = f"d{self.data} t{self.tensor} p{self.pipeline}{' fsdp' if self.fsdp else ''}"
    if self.pipeline > 1:
      text += f" {self.schedule} M{self.microbatches}" + (f" R{self.repeats}" if self.repeats > 1 else "")
    return f"{text} remat={self.remat}"


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Predicted per-device memory (bytes) and step time (seconds) of one layout."""

  layout: Layout
  params_bytes: float
  optimizer_bytes: float
  gradient_bytes: float
  activation_bytes: float
  batch_bytes: float  # The batch's shard, plus the numerics guard and optimizer scalars.
  gathered_bytes: float  # FSDP: one layer's gathered weights, double-buffered.
  compute_s: float
  hbm_s: float
  comm_s: dict  # Collective seconds per kind: tensor, fsdp, data, pipeline.
  links: dict  # Mesh axis -> "fast" | "slow" | "fast+slow".
  bubble: float
  step_s: float
  fits: bool

  @property
  def total_bytes(self) -> float:
    return (self.params_bytes + self.optimizer_bytes + self.gradient_bytes + self.activation_bytes
            + self.batch_bytes + self.gathered_bytes)

  @property
  def argument_bytes(self) -> float:
    """What the compiled step takes as arguments: the train state and the batch."""
    return self.params_bytes + self.optimizer_bytes + self.batch_bytes

  def row(self) -> dict:
    """A flat JSON-friendly record (for `codex mesh --json` and the layout bench)."""
    return {"layout": self.layout.label(), **dataclasses.asdict(self.layout),
            "predicted_step_s": self.step_s, "compute_s": self.compute_s, "hbm_s": self.hbm_s,
            "comm_s": sum(self.comm_s.values()), "comm_by_kind_s": self.comm_s, "links": self.links,
            "bubble": self.bubble, "params_bytes": self.params_bytes, "optimizer_bytes": self.optimizer_bytes,
            "gradient_bytes": self.gradient_bytes, "activation_bytes": self.activation_bytes,
            "total_bytes": self.total_bytes, "argument_bytes": self.argument_bytes, "fits": self.fits}


def apply(cfg: schema.Config, layout: Layout, auto: bool | None = None) -> schema.Config:
  """`cfg` run with `layout` (its mesh and model.remat); `auto` kept unless given."""
  groups = {group: dataclasses.replace(getattr(cfg, group), **values) for group, values in layout.config_values().items()}
  if auto is not None:
    groups["mesh"] = dataclasses.replace(groups["mesh"], auto=auto)
  return dataclasses.replace(cfg, **groups)


def candidates(cfg: schema.Config, topo: Topology, remats: tuple[str, ...] = REMATS) -> list[Layout]:
  """Every layout for `topo.devices` that `config.validate` accepts (with `topo.hosts` processes)."""
  n, out = topo.devices, []
  for data, tensor, pipeline in factorizations(n):
    for fsdp in ((False, True) if data > 1 else (False,)):
      for remat in remats:
        for schedule, microbatches, repeats in _pipeline_options(pipeline):
          layout = Layout(data, tensor, pipeline, fsdp, schedule, microbatches, repeats, remat)
          if not validate(apply(cfg, layout), num_devices=n, num_processes=topo.hosts):
            out.append(layout)
  return out


def rank(cfg: schema.Config, topo: Topology, remats: tuple[str, ...] = REMATS) -> list[Estimate]:
  """Valid layouts, best first: those that fit in memory by predicted step time, then the rest by memory."""
  estimates = [estimate(cfg, layout, topo) for layout in candidates(cfg, topo, remats)]
  return sorted(estimates, key=lambda e: (not e.fits, e.step_s if e.fits else e.total_bytes, e.total_bytes,
                                          e.layout.label()))


def best(cfg: schema.Config, topo: Topology, remats: tuple[str, ...] = REMATS) -> Estimate:
  ranked = rank(cfg, topo, remats)
  if not ranked:
    raise ValueError(f"no layout of this config is valid on {topo.describe()}: check train.global_batch and "
                     "the model's head / MLP / vocab sizes against the device count (`codex mesh`)")
  return ranked[0]


def estimate(cfg: schema.Config, layout: Layout, topo: Topology) -> Estimate:
  """The cost model for one layout (see the module docstring)."""
  m, seq = cfg.model, cfg.data.seq_len
  d_sz, t_sz, s_sz, mb, reps = layout.data, layout.tensor, layout.pipeline, layout.microbatches, layout.repeats
  p_bytes, c_bytes = _itemsize(m.param_dtype), _itemsize(m.compute_dtype)
  fsdp_div = d_sz if layout.fsdp else 1
  # Rows of one pipeline microbatch on one device: activations live for one accumulation micro-batch.
  rows = cfg.train.micro_batch // d_sz // mb
  layers_here = m.num_layers // s_sz
  seq_div = t_sz if cfg.mesh.sequence_parallel else 1

  # Memory: parameters, optimizer, gradients, batch.
  layer_w, layer_norms, outside_w, outside_norms = _weights(m)
  stage_w = layers_here * layer_w / t_sz  # This stage's layer weights as a matmul sees them (gathered).
  local = (layers_here * layer_w + outside_w) / t_sz / fsdp_div + layers_here * layer_norms + outside_norms
  params_bytes = local * p_bytes
  optimizer_bytes = 2 * local * 4  # AdamW's mu and nu, f32.
  gathered_bytes = 2 * layer_w / t_sz * p_bytes if layout.fsdp and d_sz > 1 else 0.0
  positions = cfg.train.global_batch // d_sz * seq
  batch_bytes = positions * (7 * 4 + 4 * m.feature_dim) + 4 * (max(cfg.train.spike_window, 1) + 16)

  # Memory: activations kept for the backward, one layer's working set, the logits.
  saved, working = _layer_activations(m, rows, seq, t_sz, layout.remat, c_bytes, seq_div)
  stage_in = rows * seq * m.d_model * c_bytes / seq_div
  schedule = Schedule(layout.schedule, s_sz, mb, reps) if s_sz > 1 else None
  if schedule is None:
    stash = m.num_layers * saved
  elif layout.schedule == "1f1b":
    stash = 2 * s_sz * stage_in + layers_here * saved  # 2S stage inputs + one microbatch's backward.
  else:  # Every tick's inputs of the chunk's layers.
    stash = schedule.ticks * (layers_here // reps) * max(saved, stage_in)
  # f32 logits, their softmax and gradient; gpipe / circular run the head on all microbatches at once.
  head_rows = rows * mb if s_sz > 1 and layout.schedule != "1f1b" else rows
  logits = 3 * head_rows * seq * m.vocab_size / t_sz * 4
  activation_bytes = stash + working + logits

  # Time: matmuls (compute-bound, or bound by reading their weights) and the elementwise work around them
  # (memory-bound: activations written and re-read, AdamW's update), one after the other, the microbatch
  # part stretched by the pipeline's ticks.
  tokens = cfg.train.global_batch * seq
  recompute = _recompute_flops(m, seq, layout.remat)
  if s_sz > 1 and layout.schedule == "1f1b":  # Its backward recomputes the stage's forward, whatever the remat.
    recompute += _recompute_flops(m, seq, "full")
  hardware_flops = (flops.train_flops_per_token(m, seq) + recompute) * tokens
  base, half = EFFICIENCY.get(topo.spec.platform, EFFICIENCY["cpu"])
  narrowest = min(rows * seq, m.num_heads * m.resolved_head_dim // t_sz, m.mlp_dim // t_sz, m.d_model)
  compute_s = hardware_flops / topo.devices / (topo.peak_flops * base * narrowest / (narrowest + half))
  passes = 2 + round(recompute / max(_recompute_flops(m, seq, "full"), 1))  # Forward, backward, recomputes.
  hbm = topo.bandwidth("hbm")
  matmul_s = max(compute_s, stage_w * p_bytes * passes * mb / hbm)  # Weights read once per microbatch pass.
  activations_s = (2 * stash + 2 * passes * layers_here * working * mb + 2 * logits * mb * rows / head_rows) / hbm
  update_s = 7 * local * 4 / hbm  # AdamW reads param, grad, mu, nu and writes three of them.
  hbm_s = activations_s + update_s
  if schedule is None:
    ticks, bubble, stretch = 1, 0.0, 1.0
  else:
    ticks, bubble, stretch = schedule.ticks, schedule.bubble_fraction, schedule.ticks / schedule.busy_ticks
  busy_s = (matmul_s + activations_s) * stretch + update_s

  # Time: collectives, unoverlapped, over the link each axis maps to.
  fast, slow = placement.split_by_link(layout.sizes(), topo.fast_domain)
  links = {axis: placement.link(fast[axis], slow[axis]) for axis in placement.INNERMOST_FIRST}
  comm = {"tensor": 0.0, "fsdp": 0.0, "data": 0.0, "pipeline": 0.0}
  if t_sz > 1:  # Every tick of a stage runs its blocks' all-reduces, bubble ticks included.
    per_microbatch = layers_here * (4 + (2 if layout.remat == "full" else 0)) + 2  # + embedding fwd/bwd.
    resid = rows * seq * m.d_model * c_bytes
    comm["tensor"] = per_microbatch * mb * stretch * _collective(resid, fast["tensor"], slow["tensor"], topo, 2.0)
  if d_sz > 1:
    grad_bytes = (stage_w + outside_w / t_sz) * p_bytes
    if layout.fsdp:  # Per layer: all-gather forward and backward, reduce-scatter the gradient.
      per_layer = _collective(grad_bytes / (layers_here + 1), fast["data"], slow["data"], topo, 1.0)
      comm["fsdp"] = 3 * (layers_here + 1) * per_layer
    else:
      comm["data"] = _collective(grad_bytes, fast["data"], slow["data"], topo, 2.0)
  if s_sz > 1:  # Each tick sends a microbatch's activations on, and in the backward its gradient back.
    link = "fast" if links["pipeline"] == "fast" else "slow"
    comm["pipeline"] = 2 * ticks * (stage_in / topo.bandwidth(link) + topo.spec.latency)
  step_s = busy_s + sum(comm.values())
  total = params_bytes * 2 + optimizer_bytes + activation_bytes + batch_bytes + gathered_bytes
  return Estimate(layout, params_bytes, optimizer_bytes, params_bytes, activation_bytes, batch_bytes, gathered_bytes,
                  compute_s, hbm_s, comm, links, bubble, step_s, total <= MEMORY_HEADROOM * topo.memory_per_device)


def spearman(a, b) -> float:
  """Spearman's rank correlation (average ranks for ties); nan with fewer than 2 pairs or no spread."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  if len(a) < 2:
    return float("nan")
  ra, rb = _ranks(a), _ranks(b)
  if ra.std() == 0 or rb.std() == 0:
    return float("nan")
  return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x))
  ranks[order] = np.arange(len(x), dtype=float)
  for value in np.unique(x):  # Ties share their mean rank.
    ranks[x == value] = ranks[x == value].mean()
  return ranks


def factorizations(n: int) -> list[tuple[int, int, int]]:
  divisors = [k for k in range(1, n + 1) if n % k == 0]
  return [(n // (t * p), t, p) for t in divisors for p in divisors if n % (t * p) == 0]


def _pipeline_options(stages: int) -> list[tuple[str, int, int]]:
  """(schedule, microbatches, repeats) to try; validate() drops what the batch or layers do not allow."""
  if stages == 1:
    return [("gpipe", 1, 1)]
  counts = sorted({stages, 2 * stages, 4 * stages, 8 * stages})
  return ([("gpipe", k, 1) for k in counts] + [("1f1b", k, 1) for k in counts]
          + [("circular", k, 2) for k in counts])


def _itemsize(dtype: str) -> int:
  return 2 if dtype == "bfloat16" else 4


def _weights(m: schema.ModelConfig) -> tuple[float, float, float, float]:
  """(matmul weights per layer, norm weights per layer, matmul weights outside the stack, other norms)."""
  c = flops.param_counts(m)
  layer_w = c["attention_per_layer"] + c["mlp_per_layer"]
  outside_w = c["embedding"] + c["unembedding"] + c["feature_in"]  # All carry `embed` (FSDP) and most `vocab`.
  return layer_w, 2 * m.d_model, outside_w, m.d_model


def _layer_activations(m: schema.ModelConfig, rows: int, seq: int, t: int, remat: str, c_bytes: int,
                       seq_div: int) -> tuple[float, float]:
  """(bytes one layer keeps for the backward under `remat`, bytes of one layer's working set)."""
  b_s = rows * seq
  resid = b_s * m.d_model * c_bytes / seq_div
  k, h, g, f = m.resolved_head_dim, m.num_heads, m.num_kv_heads, m.mlp_dim
  qkv = b_s * (h + 2 * g) * k / t * c_bytes
  attn_out = b_s * h * k / t * c_bytes
  chunk = seq // max(m.attention_chunks, 1)
  scores = rows * h / t * chunk * seq * 4  # One query chunk's f32 scores at a time.
  mlp = 2 * b_s * f / t * c_bytes
  dots_no_batch = resid + qkv + mlp + 2 * b_s * m.d_model * c_bytes  # + the o and down projections' outputs.
  dots = dots_no_batch + attn_out + scores * m.attention_chunks / 2
  none = dots + 2 * resid + scores * m.attention_chunks + mlp
  saved = {"full": resid, "dots": dots, "dots_no_batch": dots_no_batch, "none": none}[remat]
  return saved, none


def _recompute_flops(m: schema.ModelConfig, seq: int, remat: str) -> float:
  """Extra hardware FLOPs per token the backward spends recomputing the forward."""
  if remat != "full":
    return 0.0  # dots policies recompute elementwise work only.
  c = flops.param_counts(m)
  layers = m.num_layers * (c["attention_per_layer"] + c["mlp_per_layer"])
  return 2.0 * layers + 4.0 * m.num_layers * m.num_heads * m.resolved_head_dim * seq


def _collective(nbytes: float, within: int, across: int, topo: Topology, factor: float) -> float:
  """Seconds of a ring collective over an axis of `within` x `across` devices on a buffer of `nbytes`.

  `within` devices share a fast domain, `across` domains join over the slow link (placement.split_by_link).
  `factor` is 2 for an all-reduce, 1 for an all-gather or reduce-scatter: each device moves factor *
  (n-1)/n of the buffer. An axis that spans fast domains reduces inside them first and sends only
  its 1/within share across the slow link (hierarchical).
  """
  seconds = 0.0
  if within > 1:
    seconds += factor * (within - 1) / within * nbytes / topo.bandwidth("fast") + topo.spec.latency
  if across > 1:
    seconds += factor * (across - 1) / across * nbytes / within / topo.bandwidth("slow") + 3 * topo.spec.latency
  return seconds
