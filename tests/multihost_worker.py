"""One process of tests/test_multihost.py: a few train steps of a micro model on a fixed global batch.

Run as `python -m tests.multihost_worker LAYOUT...` (LAYOUT = data:tensor, e.g. 8:1 4:2) from the repo
root, with the device count in XLA_FLAGS and, for several processes, the CODEX_* variables that
`codex_jax.parallel.distributed` reads. Each process feeds only its own rows of the global batch. Prints
one JSON line: per layout, the losses, gradient norms and the sum of the final parameters.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from codex_jax.config import load as config_load
from codex_jax.parallel import distributed
from codex_jax.parallel.mesh import build_mesh, replicated
from codex_jax.runtime import feed
from codex_jax.train.bench import synthetic_batch
from codex_jax.train.setup import build_trainer
from tests.helpers import MICRO, config_dict

STEPS = 3
# Cheapest to compile (about 2x less than remat=full with 4 query chunks); the comparison holds for any.
FAST_MODEL = {"model.remat": "none", "model.attention_chunks": 1}


def run(data: int, tensor: int) -> dict:
  raw = config_dict("tiny", **{**MICRO, **FAST_MODEL, "mesh.data": data, "mesh.tensor": tensor})
  cfg = config_load.load(raw, num_devices=jax.device_count(), num_processes=jax.process_count())
  mesh = build_mesh(cfg.mesh)
  trainer = build_trainer(cfg, mesh)
  state = trainer.init_state()
  rows = cfg.train.global_batch // jax.process_count()
  global_batch = synthetic_batch(cfg, cfg.train.global_batch, seed=0)
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  batch = feed.to_global({name: value[mine] for name, value in global_batch.items()}, trainer.engine.data_sharding)
  losses, grad_norms = [], []
  for _ in range(STEPS):
    state, metrics = trainer.train_step(state, batch)
    losses.append(float(metrics["loss"]))
    grad_norms.append(float(metrics["grad_norm"]))
  # A replicated scalar: readable on every process although each holds only its shards of the params.
  total = jax.jit(lambda p: sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(p)),
                  out_shardings=replicated(mesh))(state.params)
  return {"losses": losses, "grad_norms": grad_norms, "param_sum": float(np.asarray(total))}


def main(layouts: list[str]) -> None:
  distributed.initialize()  # Before any device is touched, as `codex train` does.
  results = {layout: run(*map(int, layout.split(":"))) for layout in layouts}
  print(json.dumps({"process_index": jax.process_index(), "process_count": jax.process_count(),
                    "local_devices": jax.local_device_count(), "devices": jax.device_count(), "results": results}),
        flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
