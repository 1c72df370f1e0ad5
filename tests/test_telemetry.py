"""Telemetry: analytic vs XLA FLOPs, peak table and probe cache, metrics files, progress, plots, tables."""

import glob
import io
import json
import math
import os
import struct
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from codex_jax.config.schema import ModelConfig
from codex_jax.telemetry import flops, peak
from codex_jax.telemetry.params_table import param_table
from codex_jax.telemetry.plot import plot_metrics
from codex_jax.telemetry.progress import Progress
from codex_jax.telemetry.writer import METRICS_FILE, MetricsWriter

# --- FLOPs -------------------------------------------------------------------------------------------

# V=10 D=4 L=1 H=2 G=1 K=4/2=2 F=6. By hand: embedding 10*4=40; layer: q 4*2*2=16, k+v 2*4*1*2=16,
# o 2*2*4=16, mlp 3*4*6=72, norms 2*4=8 -> 128; final norm 4; unembedding 40. Total 212.
TINY = ModelConfig(vocab_size=10, d_model=4, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=0,
                   mlp_dim=6)


def test_param_counts_by_hand():
  c = flops.param_counts(TINY)
  assert (c["total"], c["embedding"], c["non_embedding"], c["per_layer"]) == (212, 40, 172, 128)
  tied = flops.param_counts(ModelConfig(**{**TINY.__dict__, "tie_embeddings": True}))
  assert (tied["total"], tied["non_embedding"]) == (172, 132)


def test_train_flops_per_token_by_hand():
  # Matmul params: 16+16+16+72 + output projection 40 = 160 -> 6*160 = 960; attention 12*1*2*2*8 = 384.
  assert flops.train_flops_per_token(TINY, seq_len=8) == 960 + 384
  # Tying shares storage, not work: the output projection still costs D*V per token.
  tied = ModelConfig(**{**TINY.__dict__, "tie_embeddings": True})
  assert flops.train_flops_per_token(tied, seq_len=8) == 960 + 384


def test_xla_flops_of_a_matmul():
  m, n, k = 256, 128, 64
  compiled = jax.jit(jnp.matmul).lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
  assert flops.xla_flops(compiled) == pytest.approx(2 * m * n * k, rel=0.01)


def test_xla_flops_is_per_device_for_spmd():
  m, n, k = 256, 128, 64
  mesh = jax.make_mesh((8,), ("data",))
  sharded = NamedSharding(mesh, P("data"))
  fn = jax.jit(jnp.matmul, in_shardings=(sharded, NamedSharding(mesh, P())))
  compiled = fn.lower(jax.ShapeDtypeStruct((m, k), jnp.float32),
                      jax.ShapeDtypeStruct((k, n), jnp.float32)).compile()
  assert flops.num_devices(compiled) == 8
  assert flops.xla_flops(compiled) == pytest.approx(2 * m * n * k / 8, rel=0.01)
  assert flops.xla_flops_global(compiled) == pytest.approx(2 * m * n * k, rel=0.01)


def test_xla_flops_formats():
  class Fake:
    def __init__(self, cost):
      self.cost = cost

    def cost_analysis(self):
      if isinstance(self.cost, Exception):
        raise self.cost
      return self.cost

  assert flops.xla_flops(Fake([{"flops": 12.0}])) == 12.0  # Older jax: one dict per program.
  assert flops.xla_flops(Fake({"flops": 7.0})) == 7.0
  assert flops.xla_flops(Fake(NotImplementedError())) is None
  assert flops.xla_flops(Fake({})) is None
  assert flops.xla_flops(Fake({"flops": -1.0})) is None


def _init(cfg, seed=0):
  """Plain parameters in the model's layout (no flax), to check the analytic formulas against."""
  d, v, f, k = cfg.d_model, cfg.vocab_size, cfg.mlp_dim, cfg.resolved_head_dim
  h, g = cfg.num_heads, cfg.num_kv_heads
  shapes = {"q": (d, h, k), "k": (d, g, k), "v": (d, g, k), "o": (h, k, d), "gate": (d, f), "up": (d, f),
            "down": (f, d)}
  rng = np.random.default_rng(seed)  # numpy: eager jax.random would compile once per shape.
  normal = lambda shape: (0.02 * rng.standard_normal(shape)).astype(np.float32)
  ones = np.ones(d, np.float32)
  layers = [{**{n: normal(s) for n, s in shapes.items()}, "attn_norm": ones, "mlp_norm": ones}
            for _ in range(cfg.num_layers)]
  return {"embed": normal((v, d)), "layers": layers, "final_norm": ones, "unembed": normal((d, v))}


