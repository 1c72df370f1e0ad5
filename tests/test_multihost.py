"""Multi-host through jax.distributed: environment detection, and 2 CPU processes x 4 devices on localhost
matching 1 process x 8 devices (losses, gradient norms, final parameters), then a 2-process `codex train`."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from codex_jax.checkpoint import verify
from codex_jax.config.errors import ConfigError
from codex_jax.data.default_corpus.build import build_default_corpus
from codex_jax.parallel.distributed import Launch, detect, initialize
from codex_jax.train.ledger import ledger_path, read_ledger
from tests.helpers import ROOT, RUN_OVERRIDES, train_command
from tests.multihost_worker import FAST_MODEL
from tests.xla_flags import xla_flags

EXPLICIT = {"CODEX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "CODEX_NUM_PROCESSES": "2", "CODEX_PROCESS_ID": "1"}
SLURM = {"SLURM_JOB_ID": "42", "SLURM_NTASKS": "16", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_PROCID": "3",
         "SLURM_LOCALID": "3"}
TIMEOUT_S = 240  # Per run of processes; a hung coordinator fails the test instead of the session.
# Both sides of a comparison compile alike, so the cheapest settings do: XLA's backend optimisations off
# (tests/xla_flags.py) and, in the model, no remat and whole attention (FAST_MODEL).


# --- Which launch the environment asks for (no process is started) ---

def test_a_plain_machine_is_one_process():
  assert detect({}) is None
  assert detect({"SLURM_JOB_ID": "42", "SLURM_NTASKS": "1"}) is None  # One task: nothing to join.
  assert detect({"TPU_WORKER_HOSTNAMES": "a,b"}) is None  # TPU variables without a TPU VM.
  assert initialize({}) is None  # Nothing asked: jax.distributed is left alone.


def test_explicit_variables_give_coordinator_count_and_id():
  assert detect(EXPLICIT) == Launch("explicit", {"coordinator_address": "10.0.0.1:1234", "num_processes": 2,
                                                 "process_id": 1})
  jax_named = {**EXPLICIT, "JAX_COORDINATOR_ADDRESS": EXPLICIT["CODEX_COORDINATOR_ADDRESS"]}
  del jax_named["CODEX_COORDINATOR_ADDRESS"]
  assert detect(jax_named).kwargs["coordinator_address"] == "10.0.0.1:1234"  # jax's own name works too.
  assert detect({**SLURM, "CODEX_NUM_PROCESSES": "1"}) is None  # Explicit wins: the opt-out of detection.


@pytest.mark.parametrize("env, named", [
    ({"CODEX_PROCESS_ID": "0"}, ["CODEX_NUM_PROCESSES is unset", "CODEX_COORDINATOR_ADDRESS is unset"]),
    ({**EXPLICIT, "CODEX_PROCESS_ID": "2"}, ["CODEX_PROCESS_ID=2: must be below CODEX_NUM_PROCESSES=2"]),
    ({**EXPLICIT, "CODEX_PROCESS_ID": "-1"}, ["CODEX_PROCESS_ID='-1': expected an integer >= 0"]),
    ({**EXPLICIT, "CODEX_NUM_PROCESSES": "two"}, ["CODEX_NUM_PROCESSES='two': expected an integer >= 1"]),
    ({**EXPLICIT, "CODEX_COORDINATOR_ADDRESS": "10.0.0.1"}, ["CODEX_COORDINATOR_ADDRESS='10.0.0.1': expected host:port"]),
    ({"CODEX_NUM_PROCESSES": "2", "CODEX_COORDINATOR_ADDRESS": "h:1"}, ["CODEX_PROCESS_ID is unset"]),
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, ["JAX_COORDINATOR_ADDRESS=h:1 is set but no cluster was detected"]),
    ({**SLURM, "SLURM_STEP_NODELIST": None}, ["SLURM_NTASKS=16 but ['SLURM_STEP_NODELIST'] are unset", "srun"]),
])
def test_bad_or_incomplete_variables_are_named(env, named):
  env = {k: v for k, v in env.items() if v is not None}
  with pytest.raises(ConfigError) as e:
    detect(env)
  for text in named:
    assert text in str(e.value)


def test_codex_train_names_a_bad_variable_in_one_line(tmp_path):
  env = {**os.environ, **EXPLICIT, "CODEX_PROCESS_ID": "2", "CODEX_COORDINATOR_ADDRESS": "127.0.0.1:1"}
  result = subprocess.run(train_command(str(tmp_path / "run"), {}), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == \
      "codex train: error: CODEX_PROCESS_ID=2: must be below CODEX_NUM_PROCESSES=2"
  assert not os.path.exists(tmp_path / "run")  # Refused before anything was written.


def test_clusters_are_left_to_jax_own_detection():
  assert detect(SLURM) == Launch("slurm", {"cluster_detection_method": "slurm"})
  assert detect({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "4"}).source == "open mpi"
  assert detect({}, on_cloud_tpu=True) == Launch("tpu", {})  # GCE: jax reads the slice from the metadata server.
  assert detect({"TPU_WORKER_HOSTNAMES": "a,b", "TPU_SKIP_MDS_QUERY": "1"}, on_cloud_tpu=True).source == "tpu"
  assert detect({"TPU_SKIP_MDS_QUERY": "1"}, on_cloud_tpu=True) is None


TORCHRUN = {"WORLD_SIZE": "16", "RANK": "9", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "10.0.0.1",
            "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}


def test_torchrun_variables_give_coordinator_count_id_and_local_device():
  assert detect(TORCHRUN) == Launch("torchrun", {"coordinator_address": "10.0.0.1:29501", "num_processes": 16,
                                                 "process_id": 9, "local_device_ids": [1]})
  one_per_host = detect({**TORCHRUN, "LOCAL_WORLD_SIZE": "1", "CODEX_COORDINATOR_PORT": "4000"})
  assert one_per_host.kwargs == {"coordinator_address": "10.0.0.1:4000", "num_processes": 16, "process_id": 9}
  assert detect({"WORLD_SIZE": "1", "RANK": "0"}) is None  # One process: nothing to join.
  with pytest.raises(ConfigError) as e:
    detect({"WORLD_SIZE": "4", "RANK": "4", "MASTER_PORT": "65535"})
  for text in ("MASTER_ADDR is unset", "RANK=4: must be below WORLD_SIZE=4", "above 65535"):
    assert text in str(e.value)


# --- Real processes on localhost ---

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_groups(command: list[str], groups: list[tuple[int, int]], logs: str, launch: str = "explicit",
                signal_when=None) -> list[list[tuple[str, str]]]:
  """Runs groups of (processes, devices each) copies of `command` at once; a group of several is joined
  by jax.distributed on a free localhost port, told by CODEX_* variables or (launch="torchrun") by the ones
  torchrun sets. `signal_when=(ready, i, signum)` sends process i `signum` once `ready()` holds. Returns each
  process's (stdout, stderr), by group. Any failure or the timeout kills every process started here: no
  orphan survives the test."""
  os.makedirs(logs, exist_ok=True)
  base = {k: v for k, v in os.environ.items() if not k.startswith(("CODEX_NUM_PROCESSES", "CODEX_PROCESS_ID",
                                                                   "CODEX_COORDINATOR", "JAX_COORDINATOR")) and k not in (
      "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
  base.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  procs, files = [], []
  try:
    for g, (processes, devices) in enumerate(groups):
      env = {**base, "XLA_FLAGS": xla_flags(devices)}
      if processes > 1 and launch == "torchrun":  # The coordinator listens on MASTER_PORT + 1.
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port() - 1), WORLD_SIZE=str(processes),
                   LOCAL_WORLD_SIZE="1")
      elif processes > 1:
        env.update(CODEX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", CODEX_NUM_PROCESSES=str(processes))
      for i in range(processes):
        out, err = (open(os.path.join(logs, f"{g}.{i}.{kind}"), "w+") for kind in ("out", "err"))
        files.append((out, err))
        own = {} if processes == 1 else {"RANK": str(i), "LOCAL_RANK": "0"} if launch == "torchrun" else {
            "CODEX_PROCESS_ID": str(i)}
        procs.append(subprocess.Popen(command, cwd=ROOT, env={**env, **own}, stdout=out, stderr=err, text=True,
                                      start_new_session=True))
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
      if any(p.poll() not in (None, 0) for p in procs):
        break
      if signal_when is not None and signal_when[0]():
        procs[signal_when[1]].send_signal(signal_when[2])
        signal_when = None
      time.sleep(0.2)
  finally:
    for p in procs:  # Each runs in its own session: kill the process and anything it started, even if it exited.
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      p.wait()
  outputs = []
  for out, err in files:
    out.seek(0), err.seek(0)
    outputs.append((out.read(), err.read()))
    out.close(), err.close()
  failed = [i for i, p in enumerate(procs) if p.returncode != 0]
  assert not failed, f"killed after {TIMEOUT_S} s, or after another process failed; " + " | ".join(
      f"process {i} exit {procs[i].returncode}, stderr: {outputs[i][1][-2000:]}" for i in failed)
  by_group, first = [], 0
  for processes, _ in groups:
    by_group.append(outputs[first:first + processes])
    first += processes
  return by_group


def _last_json(stdout: str) -> dict:
  """The last stdout line: gloo (JAX's CPU collectives) prints its connection lines on stdout too."""
  return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  """Each of 2 processes feeds its half of one global batch; losses, gradient norms and the final
  parameters equal those of one process holding all 8 devices, for data=8 and for data=4 x tensor=2."""
  command = [sys.executable, "-m", "tests.multihost_worker", "8:1", "4:2"]
  one, two = _run_groups(command, [(1, 8), (2, 4)], str(tmp_path))
  one, two = _last_json(one[0][0]), [_last_json(out) for out, _ in two]
  assert (one["process_count"], one["devices"]) == (1, 8)
  assert [(r["process_index"], r["process_count"], r["local_devices"], r["devices"]) for r in two] == \
      [(0, 2, 4, 8), (1, 2, 4, 8)]
  for layout, want in one["results"].items():
    assert want["losses"][-1] < want["losses"][0]  # It trained.
    for got in (r["results"][layout] for r in two):
      for key in ("losses", "grad_norms", "param_sum"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=f"{layout} {key}")


def test_two_processes_launched_the_torchrun_way_join_one_runtime(tmp_path):
  command = [sys.executable, "-m", "tests.multihost_worker"]  # No layout: join, report, leave.
  two = [_last_json(out) for out, _ in _run_groups(command, [(2, 2)], str(tmp_path), launch="torchrun")[0]]
  assert [(r["process_index"], r["process_count"], r["devices"]) for r in two] == [(0, 2, 4), (1, 2, 4)]


TWO_PROCESS_RUN = {**RUN_OVERRIDES, "train.steps": 12, "checkpoint.every": 4, "eval.batches": 0, **FAST_MODEL}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """An uninterrupted 2 x 4-device `codex train` of 12 steps: (workdir, each process's (stdout, stderr))."""
  build_default_corpus()  # Once per cache dir; a no-op after that.
  root = tmp_path_factory.mktemp("two_process")
  workdir = str(root / "run")
  return workdir, _run_groups(train_command(workdir, TWO_PROCESS_RUN), [(2, 4)], str(root / "logs"))[0]


def _final_leaves(workdir: str, step: int) -> list[np.ndarray]:
  import jax
  state = verify.read_state(os.path.join(workdir, "checkpoints", str(step), "state"))
  return [np.asarray(leaf) for leaf in jax.tree.leaves(state)]


@pytest.mark.slow
def test_two_process_codex_train_checkpoints_a_verifiable_run(two_process_run):
  workdir, results = two_process_run
  summaries = [_last_json(out) for out, _ in results]
  for summary in summaries:
    assert summary["final_step"] == 12 and summary["checkpoints"] == [4, 8, 12]
  assert summaries[0]["last_loss"] == summaries[1]["last_loss"] < summaries[0]["first_loss"]
  (_, err0), (_, err1) = results
  assert "Multi-host (explicit): 2 processes, 4 local / 8 global cpu devices" in err0
  step_line = re.compile(r"\] step \d+ text_ce [\d.]+ loss ")
  assert len(step_line.findall(err0)) >= 3 and not step_line.findall(err1), "only process 0 logs the steps"
  step_dir = os.path.join(workdir, "checkpoints", "12")
  assert {"shard_0-of-2.json", "shard_1-of-2.json"} <= set(os.listdir(os.path.join(step_dir, "data")))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == list(range(1, 13))  # One writer.
  result = verify.verify(workdir)  # What `codex lineage verify WORKDIR` runs.
  assert result["ok"] and [c["step"] for c in result["checkpoints"]] == [4, 8, 12]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_on_one_step_and_the_rerun_resumes_exactly(two_process_run, tmp_path):
  """Only process 1 gets SIGTERM (its own handler used to stop it alone, leaving process 0 in the next
  collective): both checkpoint the same step and exit 0, and the rerun ends bit-identical to the
  uninterrupted run."""
  workdir, logs = str(tmp_path / "run"), str(tmp_path / "logs")
  metrics = os.path.join(workdir, "metrics.jsonl")
  ready = lambda: os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3
  results = _run_groups(train_command(workdir, TWO_PROCESS_RUN), [(2, 4)], logs, signal_when=(ready, 1, signal.SIGTERM))[0]
  summaries = [_last_json(out) for out, _ in results]
  stop = summaries[0]["final_step"]
  assert 3 <= stop < 12 and all(s["preempted"] and s["final_step"] == stop for s in summaries), summaries
  assert summaries[0]["checkpoints"][-1] == stop and f"resume from step {stop}" in results[0][1]
  resumed = [_last_json(out) for out, _ in _run_groups(train_command(workdir, TWO_PROCESS_RUN), [(2, 4)], logs)[0]]
  assert [(s["start_step"], s["final_step"]) for s in resumed] == [(stop, 12)] * 2
  for got, want in zip(_final_leaves(workdir, 12), _final_leaves(two_process_run[0], 12), strict=True):
    np.testing.assert_array_equal(got, want)
  assert verify.verify(workdir)["ok"]


def _global_ledger(workdir: str) -> dict[int, list]:
  """step -> the global batch's samples: every process's ledger file, in process order."""
  steps: dict[int, list] = {}
  for index in range(2):
    path = ledger_path(workdir, index)
    for step, samples in (read_ledger(path) if os.path.exists(path) else {}).items():
      steps.setdefault(step, []).extend(samples)
  return steps


@pytest.mark.slow
def test_a_two_process_run_resumes_on_one_process_feeding_both_data_shards(two_process_run, tmp_path):
  """The cluster lost a host after step 8: one process with all 8 devices resumes the 2-process run. The data
  stream keeps its 2 shards (each process fed one; now one feeds both), so steps 9-12 train the same samples in
  the same rows, and the losses match the uninterrupted run."""
  reference, _ = two_process_run
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "12"))
  (out, err), = _run_groups(train_command(workdir, TWO_PROCESS_RUN), [(1, 8)], str(tmp_path / "logs"))[0]
  summary = _last_json(out)
  assert (summary["start_step"], summary["final_step"]) == (8, 12)
  assert "Checkpoint 8 was written by 2 process(es); 1 now feed its 2 data shard(s)" in err
  assert "Layout changed on resume: data=8 over 8 cpu device(s), 2 process(es) -> data=8 over 8 cpu device(s), " \
         "1 process(es)" in err
  losses = lambda w: {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(w, "metrics.jsonl")))}
  got, want = losses(workdir), losses(reference)
  for step in range(9, 13):
    np.testing.assert_allclose(got[step], want[step], rtol=1e-5, err_msg=f"step {step}")
  ledger = _global_ledger(workdir)
  assert ledger == _global_ledger(reference)  # Every sample once, in the rows the 2-process run gave it.
  assert max(read_ledger(ledger_path(workdir, 1))) == 8  # Process 1's file stops where it stopped.
  assert verify.verify(workdir)["ok"]
