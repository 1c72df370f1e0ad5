"""launch/: the SLURM batch script (run for real with a stand-in `srun`), the GKE JobSet manifests and the
Dockerfile, each checked against the configs and the package they launch."""

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time

import pytest
import yaml

from codex_jax.config import load as config_load
from codex_jax.data.default_corpus.build import build_default_corpus
from codex_jax.parallel.distributed import detect
from tests.helpers import ROOT, experiment_module
from tests.test_multihost import TWO_PROCESS_RUN, _free_port
from tests.xla_flags import xla_flags

LAUNCH = os.path.join(ROOT, "launch")
SBATCH = os.path.join(LAUNCH, "slurm", "train.sbatch")
MANIFESTS = [os.path.join(LAUNCH, "gke", name) for name in ("jobset-v5p.yaml", "jobset-v5p-multislice.yaml")]

# `srun` for one machine: SLURM_NTASKS copies of the command with the variables srun gives each task, and
# the signals srun forwards (TERM here) passed on to every task.
FAKE_SRUN = """#!/bin/bash
while [[ $1 == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_STEP_NODELIST=localhost SLURM_STEP_NUM_NODES=1 "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
status=0
for pid in "${pids[@]}"; do
  wait "$pid"; s=$?
  while kill -0 "$pid" 2>/dev/null; do wait "$pid"; s=$?; done
  (( s != 0 )) && status=$s
done
exit $status
"""


def test_the_batch_script_parses():
  assert subprocess.run(["bash", "-n", SBATCH], capture_output=True, text=True).returncode == 0
  text = open(SBATCH).read()
  assert "--signal=B:USR1@" in text and "scontrol requeue" in text and "srun " in text


def _stand_ins(folder) -> str:
  """A PATH with stand-in `srun` and `scontrol` (which logs its arguments to scontrol.log)."""
  os.makedirs(folder, exist_ok=True)
  for name, body in (("srun", FAKE_SRUN), ("scontrol", f'#!/bin/bash\necho "$@" >> {folder}/scontrol.log\n')):
    path = os.path.join(folder, name)
    with open(path, "w") as f:
      f.write(body)
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
  return f"{folder}:{os.environ['PATH']}"


