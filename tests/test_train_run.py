"""`codex train` end to end in real subprocesses: outputs, kill -9 and resume, refused config changes."""

import glob
import json
import os
import signal
import socket
import subprocess
import time

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from codex_jax.cache import cache_dir
from codex_jax.checkpoint import verify
from codex_jax.data.default_corpus.build import build_default_corpus
from codex_jax.data.sample_ids import split_id
from codex_jax.data.stream import EpochBlockShuffle
from codex_jax.telemetry.profile import parse_steps
from codex_jax.train.ledger import SampleLedger, ledger_path, read_ledger
from tests.helpers import ROOT, RUN_OVERRIDES, run_env, run_train, train_command, trained_workdir

pytestmark = pytest.mark.slow

# The shared micro run, with the default manifest's anneal phase moved to step 25 so the mixture
# switches mid-run.
PHASE_SWITCH = 25


def _command(workdir, **extra):
  return train_command(workdir, {**RUN_OVERRIDES, "data.manifest": MANIFEST, **extra})


def _train(workdir, **extra):
  return run_train(workdir, {**RUN_OVERRIDES, "data.manifest": MANIFEST, **extra})


def _state(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  return ocp.PyTreeCheckpointer().restore(path)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {row["step"]: row["loss"] for row in rows if "loss" in row}


def _stream_orders(workdir):
  """source id -> its train records' indices in the order its stream draws them (epoch 0, one process)."""
  data_cfg = json.load(open(os.path.join(workdir, "config.json")))["data"]
  record = json.load(open(os.path.join(workdir, "data", "manifest.json")))
  orders = {}
  for source_id, name in enumerate(record["included"], start=1):
    n = record["records"][name]["train"]
    epoch = EpochBlockShuffle(grain.MapDataset.range(n), block=data_cfg["shuffle_block"],
                              seed=data_cfg["seed"] * 1_000_003 + source_id, num_epochs=1)
    orders[source_id] = [epoch[i] for i in range(n)]
  return orders


def assert_each_sample_trained_once_in_stream_order(workdir):
  """What the ledger of one run must show (sample ids: data/sample_ids.py).

  - No position of any record is trained twice: the parts of a sample id never overlap.
  - Epochs: 40 steps draw far less than one epoch of any source (the smallest has 374 records), so
    every id is of epoch 0; the epoch order itself is checked in tests/test_data.py.
  - None lost: the steps before the mixture-phase switch that fill whole shuffle windows are exactly the
    mixture's first rows, so each source trained there a prefix of its stream order, each record's parts
    from its first position on with no gap. (At the switch, rows left in the window are dropped by
    design, and the run ends with rows still in a window: the later steps need not be a prefix.)
  """
  ledger, cfg = read_ledger(ledger_path(workdir)), json.load(open(os.path.join(workdir, "config.json")))
  parts = {}  # id -> [(start, length, step)]
  for step, samples in ledger.items():
    assert len(samples) >= cfg["train"]["global_batch"]  # At least one part per row.
    for sample_id, start, length in samples:
      assert length > 0
      parts.setdefault(sample_id, []).append((start, length, step))
  source, epoch, record = split_id(np.array(sorted(parts), np.int64))
  assert set(source.tolist()) == set(_stream_orders(workdir)) and not epoch.any()
  for spans in parts.values():
    spans.sort()
    assert all(a[0] + a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans
  rows_per_window = cfg["data"]["shuffle_window"] // cfg["train"]["global_batch"]
  whole = PHASE_SWITCH // rows_per_window * rows_per_window  # Steps 1..whole: whole main-phase windows.
  assert whole >= 16
  orders, early = _stream_orders(workdir), {}
  for sample_id, spans in parts.items():
    starts = [(start, length) for start, length, step in spans if step <= whole]
    if starts:
      early[int(sample_id)] = starts
  early_source, _, early_record = split_id(np.array(list(early), np.int64))
  for source_id, order in orders.items():
    trained = set(early_record[early_source == source_id].tolist())
    assert trained and trained == set(order[:len(trained)]), source_id
  for spans in early.values():
    assert spans[0][0] == 0 and all(a[0] + a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False)), spans


def _leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


MANIFEST = os.path.join(cache_dir(), "test-manifests", "early-anneal.yaml")


def write_manifest(path: str, edit=lambda raw: None) -> str:
  """The default manifest with its corpus root made absolute, the anneal phase at PHASE_SWITCH, then `edit`."""
  with open(os.path.join(ROOT, "experiments", "data", "default.yaml")) as f:
    raw = yaml.safe_load(f)
  raw["root"] = raw["root"].replace("{cache_dir}", cache_dir())
  raw["phases"][1]["start_step"] = PHASE_SWITCH
  edit(raw)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    yaml.safe_dump(raw, f, sort_keys=False)
  return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One uninterrupted run, shared by the tests below."""
  build_default_corpus()  # Once per cache dir; a no-op after that.
  write_manifest(MANIFEST)
  workdir = str(tmp_path_factory.mktemp("reference"))
  result = _train(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


def test_a_run_leaves_everything_a_user_looks_at(reference):
  workdir, result = reference
  summary = json.loads(result.stdout)  # --json: exactly one object on stdout.
  assert summary["final_step"] == 40 and summary["checkpoints"][-1] == 40
  assert summary["last_loss"] < summary["first_loss"]
  assert np.isfinite(summary["eval_loss"])
  names = set(os.listdir(workdir))
  assert {"config.json", "tokenizer.json", "metrics.jsonl", "samples.jsonl", "loss.png", "checkpoints",
          "data"} <= names
  assert any(name.startswith("events.out.tfevents") for name in names)
  # Readable by teammates as the umask allows (mkstemp's 0600 hid config, tokenizer and plots).
  from codex_jax.atomic import file_mode
  for name in ("config.json", "tokenizer.json", "metrics.jsonl", "loss.png", "data/manifest.json"):
    assert os.stat(os.path.join(workdir, name)).st_mode & 0o777 == file_mode(), name
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  steps = [row["step"] for row in rows if "loss" in row]
  assert steps == list(range(1, 41))
  assert {"loss", "grad_norm", "learning_rate", "tokens_per_s", "step_time", "mfu"} <= set(rows[0])
  # Goodput: each row splits the time since the previous one by kind; the summary splits the whole run.
  train_rows = [row for row in rows if "loss" in row]
  assert all(0 < row["goodput"] <= 1 and row["time/step_s"] > 0 for row in train_rows)
  assert sum(row["time/checkpoint_s"] for row in train_rows) > 0 and sum(row["time/eval_s"] for row in train_rows) > 0
  assert set(summary["time_s"]) == {"step", "data", "checkpoint", "eval", "compile", "other"}
  assert sum(summary["time_s"].values()) == pytest.approx(summary["wall_s"], abs=0.01)
  assert summary["goodput"] == pytest.approx(summary["time_s"]["step"] / summary["wall_s"], rel=0.01)
  assert summary["time_s"]["compile"] > 0
  # The data record: what was trained on, what the licence policy excluded and why.
  record = json.load(open(os.path.join(workdir, "data", "manifest.json")))
  assert record["manifest_hash"] == summary["manifest_hash"]
  assert [e["source"] for e in record["excluded"]] == ["pygame-ce-docs"] and "LGPL" in record["excluded"][0]["reason"]
  assert summary["data_excluded"] == {"pygame-ce-docs": record["excluded"][0]["reason"]}
  # Per-step accounting, and the mixture switching to the anneal table at PHASE_SWITCH.
  by_step = {row["step"]: row for row in rows if "loss" in row}
  assert by_step[PHASE_SWITCH]["data/python-stdlib-code/target_share"] == pytest.approx(0.143, abs=1e-3)
  assert by_step[PHASE_SWITCH + 1]["data/python-stdlib-code/target_share"] == pytest.approx(0.247, abs=1e-3)
  assert by_step[40]["data/max_share_error"] < 0.05
  assert "mixture phase 'main' -> 'anneal'" in result.stderr
  assert "Parameters:" in result.stderr and "total" in result.stderr


def test_rerunning_a_finished_run_compiles_nothing_writes_nothing_and_says_so(reference):
  workdir, _ = reference
  mtimes = lambda: {name: os.stat(os.path.join(workdir, name)).st_mtime_ns  # noqa: E731
                    for name in os.listdir(workdir) if name != "writer.lock"}  # The lock is taken, and names its holder.
  before = mtimes()
  result = _train(workdir)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Nothing to train: the run in" in result.stderr and "train.steps=40" in result.stderr
  assert "Compiled the train step" not in result.stderr and "Parameters:" not in result.stderr
  summary = json.loads(result.stdout)
  assert summary["finished"] and summary["final_step"] == 40 and summary["checkpoints"][-1] == 40
  assert mtimes() == before


def test_a_second_writer_is_refused_naming_the_first_which_finishes_untouched(reference, tmp_path):
  """Two `codex train` on one workdir used to both run: every metric twice, the lineage interleaved."""
  workdir = str(tmp_path / "run")
  first = subprocess.Popen(_command(workdir), cwd=ROOT, env=run_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  metrics, deadline = os.path.join(workdir, "metrics.jsonl"), time.time() + 300
  while time.time() < deadline and first.poll() is None and not os.path.exists(metrics):
    time.sleep(0.05)
  second = _train(workdir)
  assert second.returncode == 2
  holder = f"is in use by pid {first.pid} on {socket.gethostname()}"
  assert holder in second.stderr.strip().splitlines()[-1], second.stderr[-1000:]
  out, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-2000:]
  with open(metrics) as f:
    steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
  assert steps == list(range(1, 41))  # Each step once: the refused writer wrote nothing.
  assert verify.verify(workdir)["ok"]
  for got, want in zip(_leaves(_state(workdir, 40)), _leaves(_state(reference[0], 40)), strict=True):
    np.testing.assert_array_equal(got, want)  # And trained exactly as the uninterrupted reference.


def test_kill_9_then_resume_is_bit_identical_to_an_uninterrupted_run(reference, tmp_path):
  ref_dir, _ = reference
  workdir = str(tmp_path)
  process = subprocess.Popen(_command(workdir), cwd=ROOT, env=run_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  committed = os.path.join(workdir, "checkpoints", "10")
  deadline = time.time() + 300
  while not os.path.isdir(committed) and time.time() < deadline and process.poll() is None:
    time.sleep(0.005)
  assert process.poll() is None, "the run ended before it could be killed"
  process.send_signal(signal.SIGKILL)
  process.communicate()
  assert not os.path.isdir(os.path.join(workdir, "checkpoints", "40"))

  resumed = _train(workdir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  summary = json.loads(resumed.stdout)
  assert summary["start_step"] >= 10 and summary["final_step"] == 40
  for got, want in zip(_leaves(_state(workdir, 40)), _leaves(_state(ref_dir, 40)), strict=True):
    np.testing.assert_array_equal(got, want)
  losses, ref_losses = _losses(workdir), _losses(ref_dir)
  assert list(losses) == list(range(1, 41))  # Steps past the checkpoint were dropped, then redone once.
  assert losses == ref_losses  # Every step's loss bit-equal, before and after the resume point.
  # The samples trained, by id (samples.jsonl): the same as the reference's, step by step, so the kill
  # lost and repeated none; and the reference itself trains each sample once, in stream order.
  ledger, ref_ledger = read_ledger(ledger_path(workdir)), read_ledger(ledger_path(ref_dir))
  assert list(ledger) == list(range(1, 41))
  for step in ref_ledger:
    assert ledger[step] == ref_ledger[step], f"step {step} trained other samples after the resume"
  assert_each_sample_trained_once_in_stream_order(ref_dir)


def test_sample_ledger_is_cut_back_to_the_resumed_step(tmp_path):
  workdir = str(tmp_path)
  ledger = SampleLedger(workdir, 0, resume_step=0)
  for step in range(1, 7):
    ledger.write(step, [[step << 40 | 7, 0, 64]])
  ledger.close()
  with open(ledger_path(workdir), "a") as f:
    f.write('{"step": 7, "samples": [[1, 0')  # Torn by a kill mid-write.
  resumed = SampleLedger(workdir, 0, resume_step=4)  # Restored from checkpoint 4: steps 5.. are redone.
  assert read_ledger(ledger_path(workdir)) == {step: [[step << 40 | 7, 0, 64]] for step in range(1, 5)}
  resumed.write(5, [[99, 0, 3]])
  resumed.close()
  assert read_ledger(ledger_path(workdir))[5] == [[99, 0, 3]] and list(read_ledger(ledger_path(workdir))) == [
      1, 2, 3, 4, 5]
  SampleLedger(workdir, 0, resume_step=0).close()  # A fresh start (no checkpoint) keeps nothing.
  assert read_ledger(ledger_path(workdir)) == {}
  assert ledger_path(workdir, 3) == os.path.join(workdir, "samples.p3.jsonl")  # Other processes: own files.


def test_changed_config_on_resume_is_refused_with_a_diff_and_nothing_is_touched(reference):
  workdir, _ = reference
  before = {name: os.path.getmtime(os.path.join(workdir, name)) for name in ("config.json", "metrics.jsonl")}
  result = _train(workdir, **{"model.d_model": 32, "optimizer.learning_rate": 0.01})
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("codex train: error:")
  assert "model.d_model: 64 -> 32" in last and "optimizer.learning_rate: 0.003 -> 0.01" in last
  assert result.stdout == ""
  assert before == {name: os.path.getmtime(os.path.join(workdir, name)) for name in before}


def test_resume_refuses_changed_data_unless_a_new_phase_is_declared(reference, tmp_path):
  import shutil
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  # Shares moved far enough that the default tokenizer, trained from the new shares, would differ: the run keeps
  # its pinned one (a new phase used to be refused as "holds a different tokenizer").
  changed = write_manifest(str(tmp_path / "changed.yaml"), lambda raw: raw["sources"][1]["share"].update(
      main=raw["sources"][1]["share"]["main"] + 0.2) or raw["sources"][0]["share"].update(
      main=raw["sources"][0]["share"]["main"] - 0.2))
  tokenizer = open(os.path.join(workdir, "tokenizer.json"), "rb").read()
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  refused = _train(workdir, **{"data.manifest": changed, "train.steps": 44})
  assert refused.returncode == 2
  last = refused.stderr.strip().splitlines()[-1]
  assert "checkpoint 40 was trained on data with manifest hash" in last and "--config.data.phase" in last
  assert "manifest entries" in last and refused.stdout == ""
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
  accepted = _train(workdir, **{"data.manifest": changed, "data.phase": "phase-2", "train.steps": 44})
  assert accepted.returncode == 0, accepted.stderr[-3000:]
  assert "Run phase 'pretrain' -> 'phase-2'" in accepted.stderr
  assert json.loads(accepted.stdout)["manifest_hash"] != json.loads(reference[1].stdout)["manifest_hash"]
  assert open(os.path.join(workdir, "tokenizer.json"), "rb").read() == tokenizer


def test_a_data_edit_that_keeps_size_and_modification_time_is_refused_on_resume(reference, tmp_path):
  """File hashes were cached by path, size and mtime: this edit kept the old manifest hash and was trained on."""
  import shutil

  from codex_jax.data import fingerprint
  workdir, corpus = str(tmp_path / "run"), str(tmp_path / "corpus")
  shutil.copytree(reference[0], workdir)
  with open(MANIFEST) as f:
    root = yaml.safe_load(f)["root"]
  shutil.copytree(root, corpus)
  moved = write_manifest(str(tmp_path / "moved.yaml"), lambda raw: raw.update(root=corpus))
  data = sorted(glob.glob(os.path.join(corpus, "embodied", "episode_*", "frames.npy")))[0]
  fingerprint.file_sha256(os.path.dirname(data))  # Hashed once before the edit, as a run on this copy would.
  stat = os.stat(data)
  pixels = bytearray(open(data, "rb").read())
  pixels[-1] ^= 1  # One pixel of one frame: still a valid episode, other content.
  open(data, "wb").write(bytes(pixels))
  os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  refused = _train(workdir, **{"data.manifest": moved, "train.steps": 44})
  assert refused.returncode == 2, refused.stderr[-2000:]
  last = refused.stderr.strip().splitlines()[-1]
  episode = os.path.basename(os.path.dirname(data))
  assert "checkpoint 40 was trained on data with manifest hash" in last and episode in last, last


def test_profile_steps_traces_those_steps_and_a_bad_range_is_named(reference, tmp_path):
  import shutil
  workdir = str(tmp_path / "run")
  shutil.copytree(reference[0], workdir)
  command = [*_command(workdir, **{"train.steps": 43}), "--profile_steps=41:42"]
  result = subprocess.run(command, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Profiled steps 41-42" in result.stderr
  traces = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*.xplane.pb"))
  perfetto = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*.trace.json.gz"))
  assert traces and perfetto and os.path.getsize(traces[0]) > 0
  for bad in ("3", "0:2", "5:4", "a:b"):
    with pytest.raises(ValueError, match=rf"--profile_steps='{bad}': expected A:B"):
      parse_steps(bad)
  assert parse_steps("2:2") == (2, 2) and parse_steps(None) is None


def test_allowed_change_extends_a_finished_run(reference, tmp_path):
  import shutil
  workdir = str(tmp_path / "extended")
  shutil.copytree(reference[0], workdir)
  result = _train(workdir, **{"train.steps": 44})
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout)
  assert summary["start_step"] == 40 and summary["final_step"] == 44
  assert "train.steps: 40 -> 44" in result.stderr


# Gradient accumulation with a batch ramp to 2 micro-batches of 4 rows over the first 2 updates, capped by the
# noise scale measured every 2 updates (train/batch_ramp.py): 4 updates, checkpoints at 2 and 4.
RAMP = {**RUN_OVERRIDES, "train.steps": 4, "checkpoint.every": 2, "eval.batches": 0, "train.grad_accum": 2,
        "train.batch_ramp_steps": 2, "train.noise_scale_every": 2, "train.noise_scale_microbatches": 2,
        "train.batch_ramp_noise_cap": True}


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_a_noise_capped_batch_ramp_logs_its_batches_and_checkpoints_its_estimate(tmp_path_factory):
  from codex_jax.config.schema import TrainConfig
  from codex_jax.train import batch_ramp
  ref_dir, _ = trained_workdir(tmp_path_factory, "ramp", RAMP)
  rows = _rows(ref_dir)
  accum = {r["step"]: r["batch/accum"] for r in rows if "batch/accum" in r}
  assert accum == {1: 1, 2: 1, 3: 2, 4: 2}  # Update s is logged under s + 1.
  assert all(r["batch/rows"] == 4 * r["batch/accum"] for r in rows if "batch/rows" in r)
  # Each k is the ramp's, capped by the estimate logged before its update (null: unbounded, no cap).
  train = TrainConfig(global_batch=8, grad_accum=2, batch_ramp_steps=2, batch_ramp_noise_cap=True,
                      noise_scale_every=2)
  estimates = [(r["step"], r["noise_scale/b_simple"]) for r in rows if "noise_scale/g2" in r]
  assert [step for step, _ in estimates] == [1, 3]
  for step, k in accum.items():
    known = [b for s, b in estimates if s < step]
    assert k == batch_ramp.micro_batches(train, step - 1, known[-1] if known else None)
  meta = json.load(open(os.path.join(ref_dir, "checkpoints", "2", "meta", "metadata")))
  assert meta["noise_scale"]["g2"] == next(r for r in rows if "noise_scale/g2" in r)["noise_scale/g2"]
  # Resume: the probe's averages come back from this meta (train/noise_scale.Probe.restore; the round trip
  # continuing exactly as an uninterrupted run is tests/test_noise_scale.py's), so k stays a pure function of
  # (step, restored estimate). A second, resumed subprocess run here cost 60 s of test time.
  assert meta["noise_scale"]["b_simple"] == estimates[0][1]
