"""Hugging Face interop: export loads in transformers with the same logits and greedy tokens, import then
export is lossless, bad model directories are refused first, and KV-cache decoding matches a full forward."""

import functools
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codex_jax.checkpoint import lineage
from codex_jax.checkpoint.load import load_step
from codex_jax.data.default_corpus.build import build_default_corpus
from codex_jax.data.tokenizer import train_tokenizer
from codex_jax.hashing import sha256_file
from codex_jax.interop import files, llama
from codex_jax.interop.export import export_hf
from codex_jax.interop.importer import import_hf
from codex_jax.interop.llama import InteropError
from codex_jax.model import decode, sample
from codex_jax.model.transformer import Decoder
from tests import helpers

torch = pytest.importorskip("torch", reason="the test extra (pip install -e '.[test]') brings torch (CPU build)")
transformers = pytest.importorskip("transformers", reason="the test extra brings transformers")

pytestmark = pytest.mark.slow
# The data side of the micro run; the model shape comes from the imported config.json.
OVERRIDES = {k: v for k, v in helpers.RUN_OVERRIDES.items() if not k.startswith("model.")}
# No eval, no remat, one attention chunk: the cheapest compiles of the same math.
OVERRIDES.update({"train.steps": 3, "checkpoint.every": 3, "eval.batches": 0, "model.remat": "none",
                  "model.attention_chunks": 1})
TEXTS = ["def add(a, b):\n    return a + b\n", "import os\nimport sys\n\nprint(sys.argv)\n",
         "The quick brown fox jumps over the lazy dog. " * 2]


def _foreign_model(folder: str) -> None:
  """A Llama written by transformers itself: GQA (4 query, 2 kv heads), untied, non-default eps and theta,
  weights and norm scales far from their init so a wrong mapping shows; plus a byte-level BPE tokenizer."""
  config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                                    rope_theta=5000.0, initializer_range=0.2, tie_word_embeddings=False,
                                    max_position_embeddings=64)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1 + 0.2 * torch.randn_like(p))
  model.save_pretrained(folder)
  with open(os.path.join(folder, "tokenizer.json"), "w") as f:
    f.write(train_tokenizer(TEXTS * 20, 512).to_str())


def _codex(*args):
  return subprocess.run([sys.executable, "-m", "codex_jax", *args, "--json"], cwd=helpers.ROOT,
                        env=helpers.run_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A transformers-written Llama imported (in-process), trained 3 steps by `codex train`, exported by the CLI."""
  build_default_corpus()
  foreign, workdir = str(tmp_path_factory.mktemp("foreign")), str(tmp_path_factory.mktemp("run") / "w")
  _foreign_model(foreign)
  imported = import_hf(foreign, workdir, helpers.config_dict("tiny", **OVERRIDES))
  result = helpers.run_train(workdir, {**OVERRIDES, **imported["train_overrides"]})
  assert result.returncode == 0, result.stderr[-3000:]
  out = str(tmp_path_factory.mktemp("hf"))
  result = _codex("export", "hf", f"--workdir={workdir}", f"--out={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  return {"foreign": foreign, "workdir": workdir, "imported": imported, "out": out,
          "exported": json.loads(result.stdout)}


@functools.partial(jax.jit, static_argnums=1)
def _forward(params, cfg, ids_BL):
  positions = jnp.broadcast_to(jnp.arange(ids_BL.shape[1]), ids_BL.shape)
  return Decoder(cfg).apply({"params": params}, ids_BL, jnp.ones_like(ids_BL), positions)


def _codex_logits(params, cfg, ids_BL):
  """codex's own full forward (no cache), float32."""
  return np.asarray(_forward(params, cfg, jnp.asarray(ids_BL, jnp.int32)))


def _hf_logits(model, ids_BL):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids_BL), dtype=torch.long)).logits.numpy()


def test_an_import_starts_the_lineage_at_its_content_root_and_codex_train_continues_it(trained):
  workdir, imported = trained["workdir"], trained["imported"]
  log = lineage.read_log(workdir)
  start = log[0]["start"]
  assert start["kind"] == "import" and start["source"] == os.path.abspath(trained["foreign"])
  assert start["files"] == {"model.safetensors": sha256_file(os.path.join(trained["foreign"], "model.safetensors"))}
  assert start["content_root"] == imported["content_root"] == load_step(workdir, 0).record["content_root"]
  assert imported["left_fresh"] == ["feature_in", "modality_embedding"]
  records = [r for r in log if "lineage_hash" in r and "step" in r]
  assert [r["step"] for r in records] == [0, 3]  # Trained on from checkpoint 0, not re-initialised.
  assert records[0]["parent"] == log[0]["hash"] and records[1]["parent"] == records[0]["lineage_hash"]
  assert records[1]["content_root"] != records[0]["content_root"]


