"""`codex <command>`: the one command line. Failures exit non-zero with a one-line reason."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import json
import os
import subprocess
import sys
import traceback

from absl import flags

from codex_jax.checkpoint.errors import CheckpointIntegrityError, CheckpointWriteError
from codex_jax.cli import log_filter
from codex_jax.config.errors import ConfigError
from codex_jax.data.errors import DataError
from codex_jax.train.errors import NumericsError
from codex_jax.workdir import WorkdirInUse

# command -> (module under codex_jax.cli, one-line help, an example).
COMMANDS = {
    "train": ("train", "train (or resume) an experiment in a workdir",
              "codex train --config=experiments/codex.py:tiny --workdir=runs/tiny"),
    "config": ("show_config", "validate an experiment config and print it resolved",
               "codex config --config=experiments/codex.py:1b_h100 --devices=8"),
    "bench": ("bench", "measure tokens/s, model TFLOP/s and MFU of configs, one JSON line each",
              "codex bench --config=experiments/codex.py:bench --steps=5 --json"),
    "mesh": ("mesh", "rank parallel layouts by predicted memory and step time, here or on a hypothetical cluster",
             "codex mesh --config=experiments/codex.py:7b_h100 --device-kind='NVIDIA H100 80GB HBM3' --devices=16"),
    "lineage": ("lineage", "`lineage verify WORKDIR|CKPT`, `lineage prove CKPT --tensor=PATH`, `verify --proof=F`",
                "codex lineage verify runs/tiny"),
    "plan": ("plan", "compute-optimal N, D, loss, shape and batch for --flops; inference-adjusted; --write-config",
             "codex plan --flops=5.76e23 --inference-tokens=2e12"),
    "scaling": ("scaling", "`scaling fit RUNS...`: the loss law with bootstrap intervals; `scaling sweep DIR`: an "
                "IsoFLOP sweep of tiny models, then the fit; `scaling exchange-rate DIR`: measure a modality's rate",
                "codex scaling sweep runs/isoflop"),
    "data": ("data", "`data manifest FILE`: sources, licences, shares, hash; `data build-default`: the corpus",
             "codex data manifest experiments/data/default.yaml"),
    "eval": ("eval", "held-out loss per source and task scores of a checkpoint (--average=K), by training stage",
             "codex eval --workdir=runs/tiny --average=4"),
    "average": ("average", "write the parameter average of the last checkpoints with a multi-parent lineage record",
                "codex average --workdir=runs/tiny --count=4"),
    "export": ("export", "`export hf --workdir=W [--step=N | --average=K] --out=DIR`: a Hugging Face Llama model",
               "codex export hf --workdir=runs/tiny --out=exported/tiny"),
    "import": ("import_hf", "`import hf DIR --workdir=W --config=...`: a Llama model as checkpoint 0 of a new run",
               "codex import hf exported/tiny --workdir=runs/tiny-cont --config=experiments/codex.py:tiny"),
    "generate": ("generate", "sample a completion of --prompt from a checkpoint (KV cache; greedy at temperature 0)",
                 "codex generate --workdir=runs/tiny --prompt='def main(' --max-tokens=32"),
}
HELP_ARGS = ("-h", "--help", "--helpshort")
flags.DEFINE_bool("verbose", False, "Also show the INFO logs of jax, Orbax, Grain and Flax.")
# Reported in one line (the traceback with --verbose): bad input, and the environment failing (OSError: a full
# disk, a lost mount, a permission).
EXPECTED_ERRORS = (ConfigError, DataError, CheckpointIntegrityError, CheckpointWriteError, NumericsError, WorkdirInUse,
                   flags.Error, OSError, ValueError)


class UsageError(Exception):
  """Bad command line: the message says what was expected."""


def usage() -> str:
  lines = ["usage: codex <command> [--flags]", "", "commands:"]
  lines += [f"  {name:8s} {text}" for name, (_, text, _) in COMMANDS.items()]
  lines += ["", "Run `codex <command> --help` for its flags; `codex --version` for the version."]
  return "\n".join(lines)


def version() -> str:
  """The installed package's version and, in a git checkout, its commit."""
  try:
    number = importlib.metadata.version("codex-jax")
  except importlib.metadata.PackageNotFoundError:
    number = "(not installed)"
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    commit = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                            timeout=10).stdout.strip()
  except (OSError, subprocess.TimeoutExpired):
    commit = ""
  return f"codex-jax {number} (commit {commit or 'unknown: not a git checkout'})"


