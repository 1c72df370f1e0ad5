"""Shared test helpers: experiment configs by variant, with overrides, as typed Configs."""

from __future__ import annotations

import importlib.util
import os

from codex_jax.config import load as config_load

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
  for dotted, value in overrides.items():
    group, key = dotted.split(".")
    raw.setdefault(group, {})[key] = value
  return raw


def load(variant: str = "tiny", num_devices: int | None = None, **overrides):
  return config_load.load(config_dict(variant, **overrides), num_devices=num_devices)


# A model small enough to compile and step in about a second on this CPU.
MICRO = {
    "model.vocab_size": 256, "model.d_model": 64, "model.num_layers": 2, "model.num_heads": 4,
    "model.num_kv_heads": 2, "model.mlp_dim": 128, "data.seq_len": 32, "train.global_batch": 8,
    "train.steps": 10,
}
