"""`codex generate --workdir=W --prompt=TEXT [--max-tokens=N --temperature=T --top-p=P]`: sample from a checkpoint."""

from __future__ import annotations

from absl import flags

from codex_jax.cli import common  # noqa: F401  (--json)

flags.DEFINE_string("workdir", None, "The run to sample from.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_string("prompt", None, "Text the model continues.")
flags.DEFINE_integer("max-tokens", 64, "New tokens at most (generation also stops at end-of-text).")
flags.DEFINE_float("temperature", 0.0, "0: greedy; otherwise the softmax temperature.")
flags.DEFINE_float("top-p", 1.0, "Nucleus sampling: keep the most likely tokens up to this probability mass.")
flags.DEFINE_integer("seed", 0, "Sampling seed (the same seed gives the same text).")


def run(flag_values):
  if not flag_values.workdir or flag_values.prompt is None:
    raise flags.ValidationError("--workdir and --prompt are required, e.g. --workdir=runs/tiny --prompt='def '")
  max_tokens, temperature, top_p = (flag_values[name].value for name in ("max-tokens", "temperature", "top-p"))
  if max_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
    raise flags.ValidationError(f"--max-tokens={max_tokens} must be >= 1, --temperature={temperature} >= 0 and "
                                f"--top-p={top_p} in (0, 1]")
  from codex_jax.checkpoint.load import load_step  # After flag checks: jax loads here.
  from codex_jax.data.tokenizer import EOS_ID, load_tokenizer, pinned_path
  from codex_jax.model.sample import generate
  from codex_jax.model.transformer import inference_params

  path = pinned_path(flag_values.workdir)
  loaded = load_step(flag_values.workdir, flag_values.step)
  tokenizer = load_tokenizer(path, loaded.cfg.model.vocab_size)
  prompt = tokenizer.encode(flag_values.prompt).ids
  if not prompt:
    raise flags.ValidationError("--prompt is empty: give the model some text to continue")
  ids = generate(inference_params(loaded.params), loaded.cfg.model, prompt, max_tokens, temperature=temperature, top_p=top_p,
                 seed=flag_values.seed, stop_id=EOS_ID)
  text = tokenizer.decode(ids)
  if not flag_values.json:
    print(flag_values.prompt + text)
  return {"step": loaded.step, "prompt": flag_values.prompt, "completion": text, "token_ids": ids}
