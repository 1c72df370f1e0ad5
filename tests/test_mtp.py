"""Multi-token prediction: the loss against a direct computation, packed-segment masking, the lambda
schedule, MTP params absent from what export and generation use, bad config values refused."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codex_jax.config.errors import ConfigError
from codex_jax.config.schema import ModelConfig, TrainConfig
from codex_jax.model.layers import RMSNorm
from codex_jax.model.transformer import Block, Decoder, inference_params
from codex_jax.objectives.mtp import depth_mask
from codex_jax.runtime import forward
from codex_jax.telemetry.flops import param_counts
from codex_jax.train import step as step_lib
from tests.helpers import MICRO, load

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=64, mtp_depth=2)
Z_LOSS, WEIGHT = 1e-4, 0.3


def _packed_row(lengths, length):
  """inputs/targets/loss_mask/segment_ids/positions of one row packing documents of `lengths` tokens,
  as data/encode.py + packing.py make them: the last token of a document has no target."""
  rng = np.random.default_rng(sum(lengths))
  inputs, targets, mask, segs, pos = [], [], [], [], []
  for i, n in enumerate(lengths, start=1):
    doc = rng.integers(1, CFG.vocab_size, n + 1)
    inputs += list(doc[:n])
    targets += list(doc[1:n + 1])
    segs += [i] * n
    pos += list(range(n))
    mask += [1.0] * (n - 1) + [0.0]
  pad = length - len(inputs)
  return {"inputs": np.array(inputs + [0] * pad, np.int32), "targets": np.array(targets + [0] * pad, np.int32),
          "loss_mask": np.array(mask + [0.0] * pad, np.float32), "segment_ids": np.array(segs + [0] * pad, np.int32),
          "positions": np.array(pos + [0] * pad, np.int32)}


def _batch(rows):
  return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def _outputs(batch):
  """Params (from a fixed seed), the loss and metrics, the batch's sums, each depth's logits rebuilt by hand
  from its params (norms, concat with the embedding of token t+k, projection, block, shared head), and
  the main logits of train_outputs and of the plain model on inference_params."""
  model = Decoder(CFG)
  t = jnp.zeros((1, 16), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), t, t + 1, t, method=Decoder.train_outputs))["params"]
  norm = lambda p, x: RMSNorm(CFG).apply({"params": p}, x)
  args = (batch["inputs"], batch["segment_ids"], batch["positions"])
  h = model.apply({"params": params}, *args, method=Decoder.trunk)
  by_hand = []
  for k in (1, 2):
    p = params["mtp"][f"depths_{k - 1}"]
    ahead = jnp.zeros_like(batch["inputs"]).at[:, :-k].set(batch["inputs"][:, k:])
    e = params["embedding"][ahead]
    x = norm(p["hidden_norm"], h) @ p["proj"][0] + norm(p["embed_norm"], e) @ p["proj"][1]
    h = Block(CFG).apply({"params": p["block"]}, x, batch["segment_ids"], batch["positions"])[0]
    by_hand.append(norm(p["output_norm"], h) @ params["unembed"])
  return {"params": params, "loss_aux": step_lib.loss_fn(params, batch, model=model, z_loss=Z_LOSS, mtp_weight=WEIGHT),
          "sums": forward.batch_sums(params, batch, model=model), "by_hand": by_hand,
          "train_logits": model.apply({"params": params}, *args, method=Decoder.train_outputs)[0],
          "plain_logits": model.apply({"params": inference_params(params)}, *args),
          "mask_2": depth_mask(batch["loss_mask"], batch["segment_ids"], 2)}


@pytest.fixture(scope="module")
def run():
  """_outputs jitted once: every test here feeds it [2, 16] batches, so this file compiles one program."""
  jitted = jax.jit(_outputs)
  return lambda rows: jax.device_get(jitted(_batch(rows)))


@pytest.fixture(scope="module")
def outputs(run):
  rows = [_packed_row([7, 5, 2], 16), _packed_row([16], 16)]
  return _batch(rows), run(rows)


def test_mtp_loss_matches_a_direct_computation(outputs):
  """CE and acceptance of each depth counted position by position in numpy from logits rebuilt by hand."""
  batch, out = outputs
  loss, aux = out["loss_aux"]
  logits, mtp_logits = out["plain_logits"], out["by_hand"]
  tokens = np.asarray(batch["inputs"])
  main_top = np.argmax(np.asarray(logits), -1)
  seg, lm, tg = (np.asarray(batch[k]) for k in ("segment_ids", "loss_mask", "targets"))
  ces, accepts = [], []
  for k in (1, 2):
    logits_k = np.asarray(mtp_logits[k - 1], np.float64)
    logp = logits_k - np.log(np.sum(np.exp(logits_k), -1, keepdims=True))
    ce, hits, n = 0.0, 0, 0
    for b in range(tokens.shape[0]):
      for t in range(tokens.shape[1] - k):
        if seg[b, t] and seg[b, t + k] == seg[b, t] and lm[b, t + k]:  # Token t+k+1 is in t's document.
          ce -= logp[b, t, tg[b, t + k]]
          hits += int(np.argmax(logits_k[b, t]) == main_top[b, t + k])
          n += 1
    ces.append(ce / n)
    accepts.append(hits / n)
  np.testing.assert_allclose(float(aux["mtp_loss_1"]), ces[0], rtol=1e-5)
  np.testing.assert_allclose(float(aux["mtp_loss_2"]), ces[1], rtol=1e-5)
  np.testing.assert_allclose(float(aux["mtp_loss"]), np.mean(ces), rtol=1e-5)
  main_loss = float(aux["ce_loss"]) + Z_LOSS * float(aux["z_loss"])
  np.testing.assert_allclose(float(loss), main_loss + WEIGHT / 2 * sum(ces), rtol=1e-6)
  assert float(aux["mtp_acceptance"]) == pytest.approx(accepts[0])
  assert float(aux["mtp_acceptance_2"]) == pytest.approx(accepts[1])
  # The next-token part is the plain model's: MTP leaves it alone.
  main = np.asarray(logits, np.float64)
  main_logp = main - np.log(np.sum(np.exp(main), -1, keepdims=True))
  main_ce = -np.take_along_axis(main_logp, tg[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(aux["ce_loss"]), np.sum(main_ce * lm) / np.sum(lm), rtol=1e-5)


def test_mtp_never_predicts_across_a_packed_segment_boundary(run):
  """Documents packed in one row give the same MTP sums as each alone in its own row."""
  docs = [7, 5, 3]
  rows = [_packed_row([n], 16) for n in docs]  # Each document alone in its row.
  row = {k: np.concatenate([r[k][:n] for r, n in zip(rows, docs, strict=True)] + [np.zeros(16 - sum(docs), v.dtype)])
         for k, v in rows[0].items()}
  row["segment_ids"] = np.repeat(np.arange(len(docs) + 1, dtype=np.int32), [*docs, 16 - sum(docs)]) + 1
  row["segment_ids"][sum(docs):] = 0  # Padding.
  pad = {k: np.zeros_like(v) for k, v in row.items()}  # A row of padding adds nothing.
  packed_out = run([row, pad])
  packed = packed_out["sums"]
  alone = [run(rows[:2])["sums"], run([rows[2], pad])["sums"]]
  for k in (1, 2):
    assert float(packed[f"mtp_tokens_{k}"]) == sum(max(n - 1 - k, 0) for n in docs)
    for key in (f"mtp_ce_sum_{k}", f"mtp_tokens_{k}", f"mtp_accept_{k}"):
      np.testing.assert_allclose(float(packed[key]), sum(float(s[key]) for s in alone), rtol=1e-5)
  # The mask itself: depth k at t needs the tokens t..t+k+1 in one document.
  np.testing.assert_array_equal(packed_out["mask_2"][0], [1, 1, 1, 1, 0, 0, 0,  1, 1, 0, 0, 0,  0, 0, 0,  0])


def test_mtp_params_are_absent_from_inference_params_and_not_needed_by_the_model(outputs):
  _, out = outputs
  params = out["params"]
  assert "mtp" in params and param_counts(CFG)["mtp"] == sum(x.size for x in jax.tree.leaves(params["mtp"]))
  plain = inference_params(params)
  assert "mtp" not in plain and set(plain) == set(params) - {"mtp"}
  # What generation runs (__call__) needs nothing of MTP: the plain model's own init has the same keys.
  t = jnp.zeros((1, 16), jnp.int32)
  no_mtp = jax.eval_shape(lambda: Decoder(CFG).init(jax.random.PRNGKey(0), t, t + 1, t))["params"]
  assert jax.tree.structure(nn.meta.unbox(no_mtp)) == jax.tree.structure(plain)
  np.testing.assert_allclose(out["plain_logits"], out["train_logits"], rtol=1e-6)


def test_mtp_weight_follows_its_schedule():
  train = TrainConfig(steps=100, mtp_weight=0.3, mtp_weight_final=0.1, mtp_weight_switch=0.7)
  got = [float(step_lib.mtp_weight(train, jnp.int32(s))) for s in (0, 69, 70, 99)]
  np.testing.assert_allclose(got, [0.3, 0.3, 0.1, 0.1], rtol=1e-7)


@pytest.mark.parametrize("overrides,message", [
    ({"model.mtp_depth": -1}, r"config.model.mtp_depth=-1: must not be negative"),
    ({"model.mtp_depth": 31}, r"config.model.mtp_depth=31: must be below data.seq_len - 1 = 31"),
    ({"train.mtp_weight": -0.1}, r"config.train.mtp_weight=-0.1: must not be negative"),
    ({"train.mtp_weight_final": -1.0}, r"config.train.mtp_weight_final=-1.0: must not be negative"),
    ({"train.mtp_weight_switch": 1.5}, r"config.train.mtp_weight_switch=1.5: must be in \[0, 1\]"),
])
def test_bad_mtp_values_are_refused_naming_the_key(overrides, message):
  with pytest.raises(ConfigError, match=message):
    load("tiny", num_devices=1, **{**MICRO, **overrides})
