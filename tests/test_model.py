"""The decoder: shapes, exact parameter count, causality, packed-segment isolation, scan/remat equivalence."""

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codex_jax.config.schema import ModelConfig
from codex_jax.model.transformer import Decoder, block_params, with_last_block_zeroed
from codex_jax.objectives.text import next_token_loss
from codex_jax.telemetry.flops import param_counts

CFG = ModelConfig(vocab_size=128, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
L = 16


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init(cfg, seed=0):
  tokens = jnp.zeros((1, L), jnp.int32)
  return nn.meta.unbox(Decoder(cfg).init(jax.random.PRNGKey(seed), tokens, tokens + 1, tokens))["params"]


@functools.partial(jax.jit, static_argnums=0)
def _apply(cfg, params, tokens, segment_ids, positions):
  return Decoder(cfg).apply({"params": params}, tokens, segment_ids, positions)


def _logits(cfg, params, tokens, segment_ids=None, positions=None):
  tokens = jnp.asarray(tokens)
  segment_ids = jnp.ones_like(tokens) if segment_ids is None else jnp.asarray(segment_ids)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape) if positions is None else positions
  return _apply(cfg, params, tokens, segment_ids, jnp.asarray(positions))


@pytest.fixture(scope="module")
def params():
  return _init(CFG)


def test_shapes(params):
  K = CFG.resolved_head_dim
  assert params["embedding"].shape == (128, 32)
  assert params["unembed"].shape == (32, 128)
  assert params["layers"]["attention"]["q"].shape == (2, 32, 4, K)
  assert params["layers"]["attention"]["k"].shape == (2, 32, 2, K)
  assert params["layers"]["mlp"]["gate_up"].shape == (2, 32, 2, 64)
  assert params["layers"]["mlp"]["down"].shape == (2, 64, 32)
  logits = _logits(CFG, params, np.ones((3, L), np.int32))
  assert logits.shape == (3, L, 128) and logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)


@pytest.mark.parametrize("tie", [False, True])
def test_parameter_count_matches_the_analytic_formula(tie):
  cfg = dataclasses.replace(CFG, tie_embeddings=tie)
  counted = sum(x.size for x in jax.tree.leaves(_init(cfg)))
  assert counted == param_counts(cfg)["total"]


def test_a_position_never_sees_the_future(params):
  tokens = np.random.default_rng(0).integers(2, 128, (1, L)).astype(np.int32)
  base = _logits(CFG, params, tokens)
  for j in (3, 9, L - 1):
    changed = tokens.copy()
    changed[0, j] = (changed[0, j] + 7) % 128
    out = _logits(CFG, params, changed)
    np.testing.assert_array_equal(np.asarray(out[0, :j]), np.asarray(base[0, :j]))
    assert not np.allclose(out[0, j], base[0, j])  # The test can see a change where there is one.


def test_packed_segments_do_not_see_each_other(params):
  rng = np.random.default_rng(1)
  first, second = rng.integers(2, 128, 6), rng.integers(2, 128, 10)
  packed = np.concatenate([first, second])[None].astype(np.int32)
  segment_ids = np.array([[1] * 6 + [2] * 10])
  positions = np.array([list(range(6)) + list(range(10))])
  out = _logits(CFG, params, packed, segment_ids, positions)
  alone = _logits(CFG, params, second[None].astype(np.int32))
  np.testing.assert_allclose(np.asarray(out[0, 6:]), np.asarray(alone[0]), atol=1e-5)
  # Changing the first document leaves the second's logits exactly as they were.
  other = packed.copy()
  other[0, :6] = (other[0, :6] + 5) % 128
  np.testing.assert_array_equal(np.asarray(_logits(CFG, params, other, segment_ids, positions)[0, 6:]),
                                np.asarray(out[0, 6:]))


def _unrolled(params):
  """The scanned `params` as the unrolled stack's (`layers_i`)."""
  blocks = block_params(params, CFG.num_layers)
  return {**{k: v for k, v in params.items() if k != "layers"}, **{f"layers_{i}": b for i, b in enumerate(blocks)}}


def test_unscanned_layers_compute_the_same_function(params):
  cfg = dataclasses.replace(CFG, scan_layers=False)
  unrolled = _unrolled(params)
  tokens = np.random.default_rng(2).integers(0, 128, (2, L)).astype(np.int32)
  np.testing.assert_allclose(np.asarray(_logits(cfg, unrolled, tokens)), np.asarray(_logits(CFG, params, tokens)),
                             atol=1e-5)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_a_zeroed_last_block_passes_its_input_through(params, scan_layers):
  """The tuner's way to the last block's input (transformer.with_last_block_zeroed): the stack with the last
  block zeroed computes exactly what the stack without it does, scanned or unrolled."""
  cfg = dataclasses.replace(CFG, scan_layers=scan_layers)
  layered = params if scan_layers else _unrolled(params)
  shorter = dataclasses.replace(cfg, num_layers=CFG.num_layers - 1)
  fewer = {k: v for k, v in layered.items() if k not in ("layers", f"layers_{CFG.num_layers - 1}")}
  if scan_layers:
    fewer["layers"] = jax.tree.map(lambda x: x[:-1], params["layers"])
  tokens = np.random.default_rng(3).integers(0, 128, (2, L)).astype(np.int32)
  ones, positions = np.ones_like(tokens), np.broadcast_to(np.arange(L), tokens.shape)
  trunk = lambda c, p: Decoder(c).apply({"params": p}, tokens, ones, positions, method=Decoder.trunk)  # noqa: E731
  np.testing.assert_array_equal(np.asarray(trunk(cfg, with_last_block_zeroed(layered, CFG.num_layers))),
                                np.asarray(trunk(shorter, fewer)))