def _loss(params, tokens_BT, cfg):
  rms = lambda x, s: x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-5) * s
  b, t = tokens_BT.shape
  g, r = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
  x_BTD = params["embed"][tokens_BT]
  causal_TS = jnp.tril(jnp.ones((t, t), bool))
  for p in params["layers"]:
    h_BTD = rms(x_BTD, p["attn_norm"])
    q_BTGRK = jnp.einsum("btd,dhk->bthk", h_BTD, p["q"]).reshape(b, t, g, r, -1)
    k_BSGK = jnp.einsum("bsd,dgk->bsgk", h_BTD, p["k"])
    v_BSGK = jnp.einsum("bsd,dgk->bsgk", h_BTD, p["v"])
    s_BGRTS = jnp.einsum("btgrk,bsgk->bgrts", q_BTGRK, k_BSGK) / math.sqrt(q_BTGRK.shape[-1])
    a_BGRTS = jax.nn.softmax(jnp.where(causal_TS, s_BGRTS, -1e9), axis=-1)
    o_BTHK = jnp.einsum("bgrts,bsgk->btgrk", a_BGRTS, v_BSGK).reshape(b, t, cfg.num_heads, -1)
    x_BTD = x_BTD + jnp.einsum("bthk,hkd->btd", o_BTHK, p["o"])
    h_BTD = rms(x_BTD, p["mlp_norm"])
    x_BTD = x_BTD + (jax.nn.silu(h_BTD @ p["gate"]) * (h_BTD @ p["up"])) @ p["down"]
  logits_BTV = rms(x_BTD, params["final_norm"]) @ params["unembed"]
  targets_BT = jnp.roll(tokens_BT, -1, axis=1)
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits_BTV), targets_BT[..., None], -1))


def test_train_flops_match_xla_for_a_two_layer_model():
  # Wide enough that elementwise work (norms, softmax, cross-entropy), which XLA counts and the
  # analytic formula ignores, stays ~2% of the matmuls; long enough that the attention term is ~19%
  # of the total, so a causal-halved formula (XLA counts the full masked T x T) would be 11% off.
  cfg = ModelConfig(vocab_size=512, d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                    mlp_dim=512)
  batch, seq_len = 1, 256
  params = _init(cfg)
  assert sum(x.size for x in jax.tree.leaves(params)) == flops.param_counts(cfg)["total"]
  tokens = jnp.zeros((batch, seq_len), jnp.int32)
  step = jax.jit(jax.value_and_grad(_loss), static_argnums=2)
  counted = flops.xla_flops(step.lower(params, tokens, cfg).compile())
  expected = flops.train_flops_per_token(cfg, seq_len) * batch * seq_len
  assert counted == pytest.approx(expected, rel=0.05)


@pytest.mark.slow  # Compile-heavy: make test, not test-fast.
def test_the_five_objective_step_flops_match_xla():
  """The tiny experiment's multimodal step as XLA counts it (a step that measures the tuner's norms: online
  forward + backward, heads, the EMA target forward, the measurement's forward and five backward passes)."""
  from codex_jax.parallel.mesh import build_mesh
  from codex_jax.train.bench import synthetic_batch
  from codex_jax.train.setup import xla_model_flops
  from tests.helpers import load
  cfg = load("tiny", num_devices=1, **{"objectives.weights": (1.0, 1.0, 1.0, 1.0, 1.0)})
  mesh = build_mesh(cfg.mesh, jax.devices()[:1])
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in synthetic_batch(cfg, cfg.train.global_batch).items()}
  counted = xla_model_flops(cfg, mesh, batch)
  cost = flops.step_flops(cfg, cfg.train.global_batch)
  assert counted == pytest.approx(cost.measuring, rel=0.10), (counted, cost)
  # The text-only count misses most of it (the 2.8x); the mean step amortises the measurement.
  assert cost.online < 0.5 * counted and cost.online < cost.mean < cost.measuring
  assert cost.mean == pytest.approx(cost.measuring - cost.measure * (1 - 1 / cfg.objectives.balance.measure_every))


