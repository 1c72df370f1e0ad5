"""The topology adapter: discovery, the bandwidth table, the layout cost model, `codex mesh` and mesh.auto."""

import json
import math
import os
import subprocess
import sys

import pytest

from codex_jax.cli import auto_layout
from codex_jax.config import load as config_load
from codex_jax.config.validate import validate
from codex_jax.config.workdir import check_config, write_config
from codex_jax.parallel import layout_cost, topology
from codex_jax.parallel.layout_cost import Layout
from tests.helpers import MICRO, ROOT, config_dict
from tests.xla_flags import xla_flags

# Predicted argument bytes (params + AdamW moments + batch shard) against XLA's compiled argument size.
ARGUMENT_TOLERANCE = 0.25


def _base(variant, **overrides):
  return auto_layout.base_config(config_dict(variant, **overrides))


def test_discovers_the_fake_eight_device_cpu_mesh():
  topo = topology.discover()
  assert (topo.spec.name, topo.devices, topo.hosts, topo.slices) == ("cpu", 8, 1, 1)
  assert topo.memory_source == "host RAM" and 0 < topo.memory_per_device < 1e13
  assert topo.fast_domain == 8
  # Fake devices share the host: each gets an eighth of its FLOPs and memory bandwidth.
  assert topo.peak_flops == pytest.approx(topology.find_spec("cpu").peak_flops / 8)
  assert topo.bandwidth("hbm") == pytest.approx(topology.find_spec("cpu").hbm_bw / 8)