def test_export_loads_in_transformers_with_the_same_logits_and_greedy_tokens(trained):
  out, summary = trained["out"], trained["exported"]
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
          "lineage.json"} <= set(os.listdir(out))
  assert summary["step"] == 3 and summary["left_out"] == ["feature_in", "modality_embedding"]
  loaded = load_step(trained["workdir"])
  with open(os.path.join(out, "lineage.json")) as f:
    assert json.load(f)["record"] == loaded.record  # The checkpoint's own lineage record, content root included.
  model = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  rows = [tokenizer(text)["input_ids"] for text in TEXTS]
  length = min(len(r) for r in rows)
  assert length >= 12
  ids_BL = np.asarray([r[:length] for r in rows])
  diff = np.abs(_hf_logits(model, ids_BL) - _codex_logits(loaded.params, loaded.cfg.model, ids_BL)).max()
  print(f"max abs logit difference codex vs transformers: {diff:.2e}")
  assert diff <= 1e-4
  # 20 greedy tokens: codex's KV-cache generation against transformers' argmax, one full forward per token.
  prompt = rows[0][:8]
  ours = sample.generate(loaded.params, loaded.cfg.model, prompt, 20)
  theirs = list(prompt)
  for _ in range(20):
    theirs.append(int(_hf_logits(model, [theirs])[0, -1].argmax()))
  print(f"greedy tokens: {ours}")
  assert ours == theirs[len(prompt):] and len(set(ours)) > 1


def test_import_then_export_reproduces_identical_tensors(trained, tmp_path):
  foreign, again = trained["foreign"], str(tmp_path / "again")
  export_hf(trained["workdir"], again, step=0)  # Checkpoint 0 is the import.
  first, second = (files.read_tensors(files.weight_files(d), "float32") for d in (foreign, again))
  assert sorted(first) == sorted(second)
  for name in first:
    np.testing.assert_array_equal(first[name], second[name], err_msg=name)
  where = "config.json"
  assert llama.model_overrides(files.read_config(foreign), where) == llama.model_overrides(
      files.read_config(again), where)


# --- mapping units (no checkpoint) ------------------------------------------------------------------

def _random_params(**model):
  # No remat and one attention chunk: the cheapest compile of the same math.
  cfg = helpers.load("tiny", **{**helpers.MICRO, "model.remat": "none", "model.attention_chunks": 1, **model}).model
  ids = jnp.zeros((1, 8), jnp.int32)
  init = lambda key: Decoder(cfg).init(key, ids, jnp.ones_like(ids), jnp.broadcast_to(jnp.arange(8), (1, 8)))  # noqa: E731
  shapes = nn.unbox(jax.eval_shape(init, jax.random.PRNGKey(0)))["params"]
  # Random in numpy (compiling the init costs more than the rest of a test). Norm scales are drawn
  # around 1, not at 1, so a swapped or missing norm would show.
  rng = np.random.default_rng(1)
  draw = lambda path, x: (float("scale" in jax.tree_util.keystr(path)) + 0.1 * rng.standard_normal(  # noqa: E731
      x.shape)).astype(np.float32)
  return cfg, jax.tree_util.tree_map_with_path(draw, shapes)


def test_tied_embeddings_gqa_and_an_mtp_subtree_map_to_llama_with_the_same_logits():
  cfg, params = _random_params(**{"model.tie_embeddings": True, "model.num_heads": 8, "model.num_kv_heads": 2,
                                  "model.norm_eps": 1e-6, "model.rope_theta": 500.0})
  with_mtp = {**params, "mtp": {"proj": np.ones((4, 4), np.float32)}}
  tensors = llama.to_hf(with_mtp, cfg)
  assert "lm_head.weight" not in tensors and not [n for n in tensors if "mtp" in n]
  assert llama.left_out(with_mtp) == ["feature_in", "modality_embedding", "mtp"]
  config = transformers.LlamaConfig(**llama.hf_config(cfg, 64, "float32", 0, 1))
  model = transformers.LlamaForCausalLM(config).eval()
  missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
  assert unexpected == [] and set(missing) <= {"lm_head.weight"}  # Tied: lm_head is the embedding.
  ids = np.random.default_rng(0).integers(2, cfg.vocab_size, (2, 16))
  np.testing.assert_allclose(_hf_logits(model, ids), _codex_logits(params, cfg, ids), atol=1e-4)
  back = llama.from_hf(tensors, cfg, scanned=True)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(back), jax.tree.leaves(
      {k: params[k] for k in back}), strict=True):
    np.testing.assert_array_equal(x, np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_cached_decoding_gives_the_logits_of_a_full_forward():
  cfg, params = _random_params()
  ids = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 2, cfg.vocab_size)
  forward = jax.jit(lambda p, t, c: decode.forward(p, cfg, t, c))
  cache = decode.init_cache(cfg, 2, 16)
  parts = []
  for start, end in [(0, 7), (7, 8), (8, 9), (9, 10), (10, 11), (11, 12)]:  # A prefill, then one at a time.
    logits, cache = forward(params, ids[:, start:end], cache)
    parts.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(parts, axis=1), _codex_logits(params, cfg, ids), atol=1e-5)
  assert int(cache["index"]) == 12


