"""Shared test helpers: experiment configs by variant, with overrides, as typed Configs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

from codex_jax.config import load as config_load
from codex_jax.config.schema import TEXT_ONLY
from tests.xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = os.path.join(ROOT, "experiments", "codex.py")


def experiment_module():
  spec = importlib.util.spec_from_file_location("codex_experiment", EXPERIMENT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def config_dict(variant: str = "tiny", **overrides) -> dict:
  """The experiment's config as a plain dict; overrides are 'group.key' -> value."""
  raw = config_load.to_dict(experiment_module().get_config(variant))
  # Tests run the text-only stack unless they name objectives.weights (tests/test_objectives.py does): the
  # tiny experiment trains all five objectives, but these tests check the text stack they were written for.
  raw["objectives"]["weights"] = TEXT_ONLY
  for dotted, value in overrides.items():
    group, key = dotted.split(".", 1)
    where = raw.setdefault(group, {})
    *path, key = key.split(".")
    for part in path:
      where = where.setdefault(part, {})
    where[key] = value
  return raw


def load(variant: str = "tiny", num_devices: int | None = None, **overrides):
  return config_load.load(config_dict(variant, **overrides), num_devices=num_devices)


# A model small enough to compile and step in about a second on this CPU.
MICRO = {
    "model.vocab_size": 256, "model.d_model": 64, "model.num_layers": 2, "model.num_heads": 4,
    "model.num_kv_heads": 2, "model.mlp_dim": 128, "data.seq_len": 32, "train.global_batch": 8,
    "train.steps": 10,
}


# A micro `codex train` run for subprocess tests: a 2-layer model on the embedded corpus, 2 fake CPU devices.
RUN_OVERRIDES = {
    "model.vocab_size": 512, "model.d_model": 64, "model.num_layers": 2, "model.num_heads": 4,
    "model.num_kv_heads": 2, "model.mlp_dim": 128, "data.seq_len": 64, "data.tokenizer_train_bytes": 300_000,
    "data.shuffle_window": 64, "train.global_batch": 8, "train.steps": 40, "train.log_every": 5,
    "checkpoint.every": 10, "eval.every": 20, "eval.batches": 2,
    # Snapshot averaging and the task suite have their own tests (test_eval.py); off here to keep runs short.
    "checkpoint.average_every": 0, "eval.tasks": "", "eval.at_start": False,
    "objectives.weights": TEXT_ONLY,  # The text stack: its runs are what these tests time.
}


def run_env(devices: int = 2) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags(devices)
  env["PYTHONUNBUFFERED"] = "1"
  return env


def train_command(workdir: str, overrides: dict) -> list[str]:
  return [sys.executable, "-m", "codex_jax", "train", "--config=experiments/codex.py:tiny", f"--workdir={workdir}",
          "--json", "--noprogress", *(f"--config.{key}={value}" for key, value in overrides.items())]


def train_process(workdir: str, overrides: dict) -> subprocess.Popen:
  return subprocess.Popen(train_command(workdir, overrides), cwd=ROOT, env=run_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def run_train(workdir: str, overrides: dict, devices: int = 2) -> subprocess.CompletedProcess:
  return subprocess.run(train_command(workdir, overrides), cwd=ROOT, env=run_env(devices), capture_output=True,
                        text=True, timeout=600)


def trained_workdir(tmp_path_factory, name: str, overrides: dict,
                    devices: int = 2) -> tuple[str, subprocess.CompletedProcess]:
  """A finished `codex train` run on the embedded corpus in a fresh temporary workdir (module fixtures)."""
  from codex_jax.data.default_corpus.build import build_default_corpus
  build_default_corpus()
  workdir = str(tmp_path_factory.mktemp(name))
  result = run_train(workdir, overrides, devices)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result
