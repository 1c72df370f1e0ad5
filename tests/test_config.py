"""Config variants load and validate; every kind of bad config fails early, naming key, value, rule."""

import os
import re
import subprocess
import sys

import pytest

from codex_jax.config import load as config_load
from codex_jax.config.errors import ConfigError
from codex_jax.config.workdir import check_config, write_config
from codex_jax.telemetry.flops import param_counts
from tests.helpers import ROOT, config_dict, experiment_module, load


@pytest.mark.parametrize("variant", experiment_module().VARIANTS)
def test_every_variant_validates_on_its_target_devices(variant):
  devices = experiment_module().TARGET_DEVICES.get(variant, 1)
  cfg = load(variant, num_devices=devices)
  assert cfg.train.global_batch % devices == 0 or cfg.mesh.tensor > 1


@pytest.mark.parametrize("variant,low,high", [
    ("150m_v5p", 120e6, 200e6), ("1b_h100", 0.9e9, 1.4e9), ("7b_v5p", 6.3e9, 7.2e9)])
def test_accelerator_variants_have_their_advertised_size(variant, low, high):
  assert low <= param_counts(load(variant, num_devices=None).model)["total"] <= high


def _problems(num_devices=8, **overrides):
  with pytest.raises(ConfigError) as info:
    config_load.load(config_dict("tiny", **overrides), num_devices=num_devices)
  return str(info.value)


@pytest.mark.parametrize("key,value", [
    ("model.d_model", -128), ("model.num_layers", 0), ("train.global_batch", -8), ("data.seq_len", -1),
    ("model.mlp_dim", 0)])
def test_negative_or_zero_sizes_are_refused(key, value):
  message = _problems(**{key: value})
  assert f"config.{key}={value!r}: must be positive" in message


@pytest.mark.parametrize("key,value,rule", [
    ("checkpoint.average_every", -1, "must not be negative"), ("checkpoint.average_count", 0, "must be positive"),
    ("checkpoint.ema_decay", 1.0, "must be in [0, 1)"), ("eval.task_examples", -2, "must not be negative")])
def test_averaging_and_task_keys_are_checked(key, value, rule):
  assert f"config.{key}={value!r}: {rule}" in _problems(**{key: value})


def test_snapshots_spaced_by_steps_and_seconds_at_once_are_refused():
  message = _problems(**{"checkpoint.average_every": 10, "checkpoint.average_every_seconds": 60.0})
  assert "config.checkpoint.average_every_seconds=60.0: snapshots are spaced by steps or by seconds" in message


def test_heads_must_divide_model_width():
  message = _problems(**{"model.num_heads": 3})
  assert "config.model.num_heads=3: must divide model.d_model=128" in message


def test_kv_heads_must_divide_heads():
  assert "config.model.num_kv_heads=3: must divide model.num_heads=4" in _problems(**{"model.num_kv_heads": 3})


def test_global_batch_must_divide_over_data_axis():
  message = _problems(**{"train.global_batch": 12})
  assert "config.train.global_batch=12: must be divisible by the data axis size 8" in message


@pytest.mark.parametrize("overrides,want", [
    ({"train.grad_accum": 0}, "config.train.grad_accum=0: must be at least 1"),
    ({"train.grad_accum": 3}, "config.train.global_batch=16: must be divisible by train.grad_accum=3"),
    # Micro-batches of 16 / 4 = 4 rows cannot split over the 8 data devices (16 rows could).
    ({"train.grad_accum": 4}, "config.train.global_batch=16: must make the micro-batch rows train.global_batch / "
                              "train.grad_accum = 4 divisible by the data axis size 8"),
    ({"train.grad_accum": 2, "train.batch_ramp_start": 3},
     "config.train.batch_ramp_start=3: must be in [1, train.grad_accum=2]"),
    ({"train.batch_ramp_steps": -1}, "config.train.batch_ramp_steps=-1: must not be negative"),
    ({"train.batch_ramp_noise_cap": True}, "config.train.batch_ramp_noise_cap=True: needs the noise probe on"),
    # The probe splits each micro-batch's rows: 8 / 16 rows do not split in 16.
    ({"train.grad_accum": 2, "train.noise_scale_every": 5, "train.noise_scale_microbatches": 16},
     "config.train.noise_scale_microbatches=16: must be at least 2 and divide the micro-batch rows "
     "train.global_batch / train.grad_accum = 8"),
])
def test_accumulation_and_batch_ramp_keys_are_checked(overrides, want):
  assert want in _problems(**overrides)


