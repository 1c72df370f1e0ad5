"""`codex config --config=FILE[:VARIANT] [--devices N]`: validate a config and print it resolved."""

from __future__ import annotations

import dataclasses

from absl import flags, logging

from codex_jax.cli import common

flags.DEFINE_integer("devices", None, "Check the mesh against this many devices instead of this host's.")
flags.DEFINE_integer("processes", 1, "JAX processes the run will have (with --devices).")


def run(flag_values):
  if flag_values.devices is None:
    import jax
    devices, processes = jax.device_count(), jax.process_count()
  else:
    devices, processes = flag_values.devices, flag_values.processes
  cfg, _ = common.load_config(flag_values, devices, processes)
  from codex_jax.config.validate import resolve_mesh_shape
  from codex_jax.parallel.pipeline import Schedule
  from codex_jax.telemetry.flops import head_counts, param_counts
  resolved = dataclasses.asdict(cfg)
  sizes = resolve_mesh_shape(cfg.mesh, devices)
  resolved["mesh"]["resolved"] = sizes
  if sizes["pipeline"] > 1:
    schedule = Schedule.of(cfg.mesh, sizes["pipeline"])
    resolved["mesh"]["pipeline_ticks"] = schedule.ticks
    resolved["mesh"]["pipeline_bubble"] = round(schedule.bubble_fraction, 4)
  resolved["params"] = params = param_counts(cfg.model)
  heads = params.pop("heads")
  if heads:  # Non-text objectives on: their heads train beside the trunk but are not exported (not in total).
    params["heads (training only)"] = {**head_counts(cfg.model), "total": heads}
  if not flag_values.json:
    for group, values in resolved.items():
      print(f"{group}: {values}")
  logging.info("Config is valid for %d device(s).", devices)
  return resolved
