"""`codex train --config=FILE[:VARIANT] --workdir=DIR`: train, or resume the run in DIR."""

from __future__ import annotations

from absl import flags

from codex_jax.cli import common

flags.DEFINE_string("workdir", None, "Run directory: config, checkpoints, TensorBoard events, metrics.")
flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")
flags.DEFINE_string("profile_steps", None, "A:B: trace steps A..B (1-based) with jax.profiler into WORKDIR/profile "
                    "(TensorBoard's profile tab, or Perfetto).")


def run(flag_values):
  common.check_workdir(flag_values.workdir)
  from codex_jax.telemetry.profile import parse_steps
  profile_steps = parse_steps(flag_values.profile_steps)
  import jax  # After flag parsing, so `codex --help` and config errors stay fast.

  from codex_jax.parallel import distributed
  distributed.initialize()  # Before any device is touched: one process of many joins the others here.

  cfg, as_dict = common.load_config(flag_values, jax.device_count(), jax.process_count())
  from codex_jax.train.loop import train
  from codex_jax.train.report import summary_text
  summary = train(cfg, as_dict, flag_values.workdir, progress=flag_values.progress, profile_steps=profile_steps)
  if not flag_values.json and jax.process_index() == 0:
    print(summary_text(summary))  # With --json, stdout holds the summary object alone.
  return summary