def _submit(workdir: str, bin_dir: str, usr1_after_rows: int | None = None) -> tuple[str, list[dict]]:
  """Runs the batch script as SLURM would (2 tasks on this host); USR1 once metrics.jsonl has the rows."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("CODEX_", "JAX_COORDINATOR", "SLURM_"))}
  env.update(PATH=_stand_ins(bin_dir), SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="1",
             JAX_COORDINATOR_PORT=str(_free_port()), JAX_LOCAL_DEVICE_IDS="", JAX_PLATFORMS="cpu",
             XLA_FLAGS=xla_flags(4), WORKDIR=workdir, CONFIG="experiments/codex.py:tiny",
             CODEX=os.path.join(os.path.dirname(sys.executable), "codex"))
  flags = ["--json", *(f"--config.{k}={v}" for k, v in TWO_PROCESS_RUN.items())]
  process = subprocess.Popen(["bash", SBATCH, *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  try:
    deadline = time.monotonic() + 240
    while usr1_after_rows and process.poll() is None and time.monotonic() < deadline:
      if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= usr1_after_rows:
        process.send_signal(signal.SIGUSR1)  # What --signal=B:USR1@300 sends the batch shell.
        break
      time.sleep(0.1)
    out, err = process.communicate(timeout=max(1, deadline - time.monotonic()))
  finally:
    try:
      os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  summaries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  assert process.returncode == 0, err[-3000:]
  return err, summaries


@pytest.mark.slow
def test_the_batch_script_runs_checkpoints_on_usr1_requeues_and_the_requeued_job_finishes(tmp_path):
  """The script itself, under stand-in srun and scontrol: 2 tasks join through JAX's SLURM detection;
  USR1 near the time limit stops both on one step, checkpointed; the job requeues itself; the requeued
  job resumes there and finishes without requeueing."""
  build_default_corpus()
  workdir, bin_dir = str(tmp_path / "run"), str(tmp_path / "bin")
  err, summaries = _submit(workdir, bin_dir, usr1_after_rows=3)
  assert "Multi-host (slurm): 2 processes, 4 local / 8 global cpu devices" in err
  stop = summaries[0]["final_step"]
  assert len(summaries) == 2 and all(s["preempted"] and s["final_step"] == stop < 12 for s in summaries)
  assert open(os.path.join(bin_dir, "scontrol.log")).read() == "requeue 4242\n"
  _, summaries = _submit(workdir, bin_dir)
  assert [(s["start_step"], s["final_step"], s["preempted"]) for s in summaries] == [(stop, 12, False)] * 2
  assert open(os.path.join(bin_dir, "scontrol.log")).read() == "requeue 4242\n"  # Not requeued again.


def _jobset(path: str) -> dict:
  with open(path) as f:
    return yaml.safe_load(f)


def _flag(command: list[str], name: str) -> str:
  values = [arg.split("=", 1)[1] for arg in command if arg.startswith(f"--{name}=")]
  assert len(values) == 1, (name, command)
  return values[0]


@pytest.mark.parametrize("path", MANIFESTS, ids=os.path.basename)
def test_jobset_manifests_name_one_run_and_ask_for_the_chips_its_config_is_laid_out_for(path):
  jobset = _jobset(path)
  assert (jobset["apiVersion"], jobset["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
  name = jobset["metadata"]["name"]
  (replicated,) = jobset["spec"]["replicatedJobs"]
  job = replicated["template"]["spec"]
  pod = job["template"]["spec"]
  (container,) = pod["containers"]
  command = container["command"]
  assert command[:2] == ["codex", "train"]
  config, workdir = _flag(command, "config"), _flag(command, "workdir")
  assert os.path.basename(workdir) == name  # The run directory is named for the JobSet.
  mounts = {m["mountPath"] for m in container["volumeMounts"]}
  assert any(workdir.startswith(mount + "/") for mount in mounts), "the workdir is on the shared volume"
  variant = config.split(":")[1]
  hosts = job["parallelism"] * replicated["replicas"]
  chips_per_host = container["resources"]["limits"]["google.com/tpu"]
  topology = [int(n) for n in pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"].split("x")]
  assert job["parallelism"] == job["completions"] and job["parallelism"] * chips_per_host == \
      topology[0] * topology[1] * topology[2], "one pod per host of the slice"
  assert hosts * chips_per_host == experiment_module().TARGET_DEVICES[variant]
  assert config.split(":")[0] == "experiments/codex.py"
  raw = config_load.to_dict(experiment_module().get_config(variant))
  cfg = config_load.load(raw, num_devices=hosts * chips_per_host, num_processes=hosts)
  assert cfg.mesh.data * cfg.mesh.tensor * cfg.mesh.pipeline == hosts * chips_per_host
  assert pod["terminationGracePeriodSeconds"] >= 300  # Time to checkpoint after the eviction's SIGTERM.
  assert re.search(f"jobs/{name}-{replicated['name']}-0", open(path).read()), "the logs command names the job"


def test_the_gke_tpu_webhook_environment_is_left_to_jax_own_tpu_detection():
  webhook = {"TPU_WORKER_ID": "3", "TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3", "MEGASCALE_NUM_SLICES": "2",
             "MEGASCALE_SLICE_ID": "1", "MEGASCALE_COORDINATOR_ADDRESS": "codex-slice-0-0.codex",
             "TPU_SKIP_MDS_QUERY": "1"}
  assert detect(webhook, on_cloud_tpu=True).source == "tpu"
  assert detect({"PATH": "/usr/bin"}) is None  # A plain machine: one process.


def test_the_dockerfile_copies_what_exists_and_installs_the_chosen_jax():
  text = open(os.path.join(LAUNCH, "docker", "Dockerfile")).read()
  for line in re.findall(r"^COPY (.+)$", text, re.M):
    for source in line.split()[:-1]:
      assert os.path.exists(os.path.join(ROOT, source)), source
  assert re.search(r"^ARG JAX_EXTRA=cuda12$", text, re.M) and '"jax[${JAX_EXTRA}]"' in text
  for extra in ("cuda12", "tpu"):
    assert f"--build-arg JAX_EXTRA={extra}" in text
  assert "FROM python:3.11" in text