def test_sampling_is_seeded_and_a_tiny_top_p_is_greedy():
  cfg, params = _random_params()
  greedy = sample.generate(params, cfg, [5, 6, 7], 8)
  assert sample.generate(params, cfg, [5, 6, 7], 8, temperature=1.0, top_p=1e-6, seed=3) == greedy
  hot = [sample.generate(params, cfg, [5, 6, 7], 8, temperature=2.0, top_p=1.0, seed=s) for s in (0, 0, 1)]
  assert hot[0] == hot[1] and hot[0] != hot[2] and hot[0] != greedy
  assert sample.generate(params, cfg, [5, 6, 7], 8, stop_id=greedy[2]) == greedy[:greedy.index(greedy[2]) + 1]


# --- refusals -----------------------------------------------------------------------------------------

def _edited_copy(out, tmp_path, edit_config=None, tensors=None):
  folder = tmp_path / "model"
  folder.mkdir()
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  if edit_config:
    edit_config(config)
  files.write_json(str(folder / "config.json"), config)
  shutil.copyfile(os.path.join(out, "tokenizer.json"), str(folder / "tokenizer.json"))
  if tensors is not None:
    files.write_tensors(tensors, str(folder), 1 << 30)
  return str(folder)


@pytest.mark.parametrize("case, expected", [
    ("no config", "config.json: missing"),
    ("no weights", "neither model.safetensors nor model.safetensors.index.json"),
    ("mistral", "architectures=['MistralForCausalLM']"),
    ("rope scaling", "rope_scaling={'factor': 2.0, 'type': 'linear'} is not supported"),
    ("shape", "model.layers.1.mlp.down_proj.weight has shape [64, 100], expected [64, 128]"),
    ("unknown tensor", "model.layers.0.self_attn.q_proj.bias is not a tensor"),
])
def test_bad_model_directories_are_refused_naming_what_is_wrong_and_nothing_is_written(trained, tmp_path, case,
                                                                                         expected):
  out = trained["out"]
  tensors = files.read_tensors(files.weight_files(out), "float32")
  if case == "no config":
    folder = str(tmp_path / "empty")
    os.makedirs(folder)
  elif case == "no weights":
    folder = _edited_copy(out, tmp_path)
  elif case == "mistral":
    folder = _edited_copy(out, tmp_path, lambda c: c.update(architectures=["MistralForCausalLM"],
                                                             model_type="mistral"), tensors)
  elif case == "rope scaling":
    folder = _edited_copy(out, tmp_path, lambda c: c.update(rope_scaling={"type": "linear", "factor": 2.0}), tensors)
  elif case == "shape":
    tensors["model.layers.1.mlp.down_proj.weight"] = np.zeros((64, 100), np.float32)
    folder = _edited_copy(out, tmp_path, None, tensors)
  else:
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros((64,), np.float32)
    folder = _edited_copy(out, tmp_path, None, tensors)
  workdir = str(tmp_path / "w")
  with pytest.raises(InteropError, match=expected.replace("[", r"\[").replace("(", r"\(")):
    import_hf(folder, workdir, helpers.config_dict("tiny"))
  assert not os.path.exists(workdir)


def test_export_never_overwrites_and_import_never_reuses_a_run(trained, tmp_path):
  workdir, out = trained["workdir"], trained["out"]
  with pytest.raises(InteropError, match="not an empty directory"):
    export_hf(workdir, out)
  with pytest.raises(InteropError, match="already holds a run"):
    import_hf(out, workdir, helpers.config_dict("tiny"))


def test_large_exports_are_sharded_and_read_back_whole(trained, tmp_path):
  tensors = files.read_tensors(files.weight_files(trained["out"]), "float32")
  written = files.write_tensors(tensors, str(tmp_path), max_shard_bytes=200_000)
  assert files.INDEX in written and len(written) > 3
  back = files.read_tensors(files.weight_files(str(tmp_path)), "float32")
  assert sorted(back) == sorted(tensors)
  for name in tensors:
    np.testing.assert_array_equal(back[name], tensors[name])


def test_an_averaged_export_holds_the_mean_of_the_last_checkpoints(trained, tmp_path):
  averaged = str(tmp_path / "avg")
  summary = export_hf(trained["workdir"], averaged, average=2)  # Checkpoints 0 (the import) and 3.
  with open(os.path.join(averaged, "lineage.json")) as f:
    record = json.load(f)["record"]
  assert summary["average"] == 2 and record["kind"] == "average" and record["steps"] == [0, 3]
  first, last, mean = (files.read_tensors(files.weight_files(d), "float32")
                       for d in (trained["foreign"], trained["out"], averaged))
  for name in mean:
    np.testing.assert_allclose(mean[name], (first[name] + last[name]) / 2, rtol=1e-6, atol=1e-7, err_msg=name)
  assert not np.array_equal(first["model.embed_tokens.weight"], last["model.embed_tokens.weight"])
