"""Joins JAX's multi-controller runtime (`jax.distributed`) when the environment says this is one of many processes.

Called once, by `codex train`, before anything touches a device. Where the process count comes from,
first match wins:

  explicit   CODEX_NUM_PROCESSES, CODEX_PROCESS_ID and a coordinator "host:port" in
             CODEX_COORDINATOR_ADDRESS (or JAX_COORDINATOR_ADDRESS, which jax reads itself). jax 0.10 has
             no variables of its own for the count and the id. CODEX_NUM_PROCESSES=1 forces one process.
  slurm      SLURM_JOB_ID with SLURM_NTASKS > 1, inside an `srun` step: JAX's own SLURM detection
             (coordinator on the step's first node, one process per task, one GPU per task unless
             JAX_LOCAL_DEVICE_IDS lists more).
  open mpi   OMPI_COMM_WORLD_SIZE > 1 (`mpirun`): JAX's own Open MPI detection.
  torchrun   WORLD_SIZE > 1 with RANK, MASTER_ADDR and MASTER_PORT (torchrun, torch.distributed.launch, and
             launchers that mimic them): process RANK of WORLD_SIZE, the coordinator on MASTER_ADDR at
             MASTER_PORT + 1 (torchrun's own store holds MASTER_PORT; CODEX_COORDINATOR_PORT overrides),
             and with LOCAL_WORLD_SIZE > 1 one accelerator per process, LOCAL_RANK's.
  tpu        a Cloud TPU VM (GCE metadata or GKE's TPU_WORKER_HOSTNAMES): JAX's own TPU detection;
             a one-host slice simply becomes process 0 of 1.
  none       one process: nothing to do.

Every process then feeds its own rows of the global batch (`runtime/feed.py`) and only process 0 logs
at INFO: the others keep warnings and errors.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from absl import logging

from codex_jax.config.errors import ConfigError

EXPLICIT = ("CODEX_COORDINATOR_ADDRESS", "CODEX_NUM_PROCESSES", "CODEX_PROCESS_ID")
TORCHRUN = ("RANK", "MASTER_ADDR", "MASTER_PORT")  # Beside WORLD_SIZE > 1.
SLURM_STEP = ("SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")  # What JAX's SLURM detection reads.


@dataclasses.dataclass(frozen=True)
class Launch:
  """How to call jax.distributed.initialize: `kwargs` for it, and which environment asked (for the log)."""
  source: str
  kwargs: dict[str, Any]


def detect(environ: Mapping[str, str], on_cloud_tpu: bool = False) -> Launch | None:
  """The launch the environment asks for, None for a single process; ConfigError naming bad variables."""
  if any(name in environ for name in EXPLICIT):
    return _explicit(environ)
  slurm_tasks = _int(environ, "SLURM_NTASKS", minimum=1) if "SLURM_JOB_ID" in environ else None
  if slurm_tasks is not None and slurm_tasks > 1:
    missing = [name for name in SLURM_STEP if name not in environ]
    if missing:
      raise ConfigError([f"SLURM job {environ['SLURM_JOB_ID']} has SLURM_NTASKS={slurm_tasks} but {missing} "
                         f"are unset: start every task with `srun codex train ...`, or set CODEX_NUM_PROCESSES=1 "
                         f"for a single process"])
    return Launch("slurm", {"cluster_detection_method": "slurm"})
  if "OMPI_MCA_orte_hnp_uri" in environ and _int(environ, "OMPI_COMM_WORLD_SIZE", minimum=1, default=1) > 1:
    return Launch("open mpi", {"cluster_detection_method": "ompi"})
  if _int(environ, "WORLD_SIZE", minimum=1, default=1) > 1:
    return _torchrun(environ)
  hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES")
  if on_cloud_tpu and (hosts is not None or "TPU_SKIP_MDS_QUERY" not in environ):
    return Launch("tpu", {})
  if "JAX_COORDINATOR_ADDRESS" in environ:
    raise ConfigError([f"JAX_COORDINATOR_ADDRESS={environ['JAX_COORDINATOR_ADDRESS']} is set but no cluster was "
                       f"detected: also set CODEX_NUM_PROCESSES and CODEX_PROCESS_ID (or unset it)"])
  return None


def _explicit(environ: Mapping[str, str]) -> Launch | None:
  problems = []
  count = _int(environ, "CODEX_NUM_PROCESSES", minimum=1, problems=problems)
  if count is None and not problems:
    problems.append("CODEX_NUM_PROCESSES is unset: set it with CODEX_PROCESS_ID and CODEX_COORDINATOR_ADDRESS")
  if count == 1 and not problems:
    return None  # One process on purpose (also the way to opt out of SLURM / TPU detection).
  process_id = _int(environ, "CODEX_PROCESS_ID", minimum=0, problems=problems)
  if process_id is None and "CODEX_PROCESS_ID" not in environ:
    problems.append("CODEX_PROCESS_ID is unset: each process needs its id, 0 .. CODEX_NUM_PROCESSES-1")
  if process_id is not None and count is not None and process_id >= count:
    problems.append(f"CODEX_PROCESS_ID={process_id}: must be below CODEX_NUM_PROCESSES={count}")
  name = "CODEX_COORDINATOR_ADDRESS" if "CODEX_COORDINATOR_ADDRESS" in environ else "JAX_COORDINATOR_ADDRESS"
  address = environ.get(name)
  host, _, port = (address or "").rpartition(":")
  if address is None:
    problems.append("CODEX_COORDINATOR_ADDRESS is unset: process 0's host:port, the same on every process")
  elif not host or not port.isdigit() or not 0 < int(port) < 65536:
    problems.append(f"{name}={address!r}: expected host:port, e.g. 10.0.0.1:1234")
  if problems:
    raise ConfigError(problems)
  return Launch("explicit", {"coordinator_address": address, "num_processes": count, "process_id": process_id})


def _torchrun(environ: Mapping[str, str]) -> Launch:
  problems = [f"{name} is unset: WORLD_SIZE={environ['WORLD_SIZE']} (a torchrun-style launch) needs RANK, MASTER_ADDR "
              "and MASTER_PORT; or set CODEX_NUM_PROCESSES=1 for a single process" for name in TORCHRUN
              if name not in environ]
  count = _int(environ, "WORLD_SIZE", minimum=1)
  rank = _int(environ, "RANK", minimum=0, problems=problems)
  master_port = _int(environ, "MASTER_PORT", minimum=1, problems=problems)
  port = _int(environ, "CODEX_COORDINATOR_PORT", minimum=1, problems=problems)
  port = port or (master_port + 1 if master_port else None)
  local_count = _int(environ, "LOCAL_WORLD_SIZE", minimum=1, default=1, problems=problems)
  local_rank = _int(environ, "LOCAL_RANK", minimum=0, default=0, problems=problems)
  if rank is not None and rank >= count:
    problems.append(f"RANK={rank}: must be below WORLD_SIZE={count}")
  if port is not None and port >= 65536:
    problems.append(f"coordinator port {port} (MASTER_PORT + 1): above 65535; set CODEX_COORDINATOR_PORT")
  if problems:
    raise ConfigError(problems)
  kwargs = {"coordinator_address": f"{environ['MASTER_ADDR']}:{port}", "num_processes": count, "process_id": rank}
  if local_count and local_count > 1:
    kwargs["local_device_ids"] = [local_rank]
  return Launch("torchrun", kwargs)


def _int(environ: Mapping[str, str], name: str, minimum: int, default: int | None = None,
         problems: list[str] | None = None) -> int | None:
  """An integer variable >= minimum; a bad value is a problem naming the variable (raised unless collected)."""
  text = environ.get(name)
  if text is None:
    return default
  try:
    value = int(text)
  except ValueError:
    value = None
  if value is not None and value >= minimum:
    return value
  problem = f"{name}={text!r}: expected an integer >= {minimum}"
  if problems is None:
    raise ConfigError([problem])
  problems.append(problem)
  return None


def _on_cloud_tpu() -> bool:
  """Whether jax found a Cloud TPU VM when it was imported (it sets this flag itself; no public API)."""
  from jax._src import cloud_tpu_init
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def initialize(environ: Mapping[str, str] | None = None) -> Launch | None:
  """Joins the multi-process runtime if the environment asks for it; must run before any device is used."""
  import jax

  environ = os.environ if environ is None else environ
  launch = detect(environ, on_cloud_tpu=_on_cloud_tpu())
  if launch is None or jax.distributed.is_initialized():
    return launch
  if jax.config.jax_cpu_collectives_implementation is None:
    # CPU processes (tests, CPU clusters) need a cross-process collective library; GPUs and TPUs ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**launch.kwargs)
  except Exception as e:
    where = ", ".join(f"{k}={v}" for k, v in launch.kwargs.items()) or "auto-detected"
    raise RuntimeError(f"could not join the JAX distributed runtime ({launch.source}: {where}): {e}") from e
  if jax.process_index() == 0:
    logging.info("Multi-host (%s): %d processes, %d local / %d global %s devices", launch.source,
                 jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)
  else:
    logging.set_verbosity(logging.WARNING)  # Process 0 logs; the others only warn and fail.
  return launch