# --- Peak FLOP/s -------------------------------------------------------------------------------------


def test_peak_probe_is_measured_once_and_cached(monkeypatch, tmp_path):
  monkeypatch.setenv("CODEX_CACHE_DIR", str(tmp_path))
  first = peak.peak_flops("float32")
  path = tmp_path / "peak_flops.json"
  assert first.source == f"probe:{path}"
  assert 1e8 < first.total < 1e14  # Any CPU between a phone and a large server.
  # Fake CPU devices share the host's cores: the host peak is split between them, not multiplied.
  assert first.per_device * jax.device_count() == pytest.approx(first.total)
  (key,) = json.loads(path.read_text())
  assert f"cpus={os.cpu_count()}" in key and jax.__version__ in key and key.endswith("float32")
  mtime = path.stat().st_mtime_ns

  def must_not_measure(dtype):
    raise AssertionError("peak re-measured instead of read from the cache")

  monkeypatch.setattr(peak, "_measure", must_not_measure)
  assert peak.peak_flops("float32") == first
  assert path.stat().st_mtime_ns == mtime
  assert not list(tmp_path.glob(".peak_flops.*"))  # No temporary left behind.


def test_a_stale_peak_probe_is_replaced_and_an_mfu_above_one_is_refused(monkeypatch, tmp_path):
  """`codex bench`'s peak: a cached probe 30% under a fresh one (measured while the machine was busy) is
  replaced; one that agrees, or a fresh one read while busy, leaves it; an MFU above 1 even against a fresh
  probe is never reported."""
  monkeypatch.setenv("CODEX_CACHE_DIR", str(tmp_path))
  monkeypatch.setattr(peak, "_measure", lambda dtype: 40e9)  # The busy machine's probe, cached.
  busy = peak.peak_flops("float32")
  assert busy.total == pytest.approx(40e9) and busy.measured_at is not None
  monkeypatch.setattr(peak, "_measure", lambda dtype: 140e9)  # Quiet now.
  checked, value, note = peak.checked_peak("float32", 70e9)  # 1.75 against the stale peak.
  assert checked.total == pytest.approx(140e9) and value == pytest.approx(0.5)
  assert "replaced by a fresh probe" in note and "250% apart" in note
  assert peak.peak_flops("float32").total == pytest.approx(140e9)  # The cache holds the fresh one.
  monkeypatch.setattr(peak, "_measure", lambda dtype: 120e9)  # Within 30%: the cached probe stands.
  kept, value, note = peak.checked_peak("float32", 70e9)
  assert kept == checked and value == pytest.approx(0.5) and note == ""
  monkeypatch.setattr(peak, "_measure", lambda dtype: 50e9)  # Busy now: the higher, cached peak stands.
  kept, value, note = peak.checked_peak("float32", 70e9)
  assert kept == checked and value == pytest.approx(0.5) and "the machine is busy" in note
  _, value, note = peak.checked_peak("float32", 200e9)  # Above even a fresh probe.
  assert value is None and "above 1" in note and "refused" in note
  monkeypatch.setattr(peak, "_device_kind", lambda: "NVIDIA H100 80GB HBM3")  # A table peak is not probed.
  monkeypatch.setattr(peak, "_measure", lambda dtype: pytest.fail("table kinds are never probed"))
  table, value, note = peak.checked_peak("bfloat16", 1e14)
  assert table.measured_at is None and value == pytest.approx(1e14 / table.total) and note == ""


