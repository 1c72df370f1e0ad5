"""MTP ablation: the `tiny` model (rows of 128) with and without multi-token prediction, at equal compute.

Run (each ~10 min on the shared 2-core VM; compare `eval_loss`, the next-token held-out loss, in the summaries):
  codex train --config=experiments/mtp_ablation.py:without_mtp --workdir=runs/mtp_off --progress=false
  codex train --config=experiments/mtp_ablation.py:with_mtp --workdir=runs/mtp_on --progress=false

Equal compute: one MTP depth adds a projection, a transformer layer and another pass through the output
projection to every token's forward and backward: 1.51x the model FLOPs per token here
(telemetry/flops.py, `train_flops_per_token`). Both arms see the same batch and sequence length, so the
MTP arm gets BASE_STEPS / 1.51 steps (fewer tokens), each arm with its own full warmup + cosine
schedule. Both evaluate the same held-out batches (`eval.batches` x global_batch rows) at their end.
"""

import dataclasses
import importlib.util
import os

from codex_jax.config.schema import ModelConfig
from codex_jax.telemetry.flops import train_flops_per_token

BASE_STEPS = 200  # Steps of the arm without MTP.
VARIANTS = ("with_mtp", "without_mtp")


def _codex():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "codex.py")
  spec = importlib.util.spec_from_file_location("codex_experiment", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _flops_per_token(config) -> float:
  model = ModelConfig(**{f.name: config.model[f.name] for f in dataclasses.fields(ModelConfig)})
  return train_flops_per_token(model, config.data.seq_len)


def get_config(arg=None):
  variant = arg or "with_mtp"
  if variant not in VARIANTS:
    raise ValueError(f"experiments/mtp_ablation.py: unknown variant {variant!r}; expected one of {VARIANTS}")
  config = _codex().get_config("tiny")
  config.data.seq_len = 128  # Half tiny's rows: both arms fit a few minutes on a shared 2-core CPU.
  base_flops = _flops_per_token(config)
  config.model.mtp_depth = 1 if variant == "with_mtp" else 0
  # Equal model FLOPs: the MTP arm trains on fewer tokens (same batch, fewer steps).
  config.train.steps = round(BASE_STEPS * base_flops / _flops_per_token(config))
  config.train.log_every = 10
  config.eval.every = config.train.steps  # One held-out evaluation, at the end ...
  config.eval.batches = 16                # ... on 16 x 16 x 128 held-out positions, the same for both arms.
  config.eval.tasks = ""                  # Held-out loss only: the task suite is not what is compared.
  config.checkpoint.every = config.train.steps
  return config