def test_a_batch_ramp_loads_and_only_its_own_keys_may_change_on_resume(tmp_path):
  cfg = load(num_devices=8, **{"train.grad_accum": 2, "train.batch_ramp_steps": 10, "train.noise_scale_every": 5,
                               "train.batch_ramp_noise_cap": True})
  assert cfg.train.micro_batch == 8 and cfg.train.batch_ramp_start == 1
  write_config(str(tmp_path), config_dict("tiny", **{"train.grad_accum": 2}))
  assert check_config(str(tmp_path), config_dict("tiny", **{"train.grad_accum": 2, "train.batch_ramp_steps": 5}))
  with pytest.raises(ConfigError, match="train.grad_accum: 2 -> 1"):  # The pipeline's batch shape would change.
    check_config(str(tmp_path), config_dict("tiny"))
  # A workdir written before these keys existed trained with their defaults: it resumes, and only that way.
  old = config_dict("tiny")
  for key in ("grad_accum", "batch_ramp_steps", "batch_ramp_start", "batch_ramp_noise_cap"):
    del old["train"][key]
  write_config(str(tmp_path), old)
  assert check_config(str(tmp_path), config_dict("tiny")) == [
      f"train.{key}: '<absent>' -> {value!r}" for key, value in
      (("batch_ramp_noise_cap", False), ("batch_ramp_start", 1), ("batch_ramp_steps", 0), ("grad_accum", 1))]
  with pytest.raises(ConfigError, match="train.grad_accum: 1 -> 2"):
    check_config(str(tmp_path), config_dict("tiny", **{"train.grad_accum": 2}))


def test_mesh_product_must_equal_device_count():
  message = _problems(num_devices=8, **{"mesh.data": 2, "mesh.tensor": 2})
  assert re.search(r"config\.mesh=.*'data': 2, 'tensor': 2.*: data\*tensor\*pipeline=4 must equal the 8 "
                   r"available devices", message)


def test_a_fill_in_axis_that_cannot_divide_the_devices_is_refused():
  assert "must equal the 8 available devices" in _problems(num_devices=8, **{"mesh.tensor": 3})


def test_only_one_axis_may_fill_in():
  assert "only one axis may be -1" in _problems(**{"mesh.tensor": -1})


def test_tensor_axis_must_divide_heads():
  message = _problems(**{"mesh.data": 1, "mesh.tensor": 8})
  assert "config.model.num_heads=4: must be divisible by the tensor axis size 8" in message


def test_pipeline_stages_need_the_batch_to_split_into_microbatches_on_every_data_shard():
  # tiny: global batch 16; 8 devices with pipeline 2 leave data 4, and the default is 4 microbatches a stage.
  assert ("config.train.global_batch=16: must be divisible by the data axis size x pipeline microbatches = 4 x 8"
          in _problems(**{"mesh.pipeline": 2}))
  config_load.load(config_dict("tiny", **{"mesh.pipeline": 2, "mesh.microbatches": 4}), num_devices=8)


def test_unknown_keys_and_groups_are_refused():
  raw = config_dict("tiny")
  raw["model"]["num_layer"] = 3
  raw["trainer"] = {"steps": 1}
  with pytest.raises(ConfigError) as info:
    config_load.load(raw)
  message = str(info.value)
  assert "config.model.num_layer: unknown key" in message and "'num_layers'" in message
  assert "config.trainer: unknown group" in message