@pytest.mark.parametrize("kind,dtype,expected", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4e12),
    ("NVIDIA H100 80GB HBM3", "float32", 494.7e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA H200", "bfloat16", 989.4e12),
    ("NVIDIA A100-SXM4-40GB", "bfloat16", 312e12),
    ("NVIDIA B200", "bfloat16", 2250e12),
    ("TPU v4", "bfloat16", 275e12),
    ("TPU v5 lite", "bfloat16", 197e12),
    ("TPU v5", "bfloat16", 459e12),
    ("TPU v6 lite", "float32", 918e12),
])
def test_peak_table_matches_device_kind(monkeypatch, kind, dtype, expected):
  monkeypatch.setattr(peak, "_device_kind", lambda: kind)
  monkeypatch.setattr(peak, "_measure", lambda dtype: pytest.fail("table kinds are never probed"))
  got = peak.peak_flops(dtype)
  assert got.per_device == expected
  assert got.total == expected * jax.device_count()
  assert got.source == f"table:{kind}"


def test_mfu_and_dtype_check():
  assert peak.mfu(25e12, peak.PeakFlops(10e12, 100e12, "table:x")) == pytest.approx(0.25)
  assert peak.mfu(5.0, 10.0) == 0.5
  assert peak.table_peak("unknown accelerator") is None
  with pytest.raises(ValueError, match="int8"):
    peak.peak_flops("int8")


# --- Metrics files -----------------------------------------------------------------------------------


def _events(workdir):
  """(step, tag, value) scalars and purge steps read from raw TFRecord event files, CRCs checked."""
  from tensorboardX.proto.event_pb2 import Event
  from tensorboardX.record_writer import masked_crc32c

  scalars, purges = [], []
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
      header = data[pos:pos + 8]
      (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack("<I", data[pos + 8:pos + 12])
      body = data[pos + 12:pos + 12 + length]
      (body_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
      assert header_crc == masked_crc32c(header) and body_crc == masked_crc32c(body)
      pos += 16 + length
      event = Event.FromString(body)
      if event.HasField("session_log"):
        purges.append(event.step)
      scalars += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
  return scalars, purges


def _jsonl(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, METRICS_FILE))]


def test_writer_jsonl_and_events(tmp_path):
  with MetricsWriter(str(tmp_path)) as w:
    w.write(1, {"loss": np.float32(2.5), "lr": jnp.asarray(1e-3), "tokens": 4096})
    w.write(2, {"loss": float("nan"), "grad_norm": np.inf})
  assert _jsonl(tmp_path) == [
      {"step": 1, "loss": 2.5, "lr": pytest.approx(1e-3), "tokens": 4096.0},
      {"step": 2, "loss": None, "grad_norm": None},
  ]
  scalars, _ = _events(tmp_path)
  assert (1, "loss", 2.5) in scalars and (1, "tokens", 4096.0) in scalars
  assert any(s == 2 and tag == "loss" and math.isnan(v) for s, tag, v in scalars)


def test_writer_rejects_arrays_and_disabled_is_silent(tmp_path):
  with MetricsWriter(str(tmp_path / "on")) as w, pytest.raises(ValueError, match="not a scalar"):
    w.write(1, {"loss": np.ones(3)})
  with MetricsWriter(str(tmp_path / "off"), enabled=False) as w:
    w.write(1, {"loss": 1.0})
    w.flush()
  assert not (tmp_path / "off").exists()


def test_writer_resume_drops_rolled_back_steps(tmp_path):
  with MetricsWriter(str(tmp_path)) as w:
    for step in range(1, 6):
      w.write(step, {"loss": 10.0 - step})
  with open(tmp_path / METRICS_FILE, "a") as f:
    f.write('{"step": 6, "lo')  # Killed mid-write.
  with MetricsWriter(str(tmp_path), resume_step=3) as w:
    assert [r["step"] for r in _jsonl(tmp_path)] == [1, 2, 3]
    w.write(4, {"loss": 0.5})
  assert [(r["step"], r["loss"]) for r in _jsonl(tmp_path)] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 0.5)]
  # TensorBoard hides the old run's steps >= 4 when it reads the resumed file's purge marker.
  _, purges = _events(tmp_path)
  assert purges == [4]


# --- Progress, plot, parameter table -----------------------------------------------------------------


