"""Evaluation: exact task scoring on known logits, task-file errors, selection, snapshots, averaging, lineage."""

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codex_jax.checkpoint import average, lineage, verify
from codex_jax.checkpoint.errors import CheckpointIntegrityError
from codex_jax.checkpoint.load import load_step
from codex_jax.config.schema import CheckpointConfig
from codex_jax.eval import score, selection
from codex_jax.eval.tasks import TaskError, load_task
from tests.helpers import RUN_OVERRIDES, trained_workdir

V = 5  # Vocabulary of the hand-made model: token = ord(char) - ord("a").


def _encode(text):
  return [ord(c) - ord("a") for c in text]


def _write(path, rows):
  with open(path, "w") as f:
    f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
  return str(path)


def _expected_ll(table, context, continuation):
  """sum log p(continuation | context) when the logits at a position are table[input token]."""
  tokens = _encode(context + continuation)
  logp = table - np.log(np.exp(table).sum(-1, keepdims=True))
  return sum(logp[tokens[i - 1], tokens[i]] for i in range(len(context), len(tokens)))


# --- scoring -------------------------------------------------------------------------------------

def test_scoring_a_hand_made_task_on_known_logits_gives_exactly_the_expected_probability(tmp_path):
  rng = np.random.default_rng(0)
  table = rng.normal(size=(V, V)).astype(np.float32) * 2
  mc = load_task(_write(tmp_path / "hand.jsonl", [
      {"context": "ab", "choices": ["c", "dd", "e"], "gold": 1},
      {"context": "cab", "choices": ["ae", "b"], "gold": 0}]))
  cloze = load_task(_write(tmp_path / "line.jsonl", [{"context": "abc", "continuation": "de"}]))
  scores = jax.jit(lambda batch: score.token_scores(jnp.asarray(table)[batch["inputs"]], batch["targets"]))
  got = score.score_tasks([mc, cloze], _encode, lambda b: jax.device_get(scores(b)), rows=2, seq_len=8,
                          feature_dim=0)

  probs, accs, norms, bpbs = [], [], [], []
  for example in mc.examples:
    ll = np.array([_expected_ll(table, example.context, c) for c in example.choices], np.float64)
    probs.append(np.exp(ll[example.gold]) / np.exp(ll).sum())
    accs.append(np.argmax(ll) == example.gold)
    norms.append(np.argmax(ll / [len(c) for c in example.choices]) == example.gold)
    bpbs.append(-ll[example.gold] / (math.log(2) * len(example.choices[example.gold])))
  np.testing.assert_allclose(got["task/hand/prob"], np.mean(probs), rtol=1e-6)
  np.testing.assert_allclose(got["task/hand/bpb"], np.mean(bpbs), rtol=1e-6)
  assert got["task/hand/acc"] == np.mean(accs) and got["task/hand/acc_norm"] == np.mean(norms)
  ll = _expected_ll(table, "abc", "de")
  np.testing.assert_allclose(got["task/line/prob"], np.exp(ll), rtol=1e-5)
  greedy = all(np.argmax(table[t]) == n for t, n in zip(_encode("cd"), _encode("de"), strict=True))
  assert got["task/line/acc"] == float(greedy)


def test_packing_puts_several_requests_in_a_row_and_scores_only_continuations():
  requests = [score.Request(np.array([1, 2], np.int32), np.array([3], np.int32)),
              score.Request(np.array([4], np.int32), np.array([0, 1], np.int32))]
  (batch,) = score.pack(requests, rows=1, seq_len=8, feature_dim=0)
  assert batch["inputs"][0, :5].tolist() == [1, 2, 4, 0, 0] and batch["targets"][0, :5].tolist() == [2, 3, 0, 1, 0]
  assert batch["segment_ids"][0, :5].tolist() == [1, 1, 2, 2, 0]
  assert batch["request"][0, :5].tolist() == [-1, 0, 1, 1, -1]  # Position 1 predicts 3; 2 and 3 predict 0, 1.


@pytest.mark.parametrize("line, message", [
    ("not json", ":2: not JSON"),
    ({"context": "a", "choices": ["b", "c"], "gold": 2}, ":2: gold: expected an index into the 2 choices"),
    ({"context": "a", "choices": ["b"], "gold": 0}, ":2: choices: expected a list of at least 2"),
    ({"context": "", "continuation": "b"}, ":2: context: expected a non-empty string"),
    ({"context": "a", "continuation": "b", "label": 1}, ":2: a cloze line has keys"),
    ({"context": "a", "continuation": "b"}, ":2: a task file holds one kind of line"),
    ({"prompt": "a"}, ":2: expected a multiple-choice line"),
])
def test_a_bad_task_line_is_named_by_file_line_and_field(tmp_path, line, message):
  path = _write(tmp_path / "bad.jsonl", [{"context": "a", "choices": ["b", "c"], "gold": 0}, line])
  with pytest.raises(TaskError, match=f"bad.jsonl{message}"):
    load_task(path)


