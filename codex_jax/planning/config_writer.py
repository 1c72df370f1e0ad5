"""Writes a plan as an `experiments/` file: experiments/codex.py's base_config with the planned shape and run."""

from __future__ import annotations

import os

from codex_jax import atomic
from codex_jax.planning.shape import Shape

_TEMPLATE = '''"""{title}

Written by `codex plan`; the plan:
{summary}

Run:
  codex train --config={path} --workdir=runs/{stem}
"""

import importlib.util
import os

_CODEX = os.path.join(os.path.dirname(os.path.abspath(__file__)), {codex_rel!r})
_spec = importlib.util.spec_from_file_location("codex_experiment", _CODEX)
_codex = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_codex)


def get_config(arg=None):
  del arg  # One variant: the plan.
  config = _codex.base_config()
  config.model.update(vocab_size={vocab}, d_model={d_model}, num_layers={num_layers}, num_heads={num_heads},
                      num_kv_heads={num_kv_heads}, head_dim=0, mlp_dim={mlp_dim})  # {params:,} parameters.
  config.data.seq_len = {seq_len}
  config.optimizer.learning_rate = {lr:.3g}  # DeepSeek LLM's compute-optimal peak for the budget.
  config.train.global_batch = {global_batch}  # {batch_tokens:,} tokens per step.
  config.train.steps = {steps}  # {tokens:.4g} planned tokens / tokens per step.
  return config
'''


def write_config(path: str, shape: Shape, *, vocab_size: int, seq_len: int, global_batch: int, steps: int,
                 learning_rate: float, tokens: float, summary: str, codex_path: str = "experiments/codex.py") -> str:
  """Writes the file; experiments/codex.py is found relative to it, so the file may live anywhere."""
  codex_rel = os.path.relpath(os.path.abspath(codex_path), os.path.dirname(os.path.abspath(path)))
  stem = os.path.splitext(os.path.basename(path))[0]
  text = _TEMPLATE.format(
      title=f"A compute-optimal plan: {shape.params / 1e9:.3g}B parameters on {tokens / 1e9:.4g}B tokens.",
      summary="\n".join("  " + line for line in summary.splitlines()), path=path, stem=stem, codex_rel=codex_rel,
      vocab=vocab_size, d_model=shape.d_model, num_layers=shape.num_layers, num_heads=shape.num_heads,
      num_kv_heads=shape.num_kv_heads, mlp_dim=shape.mlp_dim, params=shape.params, seq_len=seq_len,
      lr=learning_rate, global_batch=global_batch, batch_tokens=global_batch * seq_len, steps=steps, tokens=tokens)
  return atomic.write_text(path, text)