@pytest.mark.parametrize("kind,expected", [
    ("TPU v5p", "TPU v5p"), ("TPU v5", "TPU v5p"), ("TPU v5 lite", "TPU v5e"), ("TPU v6 lite", "TPU v6e"),
    ("TPU v4", "TPU v4"), ("NVIDIA H100 80GB HBM3", "NVIDIA H100"), ("NVIDIA H200", "NVIDIA H200"),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA A100"), ("h100", "NVIDIA H100"), ("cpu", "cpu")])
def test_device_kinds_resolve_to_their_table_row(kind, expected):
  spec = topology.find_spec(kind)
  assert spec.name == expected
  assert spec.peak_flops > 0 and spec.hbm_bw > 0 and spec.fast_bw >= spec.slow_bw > 0 and spec.source


def test_hypothetical_clusters_group_devices_by_host_and_fast_link():
  v5p = topology.hypothetical("TPU v5p", 256, 64)
  assert (v5p.devices_per_host, v5p.fast_domain, v5p.memory_source) == (4, 256, "table")  # ICI spans the slice.
  h100 = topology.hypothetical("NVIDIA H100", 16)
  assert (h100.hosts, h100.fast_domain) == (2, 8)  # NVLink stops at the host.
  links = layout_cost.estimate(_base("tiny"), Layout(data=4, tensor=4), h100).links
  assert links == {"tensor": "fast", "pipeline": "fast", "data": "fast+slow"}


def test_hypothetical_v5p_ranking_for_7b_puts_a_valid_fitting_layout_first():
  cfg = _base("7b_v5p")
  topo = topology.hypothetical("TPU v5p", 256, 64)
  ranked = layout_cost.rank(cfg, topo)
  assert len(ranked) > 100
  assert ranked[0].fits and ranked[0].step_s <= min(e.step_s for e in ranked if e.fits)
  for e in ranked:
    assert validate(layout_cost.apply(cfg, e.layout), num_devices=256, num_processes=64) == [], e.layout
  # The hand-picked layout of the experiment (data 64 x tensor 4, FSDP, full remat) is a candidate too.
  hand = Layout(64, 4, 1, True, remat="full")
  assert hand in [e.layout for e in ranked]


def test_per_device_params_and_optimizer_fall_as_one_over_n_with_fsdp_and_tensor():
  cfg = _base("7b_v5p")
  topo = topology.hypothetical("TPU v5p", 256, 64)
  state = lambda layout: (lambda e: e.params_bytes + e.optimizer_bytes)(
      layout_cost.estimate(cfg, layout, topo))
  assert state(Layout(256, 1, 1, fsdp=True)) / state(Layout(256, 1, 1)) == pytest.approx(1 / 256, rel=0.05)
  assert state(Layout(64, 4, 1)) / state(Layout(256, 1, 1)) == pytest.approx(1 / 4, rel=0.05)
  # Stages split the layer stack only; the embedding and unembedding (~4% of 7B) stay on every stage.
  assert 1 / 8 < state(Layout(32, 1, 8)) / state(Layout(256, 1, 1)) < 1 / 8 + 0.04


def test_pipeline_bubble_and_activation_stash_follow_the_schedules():
  cfg = _base("7b_v5p")
  topo = topology.hypothetical("TPU v5p", 256, 64)
  est = lambda schedule, m, r=1: layout_cost.estimate(
      cfg, Layout(16, 4, 4, False, schedule, m, r, "full"), topo)
  assert est("gpipe", 16).bubble == pytest.approx(3 / 19)
  assert est("circular", 16, 2).bubble == pytest.approx(3 / 35)
  assert est("1f1b", 16).bubble == pytest.approx(7 / 23)
  # Twice the microbatches of the same size: gpipe keeps every tick's stage inputs, so its stash about
  # doubles; 1f1b holds at most 2S microbatch inputs per stage whatever M is.
  double = _base("7b_v5p", **{"train.global_batch": 2048})
  act = lambda c, schedule, m: layout_cost.estimate(
      c, Layout(16, 4, 4, False, schedule, m, 1, "full"), topo).activation_bytes
  assert act(double, "gpipe", 32) > 1.5 * act(cfg, "gpipe", 16)  # (32 + 3) / (16 + 3) ticks, + working set.
  assert act(double, "1f1b", 32) == pytest.approx(act(cfg, "1f1b", 16))
  assert act(cfg, "1f1b", 16) < act(cfg, "gpipe", 16)


@pytest.mark.parametrize("data,tensor,fsdp", [(8, 1, False), (4, 2, True)])
def test_predicted_state_bytes_match_the_compiled_argument_size(data, tensor, fsdp):
  from codex_jax.train import layout_bench
  # The smallest graph that still has every kind of parameter sharding: compile time is the test's cost.
  cfg = _base("tiny", **MICRO, **{"model.attention_chunks": 1, "model.feature_dim": 0})
  line = layout_bench.measure(cfg, Layout(data, tensor, 1, fsdp, remat="none"), topology.discover(), steps=0)
  assert "error" not in line, line
  compiled = line["compiled_bytes"]["argument"]
  assert abs(line["predicted_argument_bytes"] - compiled) <= ARGUMENT_TOLERANCE * compiled, line


def test_spearman_rho():
  assert layout_cost.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
  assert layout_cost.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  assert layout_cost.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
  assert math.isnan(layout_cost.spearman([1], [2]))


def test_mesh_auto_picks_a_valid_layout_and_a_resume_sees_the_same_config(tmp_path):
  raw = config_dict("tiny", **{"mesh.auto": True, "mesh.data": 3})  # The written mesh is replaced.
  chosen = auto_layout.resolve(raw, num_devices=8)
  cfg = config_load.load(chosen, num_devices=8)
  assert cfg.mesh.auto and cfg.mesh.data * cfg.mesh.tensor * cfg.mesh.pipeline == 8
  assert cfg.model.remat in layout_cost.REMATS
  write_config(str(tmp_path), chosen)
  assert check_config(str(tmp_path), auto_layout.resolve(raw, num_devices=8)) == []  # Same choice on rerun.


def _codex(*args, devices=8):
  env = {**os.environ, "XLA_FLAGS": xla_flags(devices), "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "codex_jax", *args], cwd=ROOT, capture_output=True, text=True,
                        env=env, timeout=120)


def test_codex_mesh_prints_the_ranked_table_and_json():
  run = _codex("mesh", "--config=experiments/codex.py:7b_v5p", "--device-kind", "TPU v5p", "--devices", "256",
               "--hosts", "64", "--top", "5")
  assert run.returncode == 0, run.stderr
  lines = run.stdout.splitlines()
  assert "256 x TPU v5p on 64 host(s)" in lines[0]
  header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["#", "data", "tens"])
  assert [line.split()[0] for line in lines[header + 2:header + 7]] == ["1", "2", "3", "4", "5"]
  assert lines[header + 8].startswith("placement of #1: ")
  # 2 hosts x 8 H100: a tensor-8 layout keeps its all-reduces on NVLink, its data axis crosses hosts.
  run = _codex("mesh", "--config=experiments/codex.py:7b_h100", "--device-kind", "h100", "--devices", "16",
               "--top", "0")
  assert run.returncode == 0, run.stderr
  rows = [line.split() for line in run.stdout.splitlines() if line.split()[1:4] == ["2", "8", "1"]]
  assert rows and all(row[-1] == "fast/-/slow" for row in rows)
  run = _codex("mesh", "--config=experiments/codex.py:tiny", "--json", "--top", "3")
  assert run.returncode == 0, run.stderr
  result = json.loads(run.stdout)
  assert result["devices"] == 8 and len(result["layouts"]) == 3
  assert result["layouts"][0]["predicted_step_s"] <= result["layouts"][1]["predicted_step_s"]


def test_codex_config_with_mesh_auto_records_the_chosen_layout():
  run = _codex("config", "--config=experiments/codex.py:tiny", "--config.mesh.auto=True", "--json")
  assert run.returncode == 0, run.stderr
  mesh = json.loads(run.stdout)["mesh"]
  assert mesh["auto"] is True and math.prod(mesh["resolved"].values()) == 8


def test_bad_mesh_flags_fail_naming_the_flag_and_what_is_expected():
  run = _codex("mesh", "--config=experiments/codex.py:tiny", "--devices", "0")
  assert run.returncode == 2
  assert run.stderr.strip() == "codex mesh: error: --devices=0: must be a positive device count", run.stderr


class _Flags:
  def __init__(self, kind=None, devices=None, hosts=None):
    self.devices, self.hosts, self._kind = devices, hosts, kind

  def __getitem__(self, name):
    assert name == "device-kind"
    return type("Flag", (), {"value": self._kind})()


@pytest.mark.parametrize("flags,message", [
    (_Flags("TPU v9", 8), "--device-kind='TPU v9': unknown device kind; expected one of ['TPU v4', 'TPU v5e', 'TPU v5p'"),
    (_Flags("H100", 16, 3), "--hosts=3: must be positive and divide --devices=16"),
    (_Flags("TPU v5p", 8, 0), "--hosts=0: must be a positive host count"),
])
def test_bad_cluster_flags_name_the_flag_and_the_expected_values(flags, message):
  from codex_jax.cli import mesh
  with pytest.raises(ValueError) as info:
    mesh._topology(flags)
  assert message in str(info.value)
