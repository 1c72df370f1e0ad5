"""The codex decoder <-> Hugging Face LlamaForCausalLM mapping: config.json fields and tensor names.

codex keeps einsum-shaped weights (q [D, H, K], gate_up [D, 2, F], a leading layer axis when the stack
is scanned); Hugging Face keeps torch Linear weights [out, in] per layer. RoPE needs no q/k permutation:
codex rotates the half-split pairs (i, i + K/2), which is the layout Hugging Face Llama checkpoints are
stored in (`rotate_half`); Meta's interleaved (2i, 2i + 1) original weights are the ones that need
`convert_llama_weights_to_hf`'s permutation. Dimension letters as in model/layers.py; N layers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from codex_jax.config.schema import ModelConfig
from codex_jax.model.transformer import block_params, stack_blocks

ARCHITECTURE = "LlamaForCausalLM"
# The decoder's own parameters, the only top-level keys exported. Anything else (mtp, feature_in,
# modality_embedding, later objective heads) is left out and listed, never guessed at.
DECODER_KEYS = ("embedding", "layers", "final_norm", "unembed")
# Buffers some Llama checkpoints carry that hold no weights (recomputed from the config).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Model config keys that an import takes from config.json.
IMPORTED_MODEL_KEYS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                       "rope_theta", "norm_eps", "tie_embeddings")


class InteropError(ValueError):
  """A model directory or checkpoint that cannot be mapped; the message names the file, key and value."""


# --- config.json ---------------------------------------------------------------------------------

def hf_config(cfg: ModelConfig, max_positions: int, dtype: str, pad_id: int, eos_id: int) -> dict[str, Any]:
  """config.json of a LlamaForCausalLM with `cfg`'s shape (read by transformers 4.x and 5.x alike)."""
  return {
      "architectures": [ARCHITECTURE], "model_type": "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.resolved_head_dim,
      "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta, "rope_scaling": None,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "max_position_embeddings": max_positions, "attention_bias": False, "mlp_bias": False,
      "attention_dropout": 0.0, "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
      "torch_dtype": dtype, "dtype": dtype, "use_cache": True,
      "pad_token_id": pad_id, "bos_token_id": eos_id, "eos_token_id": eos_id,
  }


def model_overrides(config: dict[str, Any], where: str) -> dict[str, Any]:
  """The codex model keys (IMPORTED_MODEL_KEYS) of a Hugging Face config.json; refuses what codex cannot express."""
  archs = config.get("architectures") or []
  if ARCHITECTURE not in archs and config.get("model_type") != "llama":
    raise InteropError(f"{where}: architectures={archs!r}, model_type={config.get('model_type')!r}; "
                       f"expected {ARCHITECTURE!r} (model_type 'llama')")

  def need(key):
    if key not in config:
      raise InteropError(f"{where}: key {key!r} is missing")
    return config[key]

  def refuse(key, value, expected):
    raise InteropError(f"{where}: {key}={value!r} is not supported; expected {expected}")

  if config.get("hidden_act", "silu") != "silu":
    refuse("hidden_act", config["hidden_act"], "'silu' (SwiGLU)")
  for key in ("attention_bias", "mlp_bias"):
    if config.get(key):
      refuse(key, config[key], "false (codex layers have no biases)")
  if config.get("rope_scaling"):
    refuse("rope_scaling", config["rope_scaling"], "null (plain RoPE)")
  rope = config.get("rope_parameters") or {}
  if rope.get("rope_type", "default") != "default":
    refuse("rope_parameters.rope_type", rope["rope_type"], "'default' (plain RoPE)")
  d_model, heads = int(need("hidden_size")), int(need("num_attention_heads"))
  head_dim = int(config.get("head_dim") or d_model // heads)
  return {
      "vocab_size": int(need("vocab_size")), "d_model": d_model, "num_layers": int(need("num_hidden_layers")),
      "num_heads": heads, "num_kv_heads": int(config.get("num_key_value_heads") or heads),
      "head_dim": 0 if head_dim * heads == d_model else head_dim,
      "mlp_dim": int(need("intermediate_size")),
      "rope_theta": float(rope.get("rope_theta", config.get("rope_theta", 10_000.0))),
      "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
      "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
  }


# --- tensors ---------------------------------------------------------------------------------------

def left_out(params: dict) -> list[str]:
  """Top-level parameter keys an export does not carry (objective heads, non-text inputs)."""
  return sorted(k for k in params if k not in DECODER_KEYS and not k.startswith("layers_"))


def to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Hugging Face tensor name -> array, from the decoder's parameters only (see DECODER_KEYS)."""
  D, H, G, K = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
  a = lambda x: np.asarray(x)  # noqa: E731
  out = {"model.embed_tokens.weight": a(params["embedding"]), "model.norm.weight": a(params["final_norm"]["scale"])}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = a(params["unembed"]).T
  for i, layer in enumerate(block_params(params, cfg.num_layers)):
    p, attn, mlp = f"model.layers.{i}.", layer["attention"], layer["mlp"]
    out[p + "self_attn.q_proj.weight"] = a(attn["q"]).reshape(D, H * K).T
    out[p + "self_attn.k_proj.weight"] = a(attn["k"]).reshape(D, G * K).T
    out[p + "self_attn.v_proj.weight"] = a(attn["v"]).reshape(D, G * K).T
    out[p + "self_attn.o_proj.weight"] = a(attn["o"]).reshape(H * K, D).T
    out[p + "mlp.gate_proj.weight"] = a(mlp["gate_up"])[:, 0, :].T
    out[p + "mlp.up_proj.weight"] = a(mlp["gate_up"])[:, 1, :].T
    out[p + "mlp.down_proj.weight"] = a(mlp["down"]).T
    out[p + "input_layernorm.weight"] = a(layer["attention_norm"]["scale"])
    out[p + "post_attention_layernorm.weight"] = a(layer["mlp_norm"]["scale"])
  return {name: np.ascontiguousarray(x) for name, x in out.items()}


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor a Llama checkpoint of `cfg`'s shape must hold, with its shape."""
  D, H, G, K, F, V = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim, cfg.mlp_dim,
                      cfg.vocab_size)
  shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
  if not cfg.tie_embeddings:
    shapes["lm_head.weight"] = (V, D)
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    shapes.update({p + "self_attn.q_proj.weight": (H * K, D), p + "self_attn.k_proj.weight": (G * K, D),
                   p + "self_attn.v_proj.weight": (G * K, D), p + "self_attn.o_proj.weight": (D, H * K),
                   p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                   p + "mlp.down_proj.weight": (D, F), p + "input_layernorm.weight": (D,),
                   p + "post_attention_layernorm.weight": (D,)})
  return shapes