def test_progress_to_a_pipe():
  out = io.StringIO()  # Not a TTY, like stderr piped to a log.
  with Progress(total_steps=10, initial_step=4, tokens_per_step=1024, file=out) as bar:
    for step in range(5, 11):
      bar.update(step, loss=2.0, extra={"lr": 3e-4})
  text = out.getvalue()
  assert "10/10" in text and "loss=2.0000" in text and "tok/s=" in text and "lr=" in text
  silent = io.StringIO()
  with Progress(total_steps=10, enabled=False, file=silent) as bar:
    bar.update(3, loss=1.0)
  assert silent.getvalue() == ""


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_on_a_terminal_log_lines_go_above_the_bar_and_the_handler_is_restored():
  from absl import flags, logging
  logging.use_absl_handler()  # As the CLI does once its flags are parsed (cli/log_filter.py).
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  handler = logging.get_absl_handler().python_handler
  term = _Terminal()
  handler.setStream(term)  # Where the log lines land here, beside the bar (stderr in a run).
  try:
    with Progress(total_steps=10, file=term) as bar:
      bar.update(3, loss=2.0)
      logging.warning("a log line while the bar is shown")
      assert "emit" in vars(handler)
      bar.update(4, loss=1.5)
  finally:
    handler.setStream(sys.stderr)
  text = term.getvalue()
  line = text.index("a log line while the bar is shown")
  assert "\r" in text[text.rindex("step/s]", 0, line):line]  # The bar was cleared before the line ...
  assert "3/10" in text[line:]  # ... and drawn again under the line.
  assert "emit" not in vars(handler)  # The handler's own emit again.


def test_plot_writes_png(tmp_path):
  lines = [{"step": s, "loss": 5.0 / s, "learning_rate": 1e-3 * min(1, s / 5)} for s in range(1, 40)]
  lines[3]["loss"] = None  # A NaN loss written as null.
  lines[9]["eval_loss"] = 1.0
  lines[29]["eval_loss"] = 0.3
  jsonl = tmp_path / "metrics.jsonl"
  jsonl.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 40, "lo')  # No grad_norm.
  out = plot_metrics(str(jsonl), str(tmp_path / "plots" / "metrics.png"))
  data = open(out, "rb").read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
  assert sorted(os.listdir(tmp_path / "plots")) == ["metrics.png"]


def test_the_loss_plot_gives_each_objective_its_own_panel_and_the_weighted_total_apart():
  from codex_jax.telemetry.plot import panels
  text_only = [{"step": 1, "loss": 6.0, "ce_loss": 5.9, "learning_rate": 1e-3, "grad_norm": 1.0}]
  assert [title for title, _ in panels(text_only)] == ["text cross-entropy", "learning rate", "grad norm"]
  five = [{"step": 1, "loss": 15.8, "ce_loss": 8.3, **{f"loss_{n}": 1.0 for n in ("text", "vision", "align", "world",
                                                                                  "action")}}]
  chosen = dict(panels(five))
  assert list(chosen) == ["text cross-entropy", "vision loss", "align loss", "world loss", "action loss",
                          "weighted total loss", "learning rate", "grad norm"]
  assert chosen["weighted total loss"] == (("loss",),) and ("loss",) not in chosen["text cross-entropy"][1:]


def test_param_table_total():
  params = {"params": {"embed": jnp.zeros((100, 16), jnp.bfloat16),
                       "layers": [{"q": jax.ShapeDtypeStruct((16, 4, 4), jnp.float32)}],
                       "norm": np.ones(16, np.float32),
                       # Flax's logical-axis box: the row is named after the parameter, not `value`.
                       "boxed": nn.LogicallyPartitioned(jnp.zeros((2, 3)), ("embed", "mlp"))}}
  table = param_table(params)
  lines = table.splitlines()
  assert len(lines) == 3 + 4 + 1  # Header, two rules, four leaves, total.
  assert lines[2].split() == ["params/boxed", "(2,", "3)", "float32", "6"]
  assert lines[3].split() == ["params/embed", "(100,", "16)", "bfloat16", "1,600"]
  assert "params/layers/0/q" in table
  assert lines[-1].split()[-2:] == ["1,878", "(1.88K)"]
  assert "4.21 KiB" in lines[-1]  # 1600 * 2 + 278 * 4 bytes.


