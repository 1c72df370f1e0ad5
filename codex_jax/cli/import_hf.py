"""`codex import hf DIR --workdir=W --config=FILE[:VARIANT]`: a Llama-layout model as checkpoint 0 of a new run."""

from __future__ import annotations

from absl import flags

from codex_jax.cli import common

USAGE = "codex import hf DIR --workdir=W --config=experiments/codex.py:VARIANT [--config.x.y=...]"
flags.DEFINE_string("workdir", None, "New run directory; `codex train` continues pretraining from it.")


def run(flag_values, args: list[str]):
  if len(args) != 2 or args[0] != "hf":
    raise flags.ValidationError(f"expected `{USAGE}`, got `codex import {' '.join(args)}`")
  common.check_workdir(flag_values.workdir)
  _, base = common.load_config(flag_values, num_devices=None)  # The base experiment, model shape to be replaced.
  from codex_jax.interop.importer import import_hf  # After flag checks: jax loads here.
  from codex_jax.workdir import writer_lock
  with writer_lock(flag_values.workdir):  # One writer per workdir, as `codex train`.
    result = import_hf(args[1], flag_values.workdir, base)
  if not flag_values.json:
    overrides = " ".join(f"--config.{k}={v}" for k, v in result["train_overrides"].items())
    print(f"Imported {args[1]} into {result['workdir']} as checkpoint 0 (content root {result['content_root']}).\n"
          f"Continue pretraining with the same --config flags plus: {overrides}")
  return result