def command_help(command: str, module, full: bool) -> str:
  """A command's help from absl's own flag listing: its flags, the shared ones it reads, the global ones."""
  _, text, example = COMMANDS[command]
  lines = [f"codex {command}: {text}", "", f"usage: {getattr(module, 'USAGE', f'codex {command} [--flags]')}",
           f"example: {example}", ""]
  if full:
    return "\n".join([*lines, flags.FLAGS.get_help()])
  # Its own flags, those of the cli modules it takes flags from (cli/common.py's --config and --json; `average`
  # defines through cli/eval.py), and the global ones.
  sources = [getattr(v, "__name__", None) if inspect.ismodule(v) else getattr(v, "__module__", None)
             for v in vars(module).values()]
  shown = dict.fromkeys([module.__name__, *(m for m in sources if m and m.startswith("codex_jax.cli.")), __name__])
  lines += [f"{text}\n" for m in shown if (text := flags.FLAGS.module_help(m).strip("\n"))]
  return "\n".join([*lines, f"`codex {command} --helpfull` lists every flag, the libraries' included."])


def main(argv: list[str]) -> int:
  if len(argv) < 2 or argv[1] in (*HELP_ARGS, "help"):
    print(usage())
    return 0 if len(argv) >= 2 else 2
  if argv[1] in ("--version", "version"):
    print(version())
    return 0
  command = argv[1]
  if command not in COMMANDS:
    print(f"codex: error: unknown command {command!r}; expected one of {sorted(COMMANDS)}", file=sys.stderr)
    return 2
  module = importlib.import_module(f"codex_jax.cli.{COMMANDS[command][0]}")
  if any(arg in (*HELP_ARGS, "--helpfull") for arg in argv[2:]):
    print(command_help(command, module, full="--helpfull" in argv[2:]))
    return 0
  try:
    rest = _parse_flags(command, argv[2:])
    takes_args = hasattr(module, "USAGE")  # Commands with positional arguments declare their usage.
    if len(rest) > 1 and not takes_args:
      raise UsageError(f"unexpected argument(s) {rest[1:]}; every option is a --flag")
    log_filter.configure(flags.FLAGS.verbose)
    result = module.run(flags.FLAGS, rest[1:]) if takes_args else module.run(flags.FLAGS)
  except (UsageError, *EXPECTED_ERRORS) as e:
    if flags.FLAGS.is_parsed() and flags.FLAGS.verbose:
      traceback.print_exc()
    print(f"codex {command}: error: {_one_line(e)}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    resume = "; the same command resumes from the last committed checkpoint" if command == "train" else ""
    print(f"codex {command}: error: interrupted{resume}", file=sys.stderr)
    return 130
  except Exception as e:  # An unexpected failure: keep the traceback, end with the one-line reason.
    traceback.print_exc()
    print(f"codex {command}: error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
    return 1
  if result is not None and getattr(flags.FLAGS, "json", False):
    print(json.dumps(result, sort_keys=True, default=str))
  return 0


def _parse_flags(command: str, args: list[str]) -> list[str]:
  """absl parsing, with config_flags' errors for a misspelt --config.x.y made into a usage error."""
  try:
    return flags.FLAGS([f"codex {command}", *args])
  except flags.Error:
    raise
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    text = str(e.args[0] if e.args else e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
    raise UsageError(f"bad --config override ({text}); see the keys in the experiment file") from e


def _one_line(e: BaseException) -> str:
  """The message on one line; an embedded traceback (config_flags adds them) shrinks to its last line."""
  text = str(e)
  if "Traceback (most recent call last)" in text:
    head, _, trace = text.partition("Traceback (most recent call last)")
    text = head.rstrip(": \n") + ": " + trace.strip().splitlines()[-1]
  return " ".join(text.split()) or type(e).__name__


def run() -> None:
  """Console-script entry point."""
  sys.exit(main(sys.argv))
