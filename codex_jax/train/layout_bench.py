"""Measured step time and compiled memory per parallel layout, against the topology adapter's predictions."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax

from codex_jax.config.schema import Config
from codex_jax.config.validate import validate
from codex_jax.parallel import layout_cost, topology
from codex_jax.parallel.mesh import build_mesh
from codex_jax.runtime import feed
from codex_jax.train.bench import synthetic_batch, timed_steps
from codex_jax.train.setup import build_trainer

# (data, tensor, pipeline) on 8 devices: pure data, tensor, pipeline and mixes; each with FSDP on and off.
SHAPES_8 = ((8, 1, 1), (4, 2, 1), (2, 4, 1), (1, 8, 1), (4, 1, 2), (2, 2, 2), (1, 2, 4))


def default_layouts(cfg: Config, devices: int) -> list[layout_cost.Layout]:
  """SHAPES_8 (or every shape of `devices`) x FSDP, with the config's remat and the gpipe schedule."""
  shapes = SHAPES_8 if devices == 8 else layout_cost.factorizations(devices)
  out = []
  for data, tensor, pipeline in shapes:
    rows = cfg.train.global_batch // data
    microbatches = max([k for k in range(1, min(4 * pipeline, rows) + 1) if rows % k == 0]) if pipeline > 1 else 1
    for fsdp in ((False, True) if data > 1 else (False,)):
      out.append(layout_cost.Layout(data, tensor, pipeline, fsdp, "gpipe", microbatches, 1, cfg.model.remat))
  return out


def measure(cfg: Config, layout: layout_cost.Layout, topo: topology.Topology, steps: int) -> dict:
  """One JSON-ready line: measured and predicted step time, compiled and predicted memory per device.

  The step is compiled for the abstract state (`restore_target`), so memory needs no allocation;
  `steps=0` stops there.
  """
  run_cfg = layout_cost.apply(cfg, layout, auto=False)
  predicted = layout_cost.estimate(run_cfg, layout, topo)
  line = {"layout": layout.label(), "mesh": {"data": layout.data, "tensor": layout.tensor,
                                             "pipeline": layout.pipeline},
          "fsdp": layout.fsdp, "microbatches": layout.microbatches, "bubble": predicted.bubble,
          "predicted_step_s": predicted.step_s, "predicted_bytes": predicted.total_bytes,
          "predicted_argument_bytes": predicted.argument_bytes}
  problems = validate(run_cfg, num_devices=topo.devices, num_processes=jax.process_count())
  if problems:
    return {**line, "error": "invalid: " + "; ".join(problems)}
  try:
    mesh = build_mesh(run_cfg.mesh)
    trainer = build_trainer(run_cfg, mesh)
    batch = feed.to_global(synthetic_batch(run_cfg, run_cfg.train.global_batch // jax.process_count()),
                           trainer.engine.data_sharding)
    start = time.perf_counter()
    compiled = trainer.train_step.lower(trainer.restore_target(), batch).compile()
    line["compile_s"] = round(time.perf_counter() - start, 2)
    memory = compiled.memory_analysis()
    compiled_bytes = {key: getattr(memory, f"{key}_size_in_bytes", None)
                      for key in ("argument", "output", "temp", "alias", "generated_code")}
    line["compiled_bytes"] = compiled_bytes
    # What the device holds at the peak: arguments, outputs not aliased to (donated) arguments, scratch.
    line["compiled_total_bytes"] = (sum(compiled_bytes[k] or 0 for k in ("argument", "output", "temp"))
                                    - (compiled_bytes["alias"] or 0))
    if steps > 0:
      state = trainer.init_state()
      state, _, _ = timed_steps(compiled, state, batch, 1)
      state, metrics, times = timed_steps(compiled, state, batch, steps)
      line.update(measured_step_s=statistics.median(times), measured_step_s_min=min(times),
                  loss=float(metrics["loss"]))
  except Exception as e:  # A layout the trainer cannot build or run is reported, not fatal.
    return {**line, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
  return line


def benchmark_layouts(cfg: Config, steps: int, emit: Callable[[dict], None] | None = None,
                      layouts: list[layout_cost.Layout] | None = None) -> dict:
  """Measures every layout (emitting each line as it is done); returns the ranking summary."""
  topo = topology.discover()
  layouts = default_layouts(cfg, topo.devices) if layouts is None else layouts
  lines = []
  for layout in layouts:
    line = measure(cfg, layout, topo, steps)
    lines.append(line)
    if emit:
      emit(line)
  ok = [line for line in lines if "measured_step_s" in line]
  predicted = [line["predicted_step_s"] for line in ok]
  measured = [line["measured_step_s"] for line in ok]
  by = lambda key: [line["layout"] for line in sorted(ok, key=lambda x: x[key])]
  return {"summary": "layouts", "topology": topo.describe(), "measured": len(ok), "failed": len(lines) - len(ok),
          "spearman_rho": layout_cost.spearman(predicted, measured),
          "best_predicted": by("predicted_step_s")[:1], "best_measured": by("measured_step_s")[:1],
          "predicted_order": by("predicted_step_s"), "measured_order": by("measured_step_s")}
