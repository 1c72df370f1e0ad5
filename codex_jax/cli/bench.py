"""`codex bench --config=FILE[:VARIANT] [--steps N]`: one JSON line of throughput for one config."""

from __future__ import annotations

import json

from absl import flags
from ml_collections import config_flags

from codex_jax.cli import common

flags.DEFINE_integer("steps", 5, "Timed steps after warm-up (the median is reported).")
flags.DEFINE_string("name", "", "Label for the JSON line (default: the --config argument).")
flags.DEFINE_bool("checkpoint", False, "Measure checkpoint save / restore throughput and the async-save stall instead.")
flags.DEFINE_bool("layouts", False, "Measure step time per parallel layout on this host's devices, one JSON line "
                  "each, then the predicted-vs-measured ranking (Spearman rho) as the result.")


def run(flag_values):
  import jax

  cfg, _ = common.load_config(flag_values, jax.device_count(), jax.process_count())
  from codex_jax.train.bench import benchmark, benchmark_checkpoint
  label = flag_values.name or config_flags.get_config_filename(flag_values["config"])
  if flag_values.layouts:
    from codex_jax.train.layout_bench import benchmark_layouts
    emit = lambda line: print(json.dumps({"config": label, **line}, sort_keys=True), flush=True)
    result = {"config": label, **benchmark_layouts(cfg, flag_values.steps, emit)}
    if not flag_values.json:
      print(json.dumps(result, sort_keys=True))
    return result
  if flag_values.checkpoint:
    import tempfile
    with tempfile.TemporaryDirectory(prefix="codex-ckpt-bench-") as workdir:
      result = {"config": f"{label}:checkpoint", **benchmark_checkpoint(cfg, workdir, flag_values.steps)}
  else:
    result = {"config": label, **benchmark(cfg, flag_values.steps)}
  if not flag_values.json:
    print(json.dumps(result, sort_keys=True))
  return result