def test_wrong_types_are_refused():
  message = _problems(**{"model.num_layers": 2.5, "model.tie_embeddings": "yes", "optimizer.no_decay": [1]})
  assert "config.model.num_layers=2.5: expected an integer" in message
  assert "config.model.tie_embeddings='yes': expected true/false" in message
  assert "config.optimizer.no_decay=[1]: expected a list of str" in message


def test_every_problem_is_reported_at_once():
  error = None
  try:
    config_load.load(config_dict("tiny", **{"model.num_heads": 3, "train.steps": -1}), num_devices=8)
  except ConfigError as e:
    error = e
  assert error is not None and len(error.problems) >= 2


def test_resume_refuses_changes_outside_the_allow_list(tmp_path):
  workdir = str(tmp_path)
  assert check_config(workdir, config_dict("tiny")) == []
  assert not os.listdir(workdir)  # Checking writes nothing.
  write_config(workdir, config_dict("tiny"))
  allowed = config_dict("tiny", **{"train.steps": 500, "eval.every": 25})
  changes = check_config(workdir, allowed)
  assert changes == ["eval.every: 100 -> 25", "train.steps: 300 -> 500"]
  write_config(workdir, allowed)
  with pytest.raises(ConfigError) as info:
    check_config(workdir, config_dict("tiny", **{"train.steps": 500, "model.d_model": 64}))
  assert "model.d_model: 128 -> 64" in str(info.value) and "train.steps" not in str(info.value).split("(")[0]