# --- selection and snapshots ---------------------------------------------------------------------

def test_a_missing_task_folder_is_refused_naming_the_key():
  from codex_jax.eval.suite import task_folders
  with pytest.raises(TaskError, match="config.eval.tasks: '/no/such/tasks' is neither 'builtin' nor a folder"):
    task_folders("/no/such/tasks", images=False)


def test_selection_keeps_a_trending_task_and_drops_a_flat_noisy_and_a_saturated_one():
  steps = list(range(100, 900, 100))
  noise = np.random.default_rng(1).normal(size=8) * 0.01
  history = {"task/trend/bpb": (steps, list(3.0 - 0.1 * np.arange(8) + noise)),
             "task/flat/bpb": (steps, list(2.0 + noise * 5)),
             "task/done/bpb": (steps, list(3.0 - 0.1 * np.arange(8) + noise)),
             "task/done/acc": (steps, [0.9, 0.95, 0.97, 0.98, 0.99, 0.99, 0.99, 1.0])}
  chosen = selection.select(history, ["trend", "flat", "done"])
  assert chosen["trend"]["informative"] and chosen["trend"]["snr"] > 10
  assert not chosen["flat"]["informative"] and chosen["flat"]["weight"] == 0
  assert not chosen["done"]["informative"] and chosen["done"]["saturation"] > 0.95
  import json
  json.dumps(chosen)  # `codex eval` writes it: plain Python numbers and bools, no numpy scalars.
  summary = selection.summary({"task/trend/acc": 0.4, "task/flat/acc": 0.9, "task/done/acc": 1.0}, chosen)
  assert summary["summary/acc"] == pytest.approx(0.4)  # Only the informative task counts.


def test_snapshots_end_at_every_eval_step_and_retention_keeps_them():
  cfg = CheckpointConfig(max_to_keep=1, average_count=4, average_every=10)
  snaps = [s for s in range(1, 301) if average.is_snapshot(s, 300, 50, cfg)]
  assert snaps == [s for e in range(50, 301, 50) for s in range(e - 30, e + 1, 10)]
  assert average.window(300, cfg) == [270, 280, 290, 300] and average.window(20, cfg) == []
  assert not any(average.is_snapshot(s, 300, 50, CheckpointConfig(average_every=0)) for s in range(1, 301))
  assert average.weights(3, 0.5) == [0.25, 0.5, 1.0]


def test_snapshots_spaced_by_wall_clock_and_the_window_takes_the_newest_saved():
  cfg = CheckpointConfig(average_count=3, average_every_seconds=60.0)
  now = [0.0]
  clock = average.SnapshotClock(cfg, now=lambda: now[0])
  due = []
  for step in range(1, 11):
    now[0] += 25.0  # 25 s a step: a snapshot every third step (75 s >= 60 s since the last save).
    if clock.due():
      due.append(step)
      clock.saved()
  assert due == [3, 6, 9]
  assert not any(average.is_snapshot(s, 10, 5, cfg) for s in range(1, 11))  # Not by steps.
  assert average.window(10, cfg, [3, 6, 9]) == [6, 9, 10]
  assert average.window(7, cfg, [3, 6, 9]) == [3, 6, 7] and average.window(5, cfg, [3]) == []
  assert average.enabled(cfg) and not average.SnapshotClock(CheckpointConfig(), now=lambda: 1e9).due()


# --- a real run: in-loop suite, snapshot average, lineage ------------------------------------------

STEPS = {**RUN_OVERRIDES, "train.steps": 12, "checkpoint.every": 12, "eval.every": 6, "eval.batches": 1,
         "checkpoint.max_to_keep": 1, "checkpoint.average_every": 2, "checkpoint.average_count": 3,
         "eval.tasks": "builtin", "eval.task_examples": 2, "data.seq_len": 128, "eval.at_start": True}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir, result = trained_workdir(tmp_path_factory, "eval_run", STEPS)
  return workdir, json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_loop_scores_sources_tasks_and_the_snapshot_average_into_metrics_lineage_and_a_png(run):
  workdir, summary = run
  assert summary["checkpoints"] == [8, 10, 12]  # max_to_keep=1, but the averaging window is kept.
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  evals = {r["step"]: r for r in rows if "eval_loss" in r}
  assert sorted(evals) == [0, 6, 12]  # eval.at_start: the untrained parameters' scores at step 0.
  assert evals[0]["heldout/loss"] > evals[12]["heldout/loss"] and "task/digit-captions/prob" in evals[0]
  assert not any(k.startswith("avg/") for k in evals[0])  # No snapshot before the first update.
  for key in ("task/arithmetic/acc_norm", "task/code-completion/bpb", "task/digit-captions/prob", "avg/heldout/loss"):
    assert key in evals[12], key
  # Per source and per domain: which sources one held-out batch holds depends on the manifest's mix.
  names = {k.split("/")[1] for k in evals[12] if k.startswith("heldout/") and k.count("/") == 2 and k.endswith("/bpb")}
  domains = {k.split("/")[2] for k in evals[12] if k.startswith("heldout/domain/") and k.endswith("/loss")}
  assert len(names) >= 2 and names <= set(summary["data_sources"]), names
  assert domains and domains <= {"books", "code", "embodied", "synthetic", "video", "web"}, domains
  assert evals[12]["heldout/loss"] == pytest.approx(evals[12]["eval_loss"])
  record = load_step(workdir, 12).record
  assert record["eval"]["heldout_loss"] == pytest.approx(evals[12]["eval_loss"])
  assert record["eval"]["avg/heldout/loss"] == pytest.approx(evals[12]["avg/heldout/loss"])
  assert os.path.getsize(summary["eval_plot"]) > 10_000


