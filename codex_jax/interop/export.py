"""`codex export hf`: a checkpoint (or the average of the last few) as a Hugging Face Llama model directory."""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax

from codex_jax.checkpoint.load import LoadedStep, load_step
from codex_jax.data.tokenizer import EOS_ID, PAD_ID, SPECIAL_TOKENS, pinned_path
from codex_jax.hashing import sha256_file
from codex_jax.interop import files, llama
from codex_jax.interop.llama import InteropError

MAX_SHARD_BYTES = 2 * 1024**3  # Larger exports are split into model-0000i-of-0000n.safetensors.


def load(workdir: str, step: int | None = None, average: int | None = None) -> LoadedStep:
  """The checkpoint at `step` (default: latest), or the parameter average of the last `average` up to it."""
  if average:
    from codex_jax.checkpoint.average import load_average  # Late: the averaging module is optional here.
    return load_average(workdir, average, step=step)
  return load_step(workdir, step)


def check_out(out: str) -> None:
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise InteropError(f"--out={out}: exists and is not an empty directory; an export never overwrites")


def export_hf(workdir: str, out: str, *, step: int | None = None, average: int | None = None,
              max_shard_bytes: int = MAX_SHARD_BYTES) -> dict[str, Any]:
  """Writes config.json, model.safetensors (or shards + index), the tokenizer files and lineage.json to `out`."""
  check_out(out)
  tokenizer = pinned_path(workdir)
  if not os.path.isfile(tokenizer):
    raise InteropError(f"{tokenizer}: missing; the run's tokenizer is pinned there by `codex train`")
  loaded = load(workdir, step, average)
  cfg = loaded.cfg
  params = jax.device_get(loaded.params)
  tensors = llama.to_hf(params, cfg.model)
  left_out = llama.left_out(params)
  # Everything goes into a sibling folder first, so `out` is either absent/empty or complete.
  partial = f"{os.path.abspath(out).rstrip(os.sep)}.partial"
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  written = files.write_tensors(tensors, partial, max_shard_bytes)
  pad, eos = SPECIAL_TOKENS[PAD_ID], SPECIAL_TOKENS[EOS_ID]
  files.write_json(os.path.join(partial, files.CONFIG),
                   llama.hf_config(cfg.model, cfg.data.seq_len, cfg.model.param_dtype, PAD_ID, EOS_ID))
  files.write_json(os.path.join(partial, "generation_config.json"),
                   {"bos_token_id": EOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID})
  shutil.copyfile(tokenizer, os.path.join(partial, files.TOKENIZER))
  # Documents are separated by EOS and never start with a BOS: the tokenizer adds no special tokens.
  files.write_json(os.path.join(partial, "tokenizer_config.json"),
                   {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.data.seq_len,
                    "pad_token": pad, "eos_token": eos, "bos_token": None, "unk_token": None,
                    "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False})
  files.write_json(os.path.join(partial, "special_tokens_map.json"), {"pad_token": pad, "eos_token": eos})
  lineage = {"format": llama.ARCHITECTURE, "workdir": os.path.abspath(workdir), "step": loaded.step,
             "average": average or None, "record": loaded.record, "left_out": left_out,
             "files": {name: sha256_file(os.path.join(partial, name)) for name in written}}
  files.write_json(os.path.join(partial, "lineage.json"), lineage)
  if os.path.isdir(out):
    os.rmdir(out)  # Empty (checked above).
  os.replace(partial, out)
  return {"out": os.path.abspath(out), "step": loaded.step, "average": average or None,
          "content_root": loaded.record.get("content_root"), "tensors": len(tensors),
          "files": sorted(os.listdir(out)), "left_out": left_out}
