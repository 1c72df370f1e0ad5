"""Elastic resume: a run checkpointed on one layout resumes on another mesh or device count, its state restored
into the new shardings, and trains on as the uninterrupted run does (losses to 1e-5, the same samples)."""

import json
import os
import shutil

import numpy as np
import pytest

from codex_jax.checkpoint import lineage, verify
from codex_jax.train.ledger import ledger_path, read_ledger
from tests.helpers import RUN_OVERRIDES, run_train, trained_workdir
from tests.multihost_worker import FAST_MODEL

pytestmark = pytest.mark.slow

RUN = {**RUN_OVERRIDES, **FAST_MODEL, "train.steps": 12, "checkpoint.every": 4, "eval.batches": 0,
       "mesh.data": 4}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """12 uninterrupted steps on data=4 over 4 devices, checkpointed every 4."""
  return trained_workdir(tmp_path_factory, "elastic_reference", RUN, devices=4)[0]


def _metrics(workdir: str) -> dict[int, dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {row["step"]: row for row in map(json.loads, f)}


def _lost_after_step_8(reference: str, tmp_path) -> str:
  """The reference run as a cluster failure after step 8 leaves it: checkpoint 12 never written."""
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "12"))
  return workdir


@pytest.mark.parametrize("devices,mesh", [(4, {"data": 2, "tensor": 2}), (1, {"data": 1})],
                         ids=["data2_x_tensor2", "one_device"])
def test_a_run_resumes_on_another_layout_and_matches_the_uninterrupted_run(reference, tmp_path, devices, mesh):
  workdir = _lost_after_step_8(reference, tmp_path)
  result = run_train(workdir, {**RUN, **{f"mesh.{axis}": size for axis, size in mesh.items()}}, devices)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout)
  assert (summary["start_step"], summary["final_step"]) == (8, 12)
  assert "Layout changed on resume: data=4 over 4 cpu device(s), 1 process(es) -> " in result.stderr
  got, want = _metrics(workdir), _metrics(reference)
  assert sorted(got) == list(range(1, 13))
  for step in range(9, 13):
    np.testing.assert_allclose(got[step]["loss"], want[step]["loss"], rtol=1e-5, err_msg=f"step {step}")
  # The same samples in the same rows: each sample trained exactly once, as in the uninterrupted run.
  assert read_ledger(ledger_path(workdir)) == read_ledger(ledger_path(reference))
  records = {r["step"]: r for r in lineage.read_log(workdir) if "step" in r}
  expected = {"data": mesh.get("data", 1), "tensor": mesh.get("tensor", 1), "pipeline": 1}
  assert records[12]["layout"] == {"mesh": expected, "devices": devices, "processes": 1, "device_kind": "cpu"}
  assert records[8]["layout"]["mesh"] == {"data": 4, "tensor": 1, "pipeline": 1}
  assert verify.verify(workdir)["ok"]
