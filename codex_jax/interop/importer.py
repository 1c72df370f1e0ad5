"""`codex import hf`: a Llama-layout model directory as checkpoint 0 of a new run that `codex train` continues.

The run's config is the base experiment (--config) with the model shape taken from config.json and the
tokenizer pinned in the workdir; parameters the Llama layout lacks (non-text inputs, objective heads)
and the optimizer state start fresh. The lineage starts at {"kind": "import", ...} with the imported
parameters' content root, so every later record chains back to exactly these weights.
"""

from __future__ import annotations

import copy
import os
import shutil
from typing import Any

import jax
import numpy as np

from codex_jax.checkpoint.load import one_device_config
from codex_jax.checkpoint.manager import Checkpointer, roots, state_leaf_hashes
from codex_jax.config import load as config_load
from codex_jax.config.workdir import CONFIG_FILE, config_hash, write_config
from codex_jax.data.tokenizer import load_tokenizer, pinned_path
from codex_jax.hashing import sha256_file
from codex_jax.interop import files, llama
from codex_jax.interop.llama import InteropError
from codex_jax.parallel.mesh import one_device_mesh


def import_hf(directory: str, workdir: str, base_config: dict[str, Any]) -> dict[str, Any]:
  """Checks everything, then writes `workdir`: config.json, tokenizer.json, data record, checkpoint 0."""
  from codex_jax.runtime.inputs import RunInputs  # Late: the data and training stack.
  from codex_jax.train.setup import build_trainer

  # 1. Checks; nothing is written until all have passed.
  if os.path.exists(os.path.join(workdir, CONFIG_FILE)) or os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise InteropError(f"--workdir={workdir}: already holds a run; import into a new workdir")
  if not os.path.isdir(directory):
    raise InteropError(f"{directory}: no such model directory")
  hf = files.read_config(directory)
  overrides = llama.model_overrides(hf, os.path.join(directory, files.CONFIG))
  config = copy.deepcopy(base_config)
  config["model"].update(overrides)
  source_tokenizer = os.path.join(directory, files.TOKENIZER)
  if os.path.isfile(source_tokenizer):
    config["data"]["tokenizer_path"] = os.path.abspath(pinned_path(workdir))
  elif config["data"].get("tokenizer_path"):
    source_tokenizer = config["data"]["tokenizer_path"]
  else:
    raise InteropError(f"{source_tokenizer}: missing; the embeddings' token ids mean nothing without it "
                       "(or name one with --config.data.tokenizer_path)")
  load_tokenizer(source_tokenizer, overrides["vocab_size"])  # Refuses a tokenizer codex cannot train with.
  cfg = one_device_config({**config, "data": {**config["data"], "tokenizer_path": source_tokenizer}})
  # (The tokenizer as imported: the workdir copy does not exist yet.)
  config_load.load(config, num_devices=None)  # The saved config itself must validate too.
  weights = files.weight_files(directory)
  llama.check_tensors(files.tensor_shapes(weights), cfg.model, directory)
  tensors = files.read_tensors(weights, cfg.model.param_dtype)
  imported = llama.from_hf(tensors, cfg.model, scanned=cfg.model.scan_layers)

  # 2. The state: a fresh init (optimizer, step, non-Llama parameters) with the imported weights in it.
  trainer = build_trainer(cfg, one_device_mesh(cfg.mesh))
  state = trainer.init_state()
  params = dict(state.params)
  for key, value in imported.items():
    params[key] = jax.tree.map(lambda new, old: jax.device_put(np.asarray(new, old.dtype), old.sharding),
                               value, params[key])
  state = state.replace(params=params)
  inputs = RunInputs.create(cfg, workdir, is_main=False)  # Builds the data plan; writes nothing.
  inputs.start(0, None)
  start = {"kind": "import", "source": os.path.abspath(directory), "format": llama.ARCHITECTURE,
           "files": {os.path.basename(p): sha256_file(p) for p in weights},
           "content_root": roots(state_leaf_hashes(state))["content_root"]}

  # 3. Write: tokenizer, config, data record, the lineage start and checkpoint 0.
  os.makedirs(workdir, exist_ok=True)
  shutil.copyfile(source_tokenizer, pinned_path(workdir))
  checkpointer = Checkpointer(workdir, cfg.checkpoint)
  try:
    checkpointer.start_fresh(start)
    write_config(workdir, config)
    inputs.write_record(workdir)
    record = checkpointer.save(0, state, inputs.batches, inputs.meta(),
                               {"manifest_hash": inputs.plan.manifest_hash, "config_hash": config_hash(config),
                                "eval": {"heldout_loss": None}})
  finally:
    checkpointer.close()
    inputs.close()
  changed = {f"model.{k}": v for k, v in overrides.items() if base_config["model"].get(k) != v}
  if config["data"]["tokenizer_path"] != base_config["data"].get("tokenizer_path"):
    changed["data.tokenizer_path"] = config["data"]["tokenizer_path"]
  return {"workdir": os.path.abspath(workdir), "start": start, "lineage_hash": record["lineage_hash"],
          "content_root": record["content_root"], "left_fresh": llama.left_out(params),
          "train_overrides": changed}