def _codex(*args):
  return subprocess.run([sys.executable, "-m", "codex_jax", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)


def test_cli_refuses_a_misspelt_override_in_one_line():
  result = _codex("config", "--config=experiments/codex.py:tiny", "--config.model.num_layer=3")
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("codex config: error:") and "num_layers" in last


def test_cli_config_json_is_one_object_and_errors_exit_nonzero():
  import json
  ok = _codex("config", "--config=experiments/codex.py:7b_v5p", "--devices=256", "--json")
  assert ok.returncode == 0, ok.stderr
  resolved = json.loads(ok.stdout)
  assert resolved["mesh"]["resolved"] == {"data": 64, "tensor": 4, "pipeline": 1}
  bad = _codex("config", "--config=experiments/codex.py:7b_v5p", "--devices=128")
  assert bad.returncode == 2 and bad.stdout == ""
  assert "must equal the 128 available devices" in bad.stderr.strip().splitlines()[-1]


def test_every_command_answers_help_with_its_flags_and_an_example_and_codex_has_a_version():
  from codex_jax.cli.main import COMMANDS
  expect = {"train": "--workdir", "lineage": "--proof", "average": "--count", "export": "--out", "mesh": "--device-kind",
            "plan": "--flops", "bench": "--steps", "generate": "--prompt", "eval": "--workdir", "import": "--workdir",
            "scaling": "--budgets", "data": "--[no]force", "config": "--devices"}
  assert sorted(expect) == sorted(COMMANDS)
  procs = {(cmd, arg): subprocess.Popen([sys.executable, "-m", "codex_jax", cmd, arg], cwd=ROOT, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for cmd in COMMANDS for arg in ("--help", "-h")}
  for (cmd, arg), proc in procs.items():
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, (cmd, arg, err)
    assert out.startswith(f"codex {cmd}: ") and f"example: codex {cmd} " in out, (cmd, out)
    assert expect[cmd] in out and "--[no]verbose" in out, (cmd, out)
  full = _codex("plan", "--helpfull")
  assert full.returncode == 0 and "--flops" in full.stdout and "--alsologtostderr" in full.stdout  # absl logging's.
  version = _codex("--version")
  assert version.returncode == 0 and version.stdout.startswith("codex-jax 0.1.0 (commit ")


def test_train_refuses_a_file_or_an_object_store_workdir_in_one_line(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("keep")
  for workdir, words in ((str(afile), "is a file; expected a directory"),
                         ("gs://bucket/run", "gs:// workdirs are not supported yet")):
    result = _codex("train", "--config=experiments/codex.py:tiny", f"--workdir={workdir}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"codex train: error: --workdir={workdir}: {words}" + (
        " (new, or a run's)" if "file" in words else "; give a local or mounted path")
  imported = _codex("import", "hf", str(tmp_path), "--workdir=s3://bucket/run", "--config=experiments/codex.py:tiny")
  assert imported.returncode == 2 and imported.stderr.strip().endswith("s3:// workdirs are not supported yet; "
                                                                        "give a local or mounted path")
  assert afile.read_text() == "keep" and not os.path.exists("gs:") and not os.path.exists("s3:")


def test_data_settings_are_validated():
  problems = _problems(**{"data.licence_policy": "anything", "data.on_malformed": "ignore", "data.patch_size": 5})
  assert "config.data.licence_policy='anything': must be one of" in problems
  assert "config.data.on_malformed='ignore': must be one of ('fail', 'skip')" in problems
  assert "config.data.image_size=16: must be a multiple of data.patch_size=5" in problems


def test_attention_chunks_must_divide_the_sequence():
  assert "config.model.attention_chunks=3: must divide data.seq_len=256" in _problems(**{"model.attention_chunks": 3})


def test_the_experiment_sets_only_what_differs_from_the_schema():
  """Defaults are written once (config/schema.py): every key experiments/codex.py's base_config assigns differs
  from its schema default, and everything else is the default."""
  import ast

  import ml_collections

  source = open(os.path.join(ROOT, "experiments", "codex.py")).read()
  base = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "base_config")
  assigned = set()
  for node in ast.walk(base):
    if isinstance(node, ast.Assign):
      assigned |= {ast.unparse(t).removeprefix("config.") for t in node.targets if ast.unparse(t).startswith("config.")}
    elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith(".update"):
      group = ast.unparse(node.func).removeprefix("config.").removesuffix(".update")
      assigned |= {f"{group}.{k.arg}" for k in node.keywords}
  flat = lambda d, p="": {k2: v2 for k, v in d.items() for k2, v2 in (  # noqa: E731
      flat(v, f"{p}{k}.").items() if isinstance(v, dict) else [(f"{p}{k}", v)])}
  tiny = flat(config_load.to_dict(experiment_module().base_config()))
  default = flat(config_load.to_dict(config_load.defaults()))
  assert isinstance(config_load.defaults(), ml_collections.ConfigDict) and set(tiny) == set(default)
  restated = sorted(key for key in assigned if tiny[key] == default[key])
  assert not restated, f"experiments/codex.py restates schema defaults: {restated}"
  unassigned = sorted(key for key in tiny if tiny[key] != default[key] and key not in assigned)
  assert not unassigned and len(assigned) >= 10, unassigned


def test_the_writer_lock_refuses_a_second_writer_and_a_refused_fresh_run_leaves_nothing(tmp_path):
  import socket

  from codex_jax.workdir import LOCK_FILE, WorkdirInUse, writer_lock
  run = str(tmp_path / "run")
  with writer_lock(run):
    with pytest.raises(WorkdirInUse, match=f"is in use by pid {os.getpid()} on {re.escape(socket.gethostname())}"):
      with writer_lock(run):
        pass
  with writer_lock(run):  # Released with its descriptor (or by the kernel, when a holder dies).
    pass
  fresh = str(tmp_path / "fresh")
  with pytest.raises(ValueError, match="a check failed"):
    with writer_lock(fresh):
      raise ValueError("a check failed")
  assert not os.path.exists(fresh)  # Created for the lock, removed again: nothing left behind.
  with pytest.raises(ValueError):
    with writer_lock(run):
      raise ValueError("a check failed")
  assert sorted(os.listdir(run)) == [LOCK_FILE]  # An existing workdir stays.