def test_objective_heads_are_counted_apart_and_codex_config_lists_them():
  import json
  import subprocess
  import sys

  from codex_jax.model.heads import HEADS
  from codex_jax.model.transformer import Decoder
  from tests.helpers import MICRO, ROOT, load

  assert flops.head_counts(TINY) == {} and flops.param_counts(TINY)["heads"] == 0  # Text only: no heads.
  every = {"objectives.weights": (1.0, 1.0, 1.0, 1.0, 1.0)}  # tests/helpers.py turns them off by default.
  cfg = load("tiny", num_devices=1, **MICRO, **every).model
  assert set(cfg.objectives) == {"vision", "align", "world", "action"}
  t = jnp.zeros((1, 8), jnp.int32)
  method = lambda m, *a: m.init_outputs(*a)  # noqa: E731
  params = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.PRNGKey(0), t, t + 1, t, method=method))["params"]
  size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
  counts = flops.head_counts(cfg)
  assert counts == {name: size({k: v for k, v in params[HEADS].items() if k in keys}) for name, keys in {
      "vision": ("mask_embedding", "pixel_head", "vision_proj"),
      "align": ("align_media", "align_text", "align_logit_bias"),
      "world": ("action_in", "null_action_embedding", "world_predictor"),
      "action": ("flow_head",)}.items()}
  c = flops.param_counts(cfg)
  assert c["heads"] == size(params[HEADS]) and size(params) == c["total"] + c["heads"] + c["mtp"]
  out = subprocess.run([sys.executable, "-m", "codex_jax", "config", "--config=experiments/codex.py:tiny",
                        "--devices=1", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  shown = json.loads(out.stdout)["params"]
  tiny = load("tiny", num_devices=1, **every).model  # The experiment's own tiny trains every objective.
  assert shown["heads (training only)"] == {**flops.head_counts(tiny), "total": flops.param_counts(tiny)["heads"]}
  assert "heads" not in shown and shown["total"] == flops.param_counts(tiny)["total"]


def test_written_files_honour_the_umask(tmp_path):
  from matplotlib.figure import Figure

  from codex_jax import atomic
  from codex_jax.telemetry.plot import save_png
  old = os.umask(0o022)
  try:
    assert oct(os.stat(atomic.write_text(str(tmp_path / "a.json"), "{}")).st_mode & 0o777) == oct(0o644)
    assert oct(os.stat(save_png(Figure(), str(tmp_path / "p.png"))).st_mode & 0o777) == oct(0o644)
    os.umask(0o077)  # A private umask stays private.
    assert oct(os.stat(atomic.write_text(str(tmp_path / "b.json"), "{}")).st_mode & 0o777) == oct(0o600)
  finally:
    os.umask(old)
  assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_the_end_of_run_summary_reads_as_a_table_and_says_how_to_resume_or_extend():
  from codex_jax.train.report import summary_text
  summary = {"start_step": 0, "final_step": 120, "preempted": True, "first_text_ce": 8.3512, "last_text_ce": 4.6021,
             "eval_loss": 4.9137, "tokens_per_s": 5535.2, "mfu": 0.294, "checkpoints": [100, 120],
             "workdir": "/runs/default", "wall_s": 100.0, "goodput": 0.62,
             "time_s": {"step": 62.0, "data": 1.0, "checkpoint": 3.0, "eval": 20.0, "compile": 10.0, "other": 4.0}}
  lines = summary_text(summary).splitlines()
  assert lines[0].split() == ["steps", "0", "->", "120", "(stopped;", "the", "same", "command", "resumes", "from",
                              "step", "120)"]
  assert "text cross-entropy  8.3512 -> 4.6021" in lines[1] and lines[2].endswith("4.9137")
  assert "5,535 tokens/s, MFU 29.4%" in lines[3]
  assert lines[4].split()[1:5] == ["62.0%", "of", "100", "s:"] and "eval 20.0 s" in lines[4]
  assert lines[5].endswith("100, 120")
  gap = [line.index("  ") for line in lines]
  assert len({g + len(line[g:]) - len(line[g:].lstrip()) for g, line in zip(gap, lines, strict=True)}) == 1  # One value column.
  assert "n/a" in summary_text({**summary, "eval_loss": None}).splitlines()[2]
  finished = summary_text({"finished": True, "workdir": "/runs/default", "final_step": 300})
  assert "finished at step 300" in finished and "--config.train.steps" in finished
