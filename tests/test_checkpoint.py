"""Checkpoint integrity and lineage: a real content root re-derived, flipped bytes, edited records, proofs, kills."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from codex_jax.checkpoint import lineage, merkle, verify
from codex_jax.checkpoint import proof as proof_lib
from codex_jax.checkpoint.errors import CheckpointIntegrityError
from codex_jax.checkpoint.files import write_files
from codex_jax.checkpoint.manager import Checkpointer
from codex_jax.config.schema import CheckpointConfig
from tests.helpers import ROOT, RUN_OVERRIDES, run_train, train_process, trained_workdir
from tests.test_merkle import spec_leaf, spec_root  # docs/checkpoints.md's hash format, written out with hashlib.

pytestmark = pytest.mark.slow

OVERRIDES = {**RUN_OVERRIDES, "train.steps": 12, "checkpoint.every": 4, "eval.every": 4,
             "checkpoint.max_to_keep": 2}


# --- a real run -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return trained_workdir(tmp_path_factory, "run", OVERRIDES)[0]


def _copy(run, tmp_path) -> str:
  dst = str(tmp_path / "copy")
  shutil.copytree(run, dst)
  return dst


def _flip(path: str, at: float = 0.5) -> None:
  data = bytearray(open(path, "rb").read())
  data[int(len(data) * at)] ^= 0x04
  with open(path, "wb") as f:
    f.write(bytes(data))


def _record(step_dir: str) -> dict:
  with open(os.path.join(step_dir, "_CHECKPOINT_METADATA")) as f:
    return json.load(f)["custom_metadata"]["lineage"]


def _lineage_cli(*args):
  return subprocess.run([sys.executable, "-m", "codex_jax", "lineage", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)


def test_retention_keeps_the_newest_and_the_chain_keeps_every_record(run):
  assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["12", "8"]
  steps = [r["step"] for r in lineage.read_log(run) if "lineage_hash" in r]
  assert steps == [4, 8, 12]
  result = _lineage_cli("verify", run, "--json")
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(result.stdout)
  assert report["chain_length"] == 3 and [c["step"] for c in report["checkpoints"]] == [8, 12]
  assert report["files_checked"] == 2
  record = _record(os.path.join(run, "checkpoints", "12"))
  assert record["eval"]["heldout_loss"] > 0 and record["manifest_hash"] and record["config_hash"]
  assert record["code_version"]["package"] and len(record["content_root"]) == 64


def test_a_third_party_rederives_the_content_root_with_orbax_and_hashlib(run):
  step_dir = os.path.join(run, "checkpoints", "12")
  state = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))
  flat = jax.tree_util.tree_flatten_with_path(state["params"])[0]
  leaves = sorted(("/".join(str(getattr(k, "key", k)) for k in keys), np.asarray(v)) for keys, v in flat)
  assert spec_root([spec_leaf(path, array) for path, array in leaves]) == _record(step_dir)["content_root"]


@pytest.mark.parametrize("relative", [
    "state/params.embedding/0.0", "state/params.layers.attention.q/.zarray", "state/_METADATA", "state/_sharding",
    "state/array_metadatas/process_0", "state/opt_state.1.0.mu.unembed/0.0", "state/step/0", "meta/metadata",
    "data/shard_0-of-1.json", "_CHECKPOINT_METADATA", "commit_success.txt",
])
def test_one_flipped_byte_anywhere_fails_verification_naming_file_and_tensor(run, tmp_path, relative):
  workdir = _copy(run, tmp_path)
  _flip(os.path.join(workdir, "checkpoints", "12", relative))
  with pytest.raises(CheckpointIntegrityError) as info:
    verify.verify(workdir)
  message = str(info.value)
  assert relative in message
  if relative.startswith("state/") and relative.count("/") == 2:
    assert f"(tensor {relative.split('/')[1].replace('.', '/')})" in message


def test_restore_refuses_a_flipped_bit_before_returning_any_array(run, tmp_path):
  workdir = _copy(run, tmp_path)
  step_dir = os.path.join(workdir, "checkpoints", "12")
  # Flip inside the compressed chunk and re-list the files, so the tensor hash itself must catch it.
  _flip(os.path.join(step_dir, "state", "params.unembed", "0.0"), at=0.9)
  write_files(step_dir)
  checkpointer = Checkpointer(workdir, CheckpointConfig())
  try:
    meta = checkpointer.read_meta(12)
    target = _target_from_metadata(step_dir)
    with pytest.raises(CheckpointIntegrityError) as info:
      checkpointer.restore(12, target, meta=meta)
  finally:
    checkpointer.close()
  assert "tensor(s) do not match their recorded hash: tensor params/unembed" in str(info.value)


def _target_from_metadata(step_dir: str, **changes):
  tree = ocp.StandardCheckpointer().metadata(os.path.join(step_dir, "state"))
  tree = getattr(getattr(tree, "item_metadata", tree), "tree", tree)
  device = jax.devices()[0]
  sharding = jax.sharding.SingleDeviceSharding(device)

  def spec(keys, leaf):
    path = merkle.leaf_path(keys)
    shape, dtype = changes.get(path, (leaf.shape, leaf.dtype))
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  return jax.tree_util.tree_map_with_path(spec, tree)


@pytest.mark.parametrize("change,expected", [
    ({"params/embedding": ((512, 32), np.float32)}, r"params/embedding was saved with shape \(512, 64\)"),
    ({"params/embedding": ((512, 64), jax.numpy.bfloat16)}, r"params/embedding was saved as float32.*bfloat16"),
])
def test_restore_refuses_another_shape_or_dtype_naming_the_tensor(run, change, expected):
  checkpointer = Checkpointer(run, CheckpointConfig())
  try:
    step_dir = os.path.join(run, "checkpoints", "12")
    with pytest.raises(CheckpointIntegrityError, match=expected):
      checkpointer.restore(12, _target_from_metadata(step_dir, **change), meta=checkpointer.read_meta(12))
  finally:
    checkpointer.close()


def _rewrite_log(workdir, edit):
  records = lineage.read_log(workdir)
  edit(records)
  with open(os.path.join(workdir, lineage.LOG_FILE), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


def test_edited_resealed_or_reordered_records_fail_naming_the_first_broken_link(run, tmp_path):
  steps = lambda records: [r for r in records if "lineage_hash" in r]
  workdir = _copy(run, tmp_path)
  _rewrite_log(workdir, lambda rs: steps(rs)[0]["eval"].update(heldout_loss=1.0))
  with pytest.raises(CheckpointIntegrityError, match="the record of step 4 was edited"):
    verify.verify(workdir)

  workdir = _copy(run, tmp_path / "b")

  def reseal(records):  # A consistent rewrite of step 4: the child's link catches it.
    record = steps(records)[0]
    record["eval"]["heldout_loss"] = 1.0
    record["lineage_hash"] = lineage.record_hash(record)
  _rewrite_log(workdir, reseal)
  with pytest.raises(CheckpointIntegrityError, match="step 8 links to parent"):
    verify.verify(workdir)

  workdir = _copy(run, tmp_path / "c")

  def swap(records):
    i, j = [k for k, r in enumerate(records) if r.get("step") in (8, 12) and "lineage_hash" in r]
    records[i], records[j] = records[j], records[i]
  _rewrite_log(workdir, swap)
  with pytest.raises(CheckpointIntegrityError, match="links to parent"):
    verify.verify(workdir)

  def forge_start(records):  # Another seed, sealed by naming the old start hash as a parent checkpoint's.
    records[0]["start"].update(seed=7, lineage_hash=records[0]["hash"])
  for name, edit, message in (
      ("forged", forge_start, r"the start has fields \['content_root', 'kind', 'lineage_hash', 'seed'\]; a start of "
                              r"kind 'init' has exactly \['content_root', 'kind', 'seed'\]"),
      ("seed", lambda records: records[0]["start"].update(seed=7), "the start record was edited"),
      ("extra", lambda records: records[0].update(note="x"), r"the start line has fields \['hash', 'note', 'start'\]")):
    workdir = _copy(run, tmp_path / f"start-{name}")
    _rewrite_log(workdir, edit)
    with pytest.raises(CheckpointIntegrityError, match=message):
      verify.verify(workdir)

  workdir = _copy(run, tmp_path / "d")  # An edited record inside the checkpoint itself.
  path = os.path.join(workdir, "checkpoints", "12", "_CHECKPOINT_METADATA")
  with open(path) as f:
    data = json.load(f)
  data["custom_metadata"]["lineage"]["manifest_hash"] = "0" * 64
  with open(path, "w") as f:
    json.dump(data, f)
  result = _lineage_cli("verify", workdir)
  assert result.returncode == 2 and "_CHECKPOINT_METADATA" in result.stderr.strip().splitlines()[-1]


def test_a_tensor_proof_verifies_without_the_checkpoint_and_binds_what_it_proves(run, tmp_path):
  """Proofs used to verify when relabelled to another tensor, re-indexed, re-counted, renamed to another root, when
  an inner node was presented as the leaf, and, with no trusted root, a made-up leaf printed "proof ok"."""
  workdir = _copy(run, tmp_path)
  proof_file = str(tmp_path / "proof.json")
  made = _lineage_cli("prove", os.path.join(workdir, "checkpoints", "12"), "--tensor=params/layers/mlp/down",
                      f"--out={proof_file}")
  assert made.returncode == 0, made.stderr[-2000:]
  shutil.rmtree(workdir)
  proof = json.load(open(proof_file))
  root = _record(os.path.join(run, "checkpoints", "12"))["content_root"]
  assert proof["root"] == root and proof["dtype"] == "float32" and proof["leaf_format"] == "codex.leaf.v2"
  ok = _lineage_cli("verify", f"--proof={proof_file}", f"--root={root}")
  assert ok.returncode == 0 and f"proof ok: params/layers/mlp/down is in content_root {root}" in ok.stdout
  unrooted = _lineage_cli("verify", f"--proof={proof_file}")
  assert unrooted.returncode == 2 and "that root is not trusted" in unrooted.stderr
  accepted = _lineage_cli("verify", f"--proof={proof_file}", "--untrusted_root_ok")
  assert accepted.returncode == 0 and "internally only, no trusted root" in accepted.stdout

  embedding = next(p for p in _record_leaves(run) if p == "params/embedding")
  inner = merkle.root([proof["leaf_hash"], proof["siblings"][0]])  # An inner node, presented as a leaf.
  forgeries = {
      "relabelled": {"tensor": embedding, "leaf_path": "embedding"},
      "relabelled, leaf hash recomputed": {"tensor": embedding, "leaf_path": "embedding", "leaf_hash": merkle.leaf_from_digests(
          "embedding", np.float32, proof["shape"], [bytes.fromhex(d) for d in proof["block_digests"]])},
      "label only": {"tensor": embedding},
      "re-indexed": {"index": proof["index"] ^ 1},
      "re-counted": {"count": proof["count"] + 2},
      "other root": {"root_name": "optimizer_root"},
      "inner node as leaf": {"leaf_hash": inner, "siblings": proof["siblings"][1:], "index": proof["index"] // 2},
      "other shape": {"shape": proof["shape"][::-1]},
      "made-up leaf": {"leaf_hash": "0" * 64},
      "a sibling changed": {"siblings": ["0" * 64, *proof["siblings"][1:]]},
  }
  for name, change in forgeries.items():  # In process: the CLI's refusal path is the one above.
    with pytest.raises(CheckpointIntegrityError, match="proof of"):
      proof_lib.verify_proof({**proof, **change}, root)
      pytest.fail(f"accepted: {name}")
  made_up = {**proof, "siblings": [], "index": 0, "count": 1}  # Consistent with its own root...
  made_up["root"] = merkle.root_from_proof(proof["leaf_hash"], 0, 1, [])
  with pytest.raises(CheckpointIntegrityError, match="that root is not trusted"):
    proof_lib.verify_proof(made_up)  # ...which nobody trusted.


def _record_leaves(run) -> dict:
  with open(os.path.join(run, "checkpoints", "12", "meta", "metadata")) as f:
    return json.load(f)["leaves"]


def test_no_checkpoint_is_written_with_a_non_finite_value(tmp_path):
  checkpointer = Checkpointer(str(tmp_path), CheckpointConfig(async_save=False))
  checkpointer.start_fresh({"kind": "init", "seed": 0, "content_root": merkle.EMPTY_ROOT})
  iterator = iter(grain.MapDataset.range(4).to_iter_dataset())
  state = {"params": {"w": np.array([1.0, np.nan], np.float32)}, "step": np.int32(1)}
  try:
    with pytest.raises(CheckpointIntegrityError, match="step 1: tensor params/w holds NaN"):
      checkpointer.save(1, state, iterator, {}, {})
  finally:
    checkpointer.close()
  assert checkpointer.all_steps() == []


# --- kills and SIGTERM, against an uninterrupted reference ----------------------------------------

def _final_state(workdir):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "12", "state"))


def _assert_same_final_state(workdir, reference):
  for got, want in zip(jax.tree.leaves(_final_state(workdir)), jax.tree.leaves(_final_state(reference)), strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _signal_after(workdir: str, rows: int, signum: int) -> tuple[subprocess.Popen, str, str]:
  """A real run in `workdir` sent `signum` once metrics.jsonl holds `rows` lines; (process, stdout, stderr)."""
  process = train_process(workdir, OVERRIDES)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= rows:
      break
    time.sleep(0.05)
  process.send_signal(signum)
  out, err = process.communicate(timeout=120)
  return process, out, err


def test_sigterm_checkpoints_the_current_step_exits_0_and_resumes_exactly(run, tmp_path):
  workdir = str(tmp_path / "run")
  process, out, err = _signal_after(workdir, 5, signal.SIGTERM)
  assert process.returncode == 0, err[-2000:]
  summary = json.loads(out)
  assert summary["preempted"] and summary["final_step"] < 12
  assert summary["checkpoints"][-1] == summary["final_step"]
  resumed = run_train(workdir, OVERRIDES)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert json.loads(resumed.stdout)["start_step"] == summary["final_step"]
  _assert_same_final_state(workdir, run)
  assert verify.verify(workdir)["ok"]


def test_ctrl_c_checkpoints_the_current_step_exits_0_and_names_the_step_a_rerun_resumes_from(tmp_path):
  """A first Ctrl-C (SIGINT) saves like SIGTERM (whose resume the test above replays exactly)."""
  workdir = str(tmp_path / "run")
  process, out, err = _signal_after(workdir, 3, signal.SIGINT)
  assert process.returncode == 0, err[-2000:]
  summary = json.loads(out)
  step = summary["final_step"]
  assert summary["preempted"] and step < 12 and summary["checkpoints"][-1] == step
  assert "Ctrl-C: will checkpoint at the next step boundary" in err
  assert f"rerun the same command to resume from step {step}" in err
  assert verify.verify(workdir)["ok"]


def test_a_torn_last_lineage_line_is_set_aside_on_resume_and_any_other_bad_line_is_named(run, tmp_path):
  """A crash in the middle of an append leaves half a line with no newline: verify names it, a resume copies
  the log to lineage.jsonl.torn, drops the half line, says so and continues; a bad line elsewhere is refused
  naming file and line."""
  workdir = _copy(run, tmp_path)
  log = os.path.join(workdir, "lineage.jsonl")
  whole = open(log, "rb").read()
  with open(log, "ab") as f:
    f.write(b'{"step": 13, "content_root": "ab')  # What a kill -9 mid-append leaves.
  lines = whole.count(b"\n") + 1
  with pytest.raises(CheckpointIntegrityError, match=rf"lineage.jsonl:{lines}: not a JSON record .* has no newline"):
    verify.verify(workdir)
  resumed = run_train(workdir, {**OVERRIDES, "train.steps": 13})  # An allowed change: one more step.
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "its last line was torn by a crash in the middle of an append; dropped" in resumed.stderr
  assert open(log + ".torn", "rb").read().startswith(whole) and open(log, "rb").read().startswith(whole)
  assert verify.verify(workdir)["ok"] and json.loads(resumed.stdout)["final_step"] == 13
  broken = whole.split(b"\n")
  broken[1] = b"not json"
  open(log, "wb").write(b"\n".join(broken))
  with pytest.raises(CheckpointIntegrityError, match=r"lineage.jsonl:2: not a JSON record \(Expecting value\)$"):
    verify.verify(workdir)


def test_a_deleted_or_edited_log_fails_verify_and_a_resume_refuses_to_extend_it(run, tmp_path):
  """`verify` used to print "lineage ok: 0 record(s)" without the log, and a resume appended to an edited one."""
  deleted = _copy(run, tmp_path / "deleted")
  os.remove(os.path.join(deleted, "lineage.jsonl"))
  with pytest.raises(CheckpointIntegrityError, match="lineage.jsonl: missing or empty. The checkpoints' own records"):
    verify.verify(deleted)
  result = run_train(deleted, {**OVERRIDES, "train.steps": 13})
  assert result.returncode == 2 and "lineage.jsonl: missing or empty, while checkpoint 12 exists" in (
      result.stderr.strip().splitlines()[-1])
  assert not os.path.exists(os.path.join(deleted, "lineage.jsonl"))  # Nothing started a new chain.
  edited = _copy(run, tmp_path / "edited")
  _rewrite_log(edited, lambda rs: next(r for r in rs if r.get("step") == 4 and "lineage_hash" in r)["eval"].update(
      heldout_loss=1.0))
  before = open(os.path.join(edited, "lineage.jsonl"), "rb").read()
  result = run_train(edited, {**OVERRIDES, "train.steps": 13})
  assert result.returncode == 2 and "the record of step 4 was edited" in result.stderr.strip().splitlines()[-1]
  assert open(os.path.join(edited, "lineage.jsonl"), "rb").read() == before  # Refused, not extended.


def test_re_seeding_instead_of_restoring_the_rng_changes_the_state_hash(run):
  """Negative control for the resume tests: they compare every leaf, the RNG key included."""
  from codex_jax.checkpoint.manager import roots, state_leaf_hashes
  state = _final_state(run)
  reseeded = {**state, "rng": np.asarray(jax.random.PRNGKey(12345))}
  same, other = roots(state_leaf_hashes(state)), roots(state_leaf_hashes(reseeded))
  assert same["content_root"] == other["content_root"] and same["extra_root"] != other["extra_root"]


def test_saving_a_step_that_exists_is_refused(run, tmp_path):
  workdir = _copy(run, tmp_path)
  checkpointer = Checkpointer(workdir, CheckpointConfig(async_save=False))
  meta = checkpointer.read_meta(12)
  state = _final_state(workdir)
  iterator = iter(grain.MapDataset.range(4).to_iter_dataset())
  try:
    with pytest.raises(CheckpointIntegrityError, match="checkpoints/12 already exists: a committed step is never"):
      checkpointer.save(12, state, iterator, {k: v for k, v in meta.items() if k not in ("leaves", "lineage")}, {})
  finally:
    checkpointer.close()
  assert verify.verify(workdir)["ok"]  # The committed step 12 is untouched.


def test_three_kills_one_during_an_async_save_one_during_restore_and_compile_still_end_bit_identical(run, tmp_path):
  workdir = str(tmp_path / "run")
  checkpoints = os.path.join(workdir, "checkpoints")

  def kill_when(ready, timeout=300, poll=0.01):
    process = train_process(workdir, OVERRIDES)
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not ready():
      time.sleep(poll)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.communicate()

  # 1: while the second save (step 8) is still in its temporary directory.
  saving_8 = lambda: os.path.isdir(checkpoints) and any(name.startswith("8.") for name in os.listdir(checkpoints))
  kill_when(saving_8, poll=0.002)
  committed = Checkpointer(workdir, CheckpointConfig())
  try:
    assert set(committed.all_steps()) <= {4, 8}  # A partial save is never listed (8 only once committed).
  finally:
    committed.close()
  started = time.time()
  kill_when(lambda: time.time() - started > 4)  # 2: early in the restart: setup, restore or compile.
  started = time.time()
  kill_when(lambda: time.time() - started > 8)  # 3: later in the next restart.
  resumed = run_train(workdir, OVERRIDES)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  _assert_same_final_state(workdir, run)
  assert verify.verify(workdir)["ok"]


def test_consecutive_bad_steps_stop_the_run_with_a_clear_error(tmp_path):
  # A learning rate of 1e30 gives finite losses but updates 1e30 times the weights: the update size, not the loss,
  # refuses them (such a step used to be applied), so the weights stay those of the last good step.
  result = run_train(str(tmp_path / "run"), {**OVERRIDES, "optimizer.learning_rate": 1e30, "train.steps": 12,
                                             "train.max_consecutive_bad": 3, "checkpoint.every": 100})
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert re.search(r"step \d+: 3 consecutive steps skipped as numerically bad", last) and "train.max_consecutive_bad=3" in last
  loss, ratio = re.search(r"last loss (\S+), .* update / weights (\S+) ", last).groups()
  assert math.isfinite(float(loss)) and float(ratio) > 1e20


def test_a_background_write_error_surfaces_at_the_next_save_and_the_step_is_never_listed(tmp_path, monkeypatch):
  import errno

  from orbax.checkpoint._src.path import atomicity
  real_rename = atomicity.async_path.rename

  async def full_disk(src, dst):
    if str(dst).endswith("/2"):
      raise OSError(errno.ENOSPC, "No space left on device", str(dst))
    return await real_rename(src, dst)

  monkeypatch.setattr(atomicity.async_path, "rename", full_disk)
  workdir = str(tmp_path)
  checkpointer = Checkpointer(workdir, CheckpointConfig(async_save=True, max_to_keep=5))
  checkpointer.start_fresh({"kind": "init", "seed": 0, "content_root": merkle.EMPTY_ROOT})
  iterator = iter(grain.MapDataset.range(4).to_iter_dataset())
  state = lambda v: {"params": {"w": np.full(3, v, np.float32)}, "step": np.int32(v)}
  try:
    checkpointer.save(1, state(1), iterator, {}, {})
    checkpointer.save(2, state(2), iterator, {}, {})  # Fails in the background writer.
    with pytest.raises(Exception, match="No space left on device"):
      checkpointer.save(3, state(3), iterator, {}, {})
    assert 2 not in checkpointer.all_steps()
    checkpointer.save(3, state(3), iterator, {}, {})  # The disk has room again: the next save is valid.
  finally:
    checkpointer.close()
  assert checkpointer.all_steps() == [1, 3]
  assert [c["step"] for c in verify.verify(workdir)["checkpoints"]] == [1, 3]


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_deleted_or_truncated_file_is_named(run, tmp_path, damage):
  workdir = _copy(run, tmp_path)
  path = os.path.join(workdir, "checkpoints", "12", "state", "params.feature_in", "0.0")
  if damage == "delete":
    os.remove(path)
  else:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(CheckpointIntegrityError, match=r"params.feature_in/0.0 \(tensor params/feature_in\)"):
    verify.verify(workdir)


def test_a_step_killed_right_after_its_commit_still_has_its_file_hashes(tmp_path):
  """Per-file hashes used to be written at the next save, so a `kill -9` just after a commit left a step whose
  `.zarray` could be edited unseen. They are now written inside the commit (files.json before the rename)."""
  workdir = str(tmp_path / "run")
  step_dir = os.path.join(workdir, "checkpoints", "4")
  process = train_process(workdir, OVERRIDES)
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None and not os.path.isdir(step_dir):
    time.sleep(0.002)
  process.send_signal(signal.SIGKILL)
  process.communicate()
  assert os.path.isfile(os.path.join(step_dir, "files.json"))  # Committed, so listed: no later save needed.
  zarray = os.path.join(step_dir, "state", "params.embedding", ".zarray")
  header = json.load(open(zarray))
  json.dump(header, open(zarray, "w"), indent=4)  # Same array, other bytes: no tensor hash sees it.
  with pytest.raises(CheckpointIntegrityError, match=r"params.embedding/.zarray \(tensor params/embedding\) changed"):
    verify.verify(workdir)
  os.remove(os.path.join(step_dir, "files.json"))
  with pytest.raises(CheckpointIntegrityError, match="checkpoints/4/files.json is missing"):
    verify.verify(workdir)


def _tiny_run(workdir: str, seed: int, steps: list[int]) -> None:
  checkpointer = Checkpointer(workdir, CheckpointConfig(async_save=False, max_to_keep=5))
  checkpointer.start_fresh({"kind": "init", "seed": seed, "content_root": merkle.EMPTY_ROOT})
  iterator = iter(grain.MapDataset.range(4).to_iter_dataset())
  try:
    for step in steps:
      checkpointer.save(step, {"params": {"w": np.full(3, step + seed, np.float32)}, "step": np.int32(step)},
                        iterator, {}, {})
  finally:
    checkpointer.close()


def test_the_checkpoints_own_records_expose_a_swap_without_the_log(tmp_path):
  """With lineage.jsonl deleted, `verify` used to say ok, and a checkpoint swapped in from another run passed."""
  ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
  _tiny_run(ours, 0, [1, 2, 3])
  _tiny_run(theirs, 1, [1, 2, 3])
  assert verify.verify(ours)["ok"]
  os.remove(os.path.join(ours, lineage.LOG_FILE))
  with pytest.raises(CheckpointIntegrityError, match=r"lineage.jsonl: missing or empty. The checkpoints' own records "
                                                     r"link from step 1 to 3, but .* the run's start"):
    verify.verify(ours)
  shutil.rmtree(os.path.join(ours, "checkpoints", "2"))
  shutil.copytree(os.path.join(theirs, "checkpoints", "2"), os.path.join(ours, "checkpoints", "2"))
  with pytest.raises(CheckpointIntegrityError, match="step 2's record links to parent .* the checkpoint before it "
                                                     r"\(step 1\) is .*: a checkpoint was swapped in or removed"):
    verify.verify(ours)
  shutil.rmtree(os.path.join(ours, "checkpoints", "2"))  # Removed from the middle: retention never does that.
  with pytest.raises(CheckpointIntegrityError, match="step 3's record links to parent"):
    verify.verify(ours)


def test_every_config_the_run_ran_under_is_kept_so_each_records_config_hash_re_derives(run, tmp_path):
  """config.json is rewritten by an allowed change on resume; older records' config hashes used to be lost."""
  workdir = _copy(run, tmp_path)
  before = _record(os.path.join(workdir, "checkpoints", "12"))["config_hash"]
  resumed = run_train(workdir, {**OVERRIDES, "train.steps": 13})
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  after = _record(os.path.join(workdir, "checkpoints", "13"))["config_hash"]
  assert before != after and sorted(os.listdir(os.path.join(workdir, "configs"))) == sorted(
      [before + ".json", after + ".json"])
  assert verify.verify(workdir)["ok"]
  old = os.path.join(workdir, "configs", before + ".json")
  config = json.load(open(old))
  config["train"]["steps"] = 99
  with open(old, "w") as f:
    json.dump(config, f)
  with pytest.raises(CheckpointIntegrityError, match=rf"configs/{before}.json: hashes to .* the config was edited"):
    verify.verify(workdir)
  os.remove(old)
  with pytest.raises(CheckpointIntegrityError, match=r"the config step 4 ran under cannot be read"):
    verify.verify(workdir)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="needs root to mount a small tmpfs")
def test_a_full_disk_stops_the_run_in_a_few_lines_and_a_rerun_elsewhere_resumes(tmp_path):
  """A full disk used to print dozens of tracebacks (and could hang on tensorboardX's dead writer thread)."""
  disk = tmp_path / "disk"
  disk.mkdir()
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(disk)], check=True)
  try:
    result = run_train(str(disk / "run"), {**OVERRIDES, "train.steps": 30, "checkpoint.every": 5})
    shutil.copytree(disk / "run", tmp_path / "run")
  finally:
    subprocess.run(["umount", str(disk)], check=True)
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert "Traceback" not in result.stderr and len(lines) < 60, result.stderr[-3000:]
  [error] = [line for line in lines if line.startswith("codex train: error:")]
  assert "No space left on device" in error, error
  workdir = str(tmp_path / "run")
  committed = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert committed and verify.verify(workdir)["ok"]
  resumed = run_train(workdir, {**OVERRIDES, "train.steps": 30, "checkpoint.every": 5})
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert json.loads(resumed.stdout)["start_step"] == committed[-1] and verify.verify(workdir)["ok"]
