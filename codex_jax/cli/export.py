"""`codex export hf --workdir=W [--step=N | --average=K] --out=DIR`: a checkpoint as a Hugging Face Llama model."""

from __future__ import annotations

from absl import flags

from codex_jax.cli import common  # noqa: F401  (--json)

USAGE = "codex export hf --workdir=W [--step=N | --average=K] --out=DIR"
flags.DEFINE_string("workdir", None, "The run to export from.")
flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
flags.DEFINE_integer("average", None, "Export the parameter average of the last K checkpoints (up to --step).")
flags.DEFINE_string("out", None, "New (or empty) directory for config.json, model.safetensors, tokenizer, lineage.json.")
flags.DEFINE_integer("max-shard-mb", 2048, "Split the safetensors into shards of at most this many MiB.")


def run(flag_values, args: list[str]):
  if args != ["hf"]:
    raise flags.ValidationError(f"expected `{USAGE}`, got `codex export {' '.join(args)}`")
  if not flag_values.workdir or not flag_values.out:
    raise flags.ValidationError(f"--workdir and --out are required: {USAGE}")
  if flag_values.average is not None and flag_values.average < 1:
    raise flags.ValidationError(f"--average={flag_values.average}: expected a checkpoint count >= 1")
  from codex_jax.interop.export import export_hf  # After flag checks: jax loads here.
  result = export_hf(flag_values.workdir, flag_values.out, step=flag_values.step, average=flag_values.average,
                     max_shard_bytes=flag_values["max-shard-mb"].value * 1024**2)
  if not flag_values.json:
    print(f"Exported step {result['step']} of {flag_values.workdir} to {result['out']} ({result['tensors']} tensors; "
          f"left out: {', '.join(result['left_out']) or 'nothing'})")
  return result
