"""The codex decoder-only experiment, from a multimodal CPU smoke run to 7B text on a pod.

Run:
  codex train --config=experiments/codex.py:tiny --workdir=runs/tiny
  codex train --config=experiments/codex.py:tiny --workdir=runs/tiny --config.train.steps=200

Variants (the part after the colon):
  tiny            CPU, a few minutes: the default `make train` run, all five objectives on.
  small           CPU, longer: a model worth looking at (text only, as every variant below).
  bench           the reference benchmark shape (d512, 8 layers, seq 512, batch 8), f32 compute.
  bench_bf16      the same shape with bfloat16 compute.
  150m_v5p, 150m_h100, 1b_v5p, 1b_h100, 7b_v5p, 7b_h100
                  accelerator scales with mesh and batch for a TPU v5p pod slice or one 8xH100 node;
                  TARGET_DEVICES below says how many devices each expects.
"""

import ml_collections

from codex_jax.config.load import defaults
from codex_jax.config.schema import TEXT_ONLY

# Devices each accelerator variant's mesh is laid out for (v5p: one device per chip).
TARGET_DEVICES = {
    "150m_v5p": 16,   # v5p-32 slice.
    "150m_h100": 8,
    "1b_v5p": 64,     # v5p-128 slice.
    "1b_h100": 8,
    "7b_v5p": 256,    # v5p-512 slice.
    "7b_h100": 8,
}


def base_config() -> ml_collections.ConfigDict:
  """The `tiny` CPU run: every key at the schema's default (codex_jax/config/schema.py, where each key is
  commented), and what this run sets otherwise."""
  config = defaults()

  # On this CPU: full remat is fastest (recomputing beats re-reading activations at this memory bandwidth),
  # and query chunks skip the masked upper blocks of causal attention.
  config.model.update(remat="full", attention_chunks=4)
  config.model.feature_dim = 96          # Values per non-text position: the widest is a video tubelet.
  config.data.audio_mels = 12            # 12 log-mel bins x 8 frames per position: 96 values, as a tubelet.
  config.data.audio_patch_frames = 8

  # WSD: tiny anneals over its last 60 steps (the data's anneal phase): the objective evals score the latest
  # parameters (a snapshot average has no EMA target encoder), and the anneal took every one of them lower
  # (docs/results.md, "The default run").
  config.optimizer.decay = "wsd"

  # A snapshot every 10 steps before each eval: the mean of the last 4 is scored beside the latest (`avg/`).
  config.checkpoint.average_every = 10
  # The untrained parameters are scored at step 0 too, so every score has its baseline. ~40 s here; each
  # eval of the multimodal tiny run costs ~20-45 s, three of them in 300 steps.
  config.eval.at_start = True

  # All five objectives: text next-token CE; vision MAE + two-view InfoNCE; align (image/video vs caption
  # contrastive); world (next video chunk's latent from this one and the action); action (flow matching on
  # embodied action chunks). Per manifest phase ("main", "anneal") weights may differ, e.g.
  # config.objectives.phase_weights.anneal = (1, .5, .5, .5, 1).
  config.objectives.weights = (1.0, 1.0, 1.0, 1.0, 1.0)
  # Text keeps at least a fifth of the pull; no other objective more than 0.4. World's lower bound is 0: its
  # share is under 0.004 all run (it predicts a small change from the last chunk's latent), a bound would push
  # its weight to the multiplier box, and with the anneal it beats copy-last without one.
  config.objectives.balance.low = (0.2, 0.05, 0.05, 0.0, 0.05)
  config.objectives.balance.high = (0.6, 0.4, 0.4, 0.4, 0.4)
  return config




def _small(config):
  config.model.update(vocab_size=8192, d_model=256, num_layers=6, num_heads=8, num_kv_heads=4,
                      mlp_dim=1024)
  config.data.seq_len = 512
  config.train.update(steps=2000, global_batch=16)
  config.optimizer.learning_rate = 2e-3
  config.checkpoint.every = 500
  config.eval.every = 250
  config.objectives.weights = TEXT_ONLY


def _bench(config, compute_dtype):
  # Saving the matmul outputs and recomputing the rest is fastest on CPU since the cross-entropy stopped holding
  # [B, L, V] logits (2026-12-07, one session: none 25.6 s, dots_no_batch 25.1, dots 24.0, full 26.7; before
  # it full remat won, 18.7 s against none 24.4 on a faster day). docs/results.md.
  config.model.update(vocab_size=32000, d_model=512, num_layers=8, num_heads=8, num_kv_heads=8,
                      mlp_dim=2048, compute_dtype=compute_dtype, remat="dots")
  config.data.seq_len = 512
  config.train.global_batch = 8
  config.objectives.weights = TEXT_ONLY


def _accelerator(config, size, platform):
  shapes = {
      # 134M with the 32k vocab.
      "150m": dict(d_model=768, num_layers=12, num_heads=12, num_kv_heads=12, mlp_dim=2048),
      # ~1.1B, Llama-3.2-1B-like with grouped-query attention.
      "1b": dict(d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, mlp_dim=8192),
      # ~6.7B, the Llama-2-7B shape.
      "7b": dict(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32, mlp_dim=11008),
  }
  # attention_chunks=1: whole attention (plain XLA under attention_impl="auto"; the masked half is computed).
  config.model.update(vocab_size=32000, compute_dtype="bfloat16", attention_chunks=1, **shapes[size])
  config.model.remat = {"150m": "dots", "1b": "dots", "7b": "full"}[size]
  config.data.seq_len = 4096 if size == "7b" else 2048
  config.optimizer.learning_rate = {"150m": 6e-4, "1b": 4e-4, "7b": 3e-4}[size]
  config.optimizer.decay_fraction = 0.2  # WSD with a final anneal over the last 20% of the steps.
  config.checkpoint.update(every=1000, max_to_keep=5)
  config.eval.every = 1000
  config.eval.at_start = False
  devices = TARGET_DEVICES[f"{size}_{platform}"]
  if platform == "v5p":
    # ICI is fast in every direction: FSDP over the whole slice, tensor parallel only at 7B.
    tensor = 4 if size == "7b" else 1
    config.mesh.update(data=devices // tensor, tensor=tensor, fsdp=True)
    config.train.global_batch = {"150m": 256, "1b": 1024, "7b": 1024}[size]
  else:
    # One NVLink node: FSDP over the 8 GPUs keeps the optimizer state of 7B at ~14 GB per GPU.
    config.mesh.update(data=8, tensor=1, fsdp=size != "150m")
    config.train.global_batch = {"150m": 256, "1b": 128, "7b": 64}[size]
  config.train.steps = {"150m": 20_000, "1b": 50_000, "7b": 100_000}[size]
  config.objectives.weights = TEXT_ONLY


VARIANTS = ("tiny", "small", "bench", "bench_bf16", *TARGET_DEVICES)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  if variant not in VARIANTS:
    raise ValueError(f"experiments/codex.py: unknown variant {variant!r}; expected one of {VARIANTS}")
  config = base_config()
  if variant == "small":
    _small(config)
  elif variant in ("bench", "bench_bf16"):
    _bench(config, "bfloat16" if variant == "bench_bf16" else "float32")
  elif variant != "tiny":
    size, platform = variant.split("_")
    _accelerator(config, size, platform)
  return config