def check_tensors(shapes: dict[str, tuple[int, ...]], cfg: ModelConfig, where: str) -> None:
  """Every expected tensor present with its shape, nothing unknown: else one error naming the tensors."""
  expected = expected_shapes(cfg)
  problems = [f"{name} is missing (expected shape {list(shape)})" for name, shape in expected.items()
              if name not in shapes]
  problems += [f"{name} has shape {list(shapes[name])}, expected {list(shape)}" for name, shape in expected.items()
               if name in shapes and tuple(shapes[name]) != shape]
  problems += [f"{name} is not a tensor of a {ARCHITECTURE} with this config.json" for name in sorted(shapes)
               if name not in expected and not name.endswith(IGNORED_SUFFIXES)
               and not (cfg.tie_embeddings and name == "lm_head.weight")]
  if problems:
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    raise InteropError(f"{where}: {shown}")


def from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, scanned: bool) -> dict[str, Any]:
  """The decoder's parameter tree (DECODER_KEYS) from checked Hugging Face tensors; the inverse of to_hf."""
  D, H, G, K = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
  layers = []
  for i in range(cfg.num_layers):
    t = lambda name: tensors[f"model.layers.{i}.{name}.weight"]  # noqa: E731, B023
    layers.append({
        "attention": {"q": t("self_attn.q_proj").T.reshape(D, H, K), "k": t("self_attn.k_proj").T.reshape(D, G, K),
                      "v": t("self_attn.v_proj").T.reshape(D, G, K), "o": t("self_attn.o_proj").T.reshape(H, K, D)},
        "attention_norm": {"scale": t("input_layernorm")},
        "mlp": {"gate_up": np.stack([t("mlp.gate_proj").T, t("mlp.up_proj").T], axis=1), "down": t("mlp.down_proj").T},
        "mlp_norm": {"scale": t("post_attention_layernorm")},
    })
  params: dict[str, Any] = {"embedding": tensors["model.embed_tokens.weight"],
                            "final_norm": {"scale": tensors["model.norm.weight"]}}
  if not cfg.tie_embeddings:
    params["unembed"] = tensors["lm_head.weight"].T
  if scanned:
    params["layers"] = stack_blocks(layers, np.stack)
  else:
    params.update({f"layers_{i}": layer for i, layer in enumerate(layers)})
  return params
