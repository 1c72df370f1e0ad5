"""`codex average --workdir=W [--count=4] [--step=N]`: write the parameter average of the last checkpoints."""

from __future__ import annotations

from absl import flags

from codex_jax.cli import common  # noqa: F401  (--json)
from codex_jax.cli.eval import _define

_define("string", "workdir", None, "The run whose checkpoints to average.")
_define("integer", "step", None, "Newest checkpoint of the average (default: the latest).")
_define("integer", "count", None, "Checkpoints to average (default: the run's checkpoint.average_count).")
_define("bool", "score", True, "Evaluate the average (held-out loss and tasks) into its lineage record.")
_define("integer", "examples", 0, "Examples per task when scoring (0: all).")


def run(flag_values):
  if not flag_values.workdir:
    raise flags.ValidationError("--workdir is required, e.g. codex average --workdir=runs/tiny --count=4")
  if flag_values.count is not None and flag_values.count < 2:
    raise flags.ValidationError(f"--count={flag_values.count}: an average needs at least 2 checkpoints")
  from codex_jax.checkpoint import average
  from codex_jax.checkpoint.load import read_config

  count = flag_values.count or read_config(flag_values.workdir)[0].checkpoint.average_count
  loaded = average.load_average(flag_values.workdir, count, flag_values.step)
  scores = None
  if flag_values.score:
    from codex_jax.eval import suite
    scores = suite.offline(loaded, flag_values.workdir, limit=flag_values.examples or None).evaluate(
        loaded.step, loaded.params)
  result = average.write_average(flag_values.workdir, loaded, scores)
  if not flag_values.json:
    loss = "" if scores is None else f", held-out loss {scores['heldout_loss']:.4f}"
    print(f"wrote {result['path']}: the average of steps {result['steps']} (weights {result['weights']}){loss}; "
          f"lineage {result['lineage_hash'][:16]}... with {len(result['parents'])} parents")
  return result
