"""`codex plan --flops C [--inference-tokens T] [--manifest FILE] [--law epoch|chinchilla|FIT.json] ...`.

The compute-optimal parameters and tokens for a FLOP budget under a scaling law, the inference-adjusted
choice at equal predicted loss, a model shape and batch, the raw tokens per modality the manifest's exchange
rates imply, and optionally an experiments/ file that trains the plan.
"""

from __future__ import annotations

import math

from absl import flags

from codex_jax.cli import common  # noqa: F401  (--json)

flags.DEFINE_float("flops", None, "Training compute budget C in FLOPs (C = 6 N D), e.g. 5.76e23.")
flags.DEFINE_float("inference-tokens", None, "Lifetime inference tokens T: also plan the model that minimises "
                   "6 N D + 2 N T at the compute-optimal loss (Sardana & Frankle).")
flags.DEFINE_string("manifest", None, "Data manifest: report the raw tokens per modality its exchange rates imply.")
flags.DEFINE_string("law", "epoch", "Scaling law: epoch (Besiroglu et al.'s refit of Hoffmann et al.'s data: 70B on "
                    "1.4T at Gopher's budget, as the paper found), chinchilla (Hoffmann et al.'s printed, rounded "
                    "constants: 32B on 3T there) or a FIT.json from `codex scaling fit`.")
flags.DEFINE_integer("vocab", 32000, "Vocabulary size of the planned model's shape.")
flags.DEFINE_integer("seq-len", 2048, "Sequence length of the planned run.")
flags.DEFINE_float("critical-batch-tokens", None, "Cap on the batch in tokens (the data's critical batch size).")
flags.DEFINE_integer("batch-multiple", 8, "The global batch is a multiple of this many sequences: the data-parallel "
                     "width of the mesh it will run on.")
flags.DEFINE_string("write-config", None, "Write an experiments/ file for the plan here, e.g. experiments/planned.py.")


def run(flag_values):
  from codex_jax.planning import config_writer, exchange, inference, laws, shape
  flops, tokens_t = flag_values.flops, flag_values["inference-tokens"].value
  if flops is None or not math.isfinite(flops) or flops <= 0:
    raise flags.ValidationError(f"--flops={flops}: a positive training budget in FLOPs is required, e.g. 5.76e23")
  if tokens_t is not None and (not math.isfinite(tokens_t) or tokens_t < 0):
    raise flags.ValidationError(f"--inference-tokens={tokens_t}: must be a non-negative token count")
  seq_len, vocab, cap = flag_values["seq-len"].value, flag_values.vocab, flag_values["critical-batch-tokens"].value
  multiple = flag_values["batch-multiple"].value
  for name, value in (("--seq-len", seq_len), ("--vocab", vocab), ("--critical-batch-tokens", cap),
                      ("--batch-multiple", multiple)):
    if value is not None and value <= 0:
      raise flags.ValidationError(f"{name}={value}: must be positive")
  law = laws.load_law(flag_values.law)
  n, d = law.compute_optimal(flops)
  result = {"law": {"name": law.name, **law.constants()}, "flops": flops, "params": n, "tokens": d,
            "loss": law.loss(n, d), "tokens_per_param": d / n}
  planned_n, planned_d = n, d
  if tokens_t is not None:
    adjusted = inference.inference_adjusted(law, flops, tokens_t)
    result["inference_tokens"] = tokens_t
    result["inference_adjusted"] = adjusted
    planned_n, planned_d = adjusted["params"], adjusted["tokens"]
  model = shape.model_shape(planned_n, vocab)
  rule_flops = shape.rule_flops(model, seq_len, planned_d)
  batch = shape.global_batch(rule_flops, seq_len, cap, multiple)
  steps = max(1, math.ceil(planned_d / (batch * seq_len)))
  lr = shape.learning_rate(rule_flops)
  result["shape"] = {**model.model_values(), "vocab_size": vocab, "params": model.params}
  result["batch"] = {"global_batch": batch, "seq_len": seq_len, "tokens_per_step": batch * seq_len,
                     "compute_optimal_tokens": shape.batch_tokens(rule_flops), "critical_batch_tokens": cap,
                     "steps": steps, "learning_rate": lr, "rule_flops": rule_flops, "multiple": multiple,
                     "extrapolation": shape.extrapolation(rule_flops),
                     "rule": "DeepSeek LLM: B = 0.292 C^0.3271 tokens, lr = 0.3118 C^-0.125, C = M D in non-embedding "
                             f"FLOPs; the nearest multiple of {multiple} sequences"}
  if flag_values.manifest:
    result["data"] = exchange.raw_tokens(flag_values.manifest, planned_d)
  text = summary(result)
  if flag_values["write-config"].value:
    result["config"] = config_writer.write_config(
        flag_values["write-config"].value, model, vocab_size=vocab, seq_len=seq_len, global_batch=batch,
        steps=steps, learning_rate=lr, tokens=planned_d, summary=text)
  if not flag_values.json:
    print(text)
    if "config" in result:
      print(f"wrote {result['config']}")
  return result


def summary(r: dict) -> str:
  law = r["law"]
  lines = [f"law {law['name']}: L = {law['E']:.4g} + {law['A']:.4g}/N^{law['alpha']:.4g} + "
           f"{law['B']:.4g}/D^{law['beta']:.4g}; budget C = {r['flops']:.3g} FLOPs",
           f"compute-optimal: {r['params'] / 1e9:.3f}B parameters, {r['tokens'] / 1e9:.4g}B tokens "
           f"({r['tokens_per_param']:.1f} per parameter), predicted loss {r['loss']:.4f}"]
  if "inference_adjusted" in r:
    a = r["inference_adjusted"]
    lines.append(f"inference-adjusted for {r['inference_tokens']:.3g} lifetime tokens: {a['params'] / 1e9:.3f}B "
                 f"parameters ({a['smaller_by']:.1%} smaller), {a['tokens'] / 1e9:.4g}B tokens, loss {a['loss']:.4f}; "
                 f"total FLOPs {a['total_flops']:.3g} vs {a['compute_optimal_total_flops']:.3g}")
  s, b = r["shape"], r["batch"]
  lines.append(f"shape: {s['num_layers']} layers, d_model {s['d_model']}, {s['num_heads']} heads "
               f"({s['num_kv_heads']} kv), mlp {s['mlp_dim']}, vocab {s['vocab_size']}: {s['params'] / 1e9:.3f}B")
  lines.append(f"batch: {b['global_batch']} x {b['seq_len']} = {b['tokens_per_step']:,} tokens/step "
               f"(a multiple of {b['multiple']}), {b['steps']:,} steps, lr {b['learning_rate']:.3g}; DeepSeek's rule "
               f"at C = M D = {b['rule_flops']:.3g} non-embedding FLOPs")
  if b["extrapolation"]:
    lines.append(f"warning: {b['extrapolation']}")
  if "data" in r:
    raw = ", ".join(f"{m} {v / 1e9:.4g}B" for m, v in sorted(r["data"]["raw_tokens"].items()))
    lines.append(f"data ({r['data']['phase']}): {r['data']['effective_tokens'] / 1e9:.4g}B effective tokens = "
                 f"raw {raw}")
  return "\n".join(lines)
