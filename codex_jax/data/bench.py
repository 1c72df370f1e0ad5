"""How fast the data side alone (data/batches.py) delivers batches: what `make bench` compares with the trainer."""

from __future__ import annotations

import time

import numpy as np

from codex_jax.config.schema import Config
from codex_jax.data import batches as batches_lib
from codex_jax.data.accounting import TokenAccountant
from codex_jax.data.plan import build_plan


def benchmark_batches(cfg: Config, batches: int, warmup: int = 5) -> dict:
  """Times `batches` train batches after `warmup`; tokens are row positions, as the trainer counts them."""
  plan = build_plan(cfg.data, vocab_size=cfg.model.vocab_size, feature_dim=cfg.model.feature_dim)
  phase = plan.manifest.phases[0].name
  it = batches_lib.make_iterator(plan, cfg.data, feature_dim=cfg.model.feature_dim, split="train", phase=phase,
                              local_batch=cfg.train.global_batch, seed=cfg.data.seed)
  accountant = TokenAccountant(plan, phase)
  try:
    for _ in range(warmup):
      next(it)
    start = time.perf_counter()
    real = effective = 0.0
    for _ in range(batches):
      batch = next(it)
      metrics = accountant.update(batch)
      real += float(np.sum(batch["segment_ids"] > 0))
      effective += sum(v for k, v in metrics.items() if k.startswith("data/modality/") and k.endswith("/effective_tokens"))
    seconds = time.perf_counter() - start
  finally:
    it.close()
  tokens = batches * cfg.train.global_batch * cfg.data.seq_len
  return {"data_tokens_per_s": tokens / seconds, "data_real_tokens_per_s": real / seconds,
          "data_effective_tokens_per_s": effective / seconds, "data_batches_per_s": batches / seconds,
          "num_workers": cfg.data.num_workers, "manifest_hash": plan.manifest_hash}