def _loss_and_grads(cfg, params, tokens):
  def loss(p):
    logits = _logits(cfg, p, tokens[:, :-1])
    return next_token_loss(logits, tokens[:, 1:], jnp.ones(tokens[:, 1:].shape), 1e-4)[0]
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_policies_give_the_same_loss_and_gradients(params, policy):
  tokens = np.random.default_rng(3).integers(0, 128, (2, L + 1)).astype(np.int32)
  ref_loss, ref_grads = _loss_and_grads(CFG, params, tokens)
  loss, grads = _loss_and_grads(dataclasses.replace(CFG, remat=policy), params, tokens)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  chex.assert_trees_all_close(grads, ref_grads, atol=1e-6, rtol=1e-5)


def test_bf16_compute_keeps_f32_params_and_logits(params):
  cfg = dataclasses.replace(CFG, compute_dtype="bfloat16")
  tokens = np.random.default_rng(4).integers(0, 128, (2, L)).astype(np.int32)
  out = _logits(cfg, params, tokens)
  assert out.dtype == jnp.float32 and all(x.dtype == jnp.float32 for x in jax.tree.leaves(_init(cfg)))
  np.testing.assert_allclose(np.asarray(out), np.asarray(_logits(CFG, params, tokens)), atol=0.05)


def test_tied_embeddings_use_the_embedding_as_output_projection():
  cfg = dataclasses.replace(CFG, tie_embeddings=True)
  params = _init(cfg)
  assert "unembed" not in params
  tokens = np.ones((1, L), np.int32)
  scaled = dict(params, embedding=params["embedding"] * 2.0)
  assert not np.allclose(_logits(cfg, params, tokens), _logits(cfg, scaled, tokens))


def test_loss_ignores_padding():
  logits = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 8))
  targets = jnp.array([[1, 2, 3, 0]])
  loss_all, _ = next_token_loss(logits, targets, jnp.array([[1, 1, 1, 0.]]), 0.0)
  garbage = logits.at[0, 3].set(100.0)
  loss_garbage, aux = next_token_loss(garbage, targets.at[0, 3].set(5), jnp.array([[1, 1, 1, 0.]]), 0.0)
  np.testing.assert_allclose(loss_all, loss_garbage)
  assert float(aux["tokens"]) == 3.0


@pytest.mark.parametrize("chunks", [2, 4])
def test_chunked_attention_computes_the_same_function(params, chunks):
  rng = np.random.default_rng(5)
  tokens = rng.integers(2, 128, (2, L)).astype(np.int32)
  segment_ids = np.array([[1] * 5 + [2] * 7 + [3] * 4, [1] * 16])  # Segments straddle chunk edges.
  positions = np.array([list(range(5)) + list(range(7)) + list(range(4)), list(range(16))])
  cfg = dataclasses.replace(CFG, attention_chunks=chunks)
  np.testing.assert_allclose(np.asarray(_logits(cfg, params, tokens, segment_ids, positions)),
                             np.asarray(_logits(CFG, params, tokens, segment_ids, positions)), atol=1e-5)


def test_non_text_positions_are_embedded_from_their_features():
  cfg = dataclasses.replace(CFG, feature_dim=12)
  params = _init(cfg)
  assert params["feature_in"].shape == (12, 32) and params["modality_embedding"].shape == (7, 32)
  assert sum(x.size for x in jax.tree.leaves(params)) == param_counts(cfg)["total"]
  tokens = np.full((1, L), 5, np.int32)
  modality = np.where(np.arange(L) < 4, 2, 1)[None].astype(np.int32)  # 4 image positions, then text.
  rng = np.random.default_rng(0)
  features = rng.normal(size=(1, L, 12)).astype(np.float32) * (modality == 2)[..., None]
  run = lambda f, m: Decoder(cfg).apply({"params": params}, tokens, np.ones_like(tokens),
                                        np.arange(L)[None], f, m)
  base = run(features, modality)
  other = features.copy()
  other[0, 1] += 1.0  # Change one image position's values.
  changed = run(other, modality)
  np.testing.assert_array_equal(base[0, :1], changed[0, :1])  # Causal: earlier positions unaffected.
  assert np.abs(base[0, 1:] - changed[0, 1:]).max() > 1e-4
  text_only = run(None, None)  # Without features the model reads token embeddings everywhere.
  np.testing.assert_allclose(run(np.zeros_like(features), np.ones_like(modality)), text_only, atol=1e-6)
  assert np.abs(base - text_only).max() > 1e-4