@pytest.mark.slow
def test_the_checkpoint_average_equals_the_numpy_mean(run):
  workdir, _ = run
  loaded = average.load_average(workdir, 3)
  steps = [load_step(workdir, s) for s in (8, 10, 12)]
  singles = [s.params for s in steps]
  want = jax.tree.map(lambda *xs: np.mean(np.stack([np.asarray(x) for x in xs]), axis=0), *singles)
  for (path, got), expected in zip(jax.tree_util.tree_leaves_with_path(loaded.params), jax.tree.leaves(want),
                                   strict=True):
    assert np.asarray(got).dtype == expected.dtype
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-7, err_msg=str(path))
  assert not np.allclose(np.asarray(jax.tree.leaves(singles[0])[0]), np.asarray(jax.tree.leaves(singles[2])[0]))
  assert loaded.record["steps"] == [8, 10, 12]
  assert loaded.record["parents"] == [s.record["lineage_hash"] for s in steps]
  with pytest.raises(FileNotFoundError, match=r"needs 4, only \[8, 10, 12\] are committed"):
    average.load_average(workdir, 4)


@pytest.mark.slow
def test_an_averaged_checkpoint_has_its_parents_in_its_record_and_lineage_verify_checks_them(run, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(run[0], workdir)
  loaded = average.load_average(workdir, 3)
  result = average.write_average(workdir, loaded, {"heldout_loss": 1.5})
  checked = verify.verify(workdir)
  assert [c.get("parents") for c in checked["checkpoints"] if "parents" in c] == [result["parents"]]
  assert lineage.read_log(workdir)[-1]["eval"] == {"heldout_loss": 1.5}
  with pytest.raises(CheckpointIntegrityError, match="already exists"):
    average.write_average(workdir, loaded)

  records = lineage.read_log(workdir)  # A re-sealed average naming a parent outside the chain is refused.
  forged = next(r for r in records if "parents" in r)
  forged.update(parents=[*forged["parents"][:-1], "0" * 64], parent="0" * 64)
  forged.update(lineage_hash=lineage.record_hash(forged))
  with open(os.path.join(workdir, lineage.LOG_FILE), "w") as f:
    f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in records)
  with pytest.raises(CheckpointIntegrityError, match="the average at step 12 names parent"):
    verify.verify(workdir)


@pytest.mark.slow
def test_a_params_only_load_equals_the_full_restore_and_refuses_a_tampered_parameter(run, tmp_path):
  from codex_jax.checkpoint.files import write_files
  from codex_jax.checkpoint.load import read_config
  from codex_jax.checkpoint.manager import Checkpointer
  from codex_jax.parallel.mesh import build_mesh
  from codex_jax.train.setup import build_trainer
  workdir = str(tmp_path / "copy")
  shutil.copytree(run[0], workdir)
  cfg, _ = read_config(workdir)
  target = build_trainer(cfg, build_mesh(cfg.mesh, jax.devices()[:1])).restore_target()
  checkpointer = Checkpointer(workdir, CheckpointConfig())
  try:
    full = checkpointer.restore(12, target, meta=checkpointer.read_meta(12), resume=False)
  finally:
    checkpointer.close()
  pairs = zip(jax.tree.leaves(load_step(workdir, 12).params), jax.tree.leaves(full.params), strict=True)
  assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs)

  # Flip a byte inside one parameter's data and re-list the files, so the tensor hash itself must refuse it.
  chunk = os.path.join(workdir, "checkpoints", "12", "state", "params.unembed", "0.0")
  data = bytearray(open(chunk, "rb").read())
  data[int(len(data) * 0.9)] ^= 0x04
  with open(chunk, "wb") as f:
    f.write(bytes(data))
  write_files(os.path.join(workdir, "checkpoints", "12"))
  with pytest.raises(CheckpointIntegrityError, match=r"tensor params/unembed .*expected"):
    load_step(workdir, 12)
