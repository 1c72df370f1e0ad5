"""Data pipeline: encoding, packing, effective-token mixing, resumable state, workers, malformed records."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import grain
import numpy as np
import pytest
import yaml

from codex_jax.config.schema import DataConfig
from codex_jax.data import batches as batches_lib
from codex_jax.data import encode, packing, sample_ids
from codex_jax.data import tokenizer as tok_lib
from codex_jax.data.accounting import TokenAccountant
from codex_jax.data.errors import DataError
from codex_jax.data.mixture import EffectiveTokenMix
from codex_jax.data.plan import build_plan, write_data_record
from codex_jax.data.records import MODALITY_IDS
from tests.data_fixtures import write_corpus, write_jsonl

VOCAB, SEQ_LEN, BATCH, FEATURES = 400, 64, 4, 96
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
  return write_corpus(str(tmp_path_factory.mktemp("corpus")))


@pytest.fixture(scope="module")
def cfg():
  return DataConfig(seq_len=SEQ_LEN, eval_fraction=0.1, shuffle_window=16, shuffle_block=8)


@pytest.fixture(scope="module")
def plan(manifest, cfg):
  return build_plan(cfg, vocab_size=VOCAB, feature_dim=FEATURES, manifest_path=manifest)


def batches(plan, cfg, n=None, *, split="train", phase="main", seed=0, workers=0, process_index=0,
            process_count=1, num_epochs=None):
  it = batches_lib.make_iterator(plan, dataclasses.replace(cfg, num_workers=workers), feature_dim=FEATURES,
                              split=split, phase=phase, local_batch=BATCH, seed=seed, process_index=process_index,
                              process_count=process_count, num_epochs=num_epochs)
  return it if n is None else [next(it) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# --- encoding -------------------------------------------------------------------------------------

def encoder(plan, **spec):
  return encode.Encoder(plan.tokenizer, encode.EncodeSpec(**spec), source_id=3, rates={})


def test_text_example_is_plain_next_token_prediction(plan):
  ex = encoder(plan)({"text": "def f(x):\n  return x"})
  ids = np.asarray(plan.tokenizer.encode("def f(x):\n  return x").ids + [tok_lib.EOS_ID])
  np.testing.assert_array_equal(ex["inputs"], ids[:-1])
  np.testing.assert_array_equal(ex["targets"], ids[1:])
  assert ex["loss_mask"].all() and (ex["modality_ids"] == MODALITY_IDS["text"]).all()
  assert ex["features"].shape == (len(ids) - 1, FEATURES) and not ex["features"].any()
  assert (ex["source_ids"] == 3).all()


def test_image_caption_layout_predicts_the_caption_from_the_picture(plan):
  image = np.arange(64, dtype=np.uint8).reshape(8, 8, 1) * 4
  ex = encoder(plan)({"image": image, "text": "A seven."})
  caption = plan.tokenizer.encode("A seven.").ids + [tok_lib.EOS_ID]
  patches = (16 // 4) ** 2
  assert list(ex["modality_ids"]) == [MODALITY_IDS["image"]] * patches + [MODALITY_IDS["text"]] * (len(caption) - 1)
  # The last patch predicts the first caption token; patches before it predict nothing.
  np.testing.assert_array_equal(ex["targets"][patches - 1:], caption)
  np.testing.assert_array_equal(ex["loss_mask"], np.arange(len(ex["inputs"])) >= patches - 1)
  assert (ex["inputs"][:patches] == tok_lib.PAD_ID).all()
  assert ex["features"][:patches, :48].std() > 0 and not ex["features"][:, 48:].any()
  assert ex["features"].min() >= -1 and ex["features"].max() <= 1


def test_clip_and_embodied_layouts(plan):
  spec = encode.EncodeSpec()
  frames = np.random.default_rng(0).integers(0, 255, (5, 12, 12, 3), dtype=np.uint8)
  audio = np.sin(np.arange(8000) / 10).astype(np.float32)
  ex = encoder(plan)({"video": frames, "audio": audio, "sample_rate": 8000, "text": "Hum."})
  m = ex["modality_ids"]
  tubelets = spec.video_frames // spec.tubelet_frames * (spec.image_size // spec.patch_size) ** 2
  audio_positions = -(-len(encode.log_mel(audio, 8000, spec)) // spec.audio_patch_frames)
  assert (m[:tubelets] == MODALITY_IDS["video"]).all()
  assert (m[tubelets:tubelets + audio_positions] == MODALITY_IDS["audio"]).all()
  assert (m[tubelets + audio_positions:] == MODALITY_IDS["text"]).all()
  steps = {"text": "Go.", "video": frames[:3], "proprio": np.ones((3, 4), np.float32),
           "actions": np.full((3, 1), 2.0, np.float32)}
  ex = encoder(plan)(steps)
  per_step = [MODALITY_IDS["video"]] * 16 + [MODALITY_IDS["proprio"], MODALITY_IDS["action"]]
  instruction = len(plan.tokenizer.encode("Go.").ids) + 1  # EOS ends the instruction.
  assert list(ex["modality_ids"]) == [MODALITY_IDS["text"]] * instruction + per_step * 3
  assert ex["features"][-1, 0] == 2.0 and (ex["features"][-2, :4] == 1.0).all()  # Action, proprio values.
  assert ex["loss_mask"][:instruction - 1].all() and not ex["loss_mask"][instruction - 1:].any()


@pytest.mark.parametrize("lengths", [[5, 7, 60, 3], [SEQ_LEN], [SEQ_LEN + 1, 2], [3 * SEQ_LEN + 5, 40, 30, SEQ_LEN]])
def test_rows_hold_the_stream_in_order_and_cut_only_what_a_row_cannot_hold(lengths):
  examples, start = [], 0
  for k, n in enumerate(lengths):
    ids = np.arange(start, start + n, dtype=np.int32)
    examples.append({"inputs": ids, "targets": ids + 1, "loss_mask": np.ones(n, np.float32),
                     "modality_ids": np.ones(n, np.int32), "source_ids": np.ones(n, np.int32),
                     "features": np.zeros((n, 2), np.float32) + ids[:, None],
                     "example_ids": np.full(n, 100 + k, np.int64), "example_positions": np.arange(n, dtype=np.int32)})
    start += n
  rows = list(packing.SourceRows(grain.MapDataset.source(examples).to_iter_dataset(), SEQ_LEN))
  assert all(r["inputs"].shape == (SEQ_LEN,) and r["features"].shape == (SEQ_LEN, 2) for r in rows)
  owner = lambda pos: int(np.searchsorted(np.cumsum(lengths), pos, side="right"))  # Example holding a token.
  parts = []  # Every segment, in order: together they are the examples, in order, with nothing lost.
  for r in rows:
    seg = r["segment_ids"]
    real = seg[seg > 0]
    assert real.size and np.all(seg[real.size:] == 0) and list(np.unique(real)) == list(range(1, real.max() + 1))
    for s in np.unique(real):
      idx = np.flatnonzero(seg == s)
      np.testing.assert_array_equal(r["positions"][idx], np.arange(idx.size))
      np.testing.assert_array_equal(r["features"][idx, 0], r["inputs"][idx])
      parts.append(r["inputs"][idx])
      # Every part knows its example and where in it it starts, also when the example was cut.
      k = owner(r["inputs"][idx[0]])
      assert (r["example_ids"][idx] == 100 + k).all()
      np.testing.assert_array_equal(r["example_positions"][idx], r["inputs"][idx] - sum(lengths[:k]))
    assert not r["example_ids"][seg == 0].any()
  np.testing.assert_array_equal(np.concatenate(parts), np.arange(start))
  assert [tuple(s[1:]) for r in rows for s in sample_ids.batch_samples({k: v[None] for k, v in r.items()})] == [
      (int(p[0]) - sum(lengths[:owner(p[0])]), len(p)) for p in parts]
  # Only examples longer than a row are cut; a short one that does not fit starts a new row.
  boundaries = set(np.cumsum([len(p) for p in parts])[:-1])
  ends = set(np.cumsum(lengths)[:-1])
  cut = [b for b in boundaries if b not in ends]
  assert all(lengths[owner(b)] > SEQ_LEN for b in cut)


def test_row_packer_state_round_trips_mid_example():
  examples = [{"inputs": np.arange(n, dtype=np.int32), "targets": np.arange(n, dtype=np.int32),
               "loss_mask": np.ones(n, np.float32), "modality_ids": np.ones(n, np.int32),
               "source_ids": np.ones(n, np.int32), "features": np.zeros((n, 1), np.float32),
               "example_ids": np.full(n, n, np.int64), "example_positions": np.arange(n, dtype=np.int32)}
              for n in [10, 150, 30, 20, 200, 5, 64, 64, 1]]
  ds = packing.SourceRows(grain.MapDataset.source(examples).to_iter_dataset(), SEQ_LEN)
  reference = list(ds)
  for k in range(len(reference)):
    it = iter(ds)
    [next(it) for _ in range(k)]
    state = json.loads(json.dumps(it.get_state()))
    resumed = iter(ds)
    resumed.set_state(state)
    assert_same_batches(list(resumed), reference[k:])


# --- mixture --------------------------------------------------------------------------------------

def test_effective_token_shares_match_targets_within_2_percent_over_2000_samples(plan, cfg):
  spec = batches_lib.encode_spec(cfg, FEATURES)
  shares = plan.shares("main")
  streams = [batches_lib.source_stream(plan, s, cfg, spec, split="train", seed=0, process_index=0, process_count=1,
                                    num_epochs=None) for s in plan.sources]
  rates = [batches_lib.rates_by_modality_id(s.source.exchange_rates) for s in plan.sources]
  mix = iter(EffectiveTokenMix(streams, [shares[s.source.name] for s in plan.sources], rates))
  effective = np.zeros(len(plan.sources) + 1)
  for _ in range(2000):
    ex = next(mix)
    effective[ex["source_ids"][0]] += encode.effective_tokens(ex, rates[ex["source_ids"][0] - 1])
  realised = effective[1:] / effective.sum()
  for s, got in zip(plan.sources, realised, strict=True):
    assert abs(got - shares[s.source.name]) < 0.02 * shares[s.source.name], (s.source.name, got)


def test_accountant_measures_shares_on_the_batches(plan, cfg):
  accountant = TokenAccountant(plan, "main")
  raw, effective = {}, {}
  for batch in batches(plan, cfg, 30):
    metrics = accountant.update(batch)
    for m in MODALITY_IDS:
      raw[m] = raw.get(m, 0) + metrics[f"data/modality/{m}/raw_tokens"]
      effective[m] = effective.get(m, 0) + metrics[f"data/modality/{m}/effective_tokens"]
  for name, target in plan.shares("main").items():
    assert metrics[f"data/{name}/target_share"] == target
    assert abs(metrics[f"data/{name}/share"] - target) < 0.1 * target, name  # The shuffle window moves a few pieces.
  assert all(raw[m] > 0 for m in MODALITY_IDS)
  assert effective["image"] == pytest.approx(0.45 * raw["image"]) and effective["text"] == raw["text"]
  assert 0 <= metrics["data/padding_fraction"] < 0.3


# --- batches --------------------------------------------------------------------------------------

def test_batch_spec_and_packing_invariants(plan, cfg):
  spec = batches_lib.batch_spec(BATCH, SEQ_LEN, FEATURES)
  num_segments, seen_sources = 0, set()
  for b in batches(plan, cfg, 12):
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {k: (s, np.dtype(d)) for k, (s, d) in spec.items()}
    seg, pos, mask, mod = b["segment_ids"], b["positions"], b["loss_mask"], b["modality_ids"]
    assert np.all(mask <= (seg > 0)) and np.all((mod == 0) == (seg == 0)) and np.all((b["source_ids"] == 0) == (seg == 0))
    assert np.all(b["targets"][mask == 1] != tok_lib.PAD_ID)
    assert not b["features"][mod <= MODALITY_IDS["text"]].any()
    seen_sources |= set(np.unique(b["source_ids"])) - {0}
    for r in range(BATCH):
      real = seg[r][seg[r] > 0]
      assert real.size and real[0] == 1 and np.all(np.diff(real) >= 0) and np.all(np.diff(real) <= 1)
      assert np.all(seg[r][real.size:] == 0)  # Padding only at the end of a row.
      for s in np.unique(real):
        idx = np.flatnonzero(seg[r] == s)
        num_segments += 1
        np.testing.assert_array_equal(pos[r][idx], np.arange(idx.size))
        assert len(np.unique(b["source_ids"][r][idx])) == 1  # A segment never mixes records.
        text = idx[(mod[r][idx] == MODALITY_IDS["text"])][:-1]
        nxt = text + 1
        ok = mod[r][nxt] == MODALITY_IDS["text"]
        np.testing.assert_array_equal(b["targets"][r][text[ok]], b["inputs"][r][nxt[ok]])
  assert seen_sources == {s.source_id for s in plan.sources}
  assert num_segments > 12 * BATCH  # Short records do get packed together.


def test_eval_stream_ends_padded_and_counts_every_record_once(plan, cfg):
  out = list(batches(plan, cfg, split="eval", num_epochs=1))
  assert out and all(b["inputs"].shape == (BATCH, SEQ_LEN) for b in out)
  spec = batches_lib.encode_spec(cfg, FEATURES)
  lengths = {}  # Every held-out record, encoded directly: its sample id -> its number of positions.
  for s in plan.sources:
    read = batches_lib.ReadExample(s, encode.Encoder(plan.tokenizer, spec, s.source_id, s.source.exchange_rates),
                                len(s.records["eval"]))
    for i, entry in enumerate(s.records["eval"]):
      lengths[sample_ids.example_id(s.source_id, 0, i)] = len(read.map_with_index(i, (*entry, i))["inputs"])
  assert sum(int((b["segment_ids"] > 0).sum()) for b in out) == sum(lengths.values())
  # By sample id: the parts of every record tile it exactly once, and nothing else was drawn.
  parts = {}
  for b in out:
    for sample_id, start, n in sample_ids.batch_samples(b):
      parts.setdefault(sample_id, []).append((start, n))
  assert parts.keys() == {i for i, n in lengths.items() if n}
  for sample_id, spans in parts.items():
    starts = np.cumsum([0] + [n for _, n in sorted(spans)])
    assert [start for start, _ in sorted(spans)] == list(starts[:-1]) and starts[-1] == lengths[sample_id]


def test_process_shards_are_disjoint_and_cover(plan):
  for s in plan.sources:
    records = s.records["train"]
    shards = [records[i::3] for i in range(3)]
    assert sum(len(x) for x in shards) == len(records)
    assert not {json.dumps(r) for r in shards[0]} & {json.dumps(r) for r in shards[1]}


def test_epochs_are_reshuffled_in_blocks():
  from codex_jax.data.stream import EpochBlockShuffle
  ds = EpochBlockShuffle(grain.MapDataset.range(20), block=4, seed=1, num_epochs=2)
  first, second = [ds[i] for i in range(20)], [ds[i] for i in range(20, 40)]
  assert sorted(first) == sorted(second) == list(range(20)) and first != second
  assert all(first[i + 1] == first[i] + 1 for i in range(0, 20, 4) for i in range(i, i + 3))  # Blocks kept.


@pytest.fixture(scope="module")
def few_clips(tmp_path_factory, cfg):
  """Code and only 4 clips: the clips' epoch ends within a few batches; two sources keep worker starts cheap."""
  root = str(tmp_path_factory.mktemp("few"))
  full = yaml.safe_load(open(write_corpus(root, clips=4)))
  sources = [s for s in full["sources"] if s["name"] in ("code", "clips")]
  for s, share in zip(sources, (0.6, 0.4), strict=True):
    s["share"] = {"main": share, "late": share}
  manifest = write_corpus(root, clips=4, manifest_name="few.yaml", sources=sources)
  return build_plan(dataclasses.replace(cfg, eval_fraction=0.0), vocab_size=VOCAB, feature_dim=FEATURES,
                    manifest_path=manifest)


def test_sample_ids_show_each_record_once_per_epoch_and_epochs_in_order(few_clips, cfg):
  """By sample id, over several epochs of the 4 clips: every epoch trains every record once, whole,
  and a record of epoch e+1 comes only after every record of epoch e, or in the same shuffle window
  as the last of them (the window shuffle permutes rows within a window, never across windows)."""
  plan, per_window = few_clips, cfg.shuffle_window // BATCH
  parts = {}  # id -> [(first position, length, batch number)]
  for k, b in enumerate(batches(plan, cfg, 12 * per_window)):  # Whole windows only.
    for sample_id, start, n in sample_ids.batch_samples(b):
      parts.setdefault(sample_id, []).append((start, n, k))
  spec = batches_lib.encode_spec(cfg, FEATURES)
  for s in plan.sources:
    records = s.records["train"]
    read = batches_lib.ReadExample(s, encode.Encoder(plan.tokenizer, spec, s.source_id, s.source.exchange_rates),
                                len(records))
    ids = np.array(sorted(parts), np.int64)
    source, epoch, record = sample_ids.split_id(ids)
    ids, epoch, record = ids[source == s.source_id], epoch[source == s.source_id], record[source == s.source_id]
    for sample_id in ids:  # No position of a sample is trained twice.
      spans = sorted(parts[sample_id])
      assert all(a[0] + a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    for e in range(int(epoch.max())):  # Every epoch before the one in progress is complete.
      assert sorted(record[epoch == e].tolist()) == list(range(len(records)))
      for sample_id, r in zip(ids[epoch == e], record[epoch == e], strict=True):
        spans = sorted(parts[sample_id])
        n = len(read.map_with_index(int(r), (*records[r], int(r)))["inputs"])
        assert [a for a, _, _ in spans] == list(np.cumsum([0] + [m for _, m, _ in spans])[:-1])
        assert sum(m for _, m, _ in spans) == n
      last = max(k for i in ids[epoch == e] for _, _, k in parts[i])
      first_next = min(k for i in ids[epoch == e + 1] for _, _, k in parts[i])
      assert first_next // per_window >= last // per_window
    if s.source.name == "clips":
      assert epoch.max() >= 3  # The test did cross epoch boundaries.


# In-process: a resume from every step. With worker processes each resume starts two more processes: every
# third step (still across the epoch boundaries), which keeps the test at a third of the time.
@pytest.mark.parametrize("workers,stride", [(0, 1), pytest.param(2, 3, marks=pytest.mark.slow)])  # Workers: slow.
def test_state_round_trips_at_every_step_across_an_epoch_boundary(few_clips, cfg, workers, stride):
  plan = few_clips
  reference = batches(plan, cfg, 10)
  clips = next(s for s in plan.sources if s.source.name == "clips")
  seen = sum(int(((b["source_ids"] == clips.source_id) & (b["positions"] == 0)).sum()) for b in reference)
  assert seen > len(clips.records["train"])
  it = batches(plan, cfg, workers=workers)
  try:
    for k in range(len(reference) - 1):
      state = it.get_state()
      json.dumps(state)  # Orbax's grain handler stores the state as JSON.
      if k % stride == 0:
        resumed = batches(plan, cfg, workers=workers)
        try:
          resumed.set_state(state)
          assert_same_batches([next(resumed)], reference[k:k + 1])
        finally:
          resumed.close()
      assert_same_batches([next(it)], reference[k:k + 1])
  finally:
    it.close()


@pytest.mark.slow  # Worker processes start with their imports: make test, not test-fast.
def test_worker_count_is_not_in_the_state(plan, cfg):
  in_process = batches(plan, cfg)
  reference = [next(in_process) for _ in range(6)]
  with_workers = batches(plan, cfg, workers=2)
  try:
    resumed_state = None
    for k in range(3):
      assert_same_batches([next(with_workers)], reference[k:k + 1])
    resumed_state = with_workers.get_state()
  finally:
    with_workers.close()
  resumed = batches(plan, cfg)
  resumed.set_state(resumed_state)
  assert_same_batches([next(resumed) for _ in range(3)], reference[3:])


def test_orbax_composite_round_trip(plan, cfg, tmp_path):
  import orbax.checkpoint as ocp
  reference = batches(plan, cfg, 7)
  it = batches(plan, cfg)
  [next(it) for _ in range(4)]
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  next(it)  # Move on, so a restore that did nothing would be caught.
  restored = batches(plan, cfg)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert_same_batches([next(restored) for _ in range(3)], reference[4:])


def test_phase_switch_continues_every_source_without_repeats(plan, cfg):
  b = batches_lib.build_batches(plan, cfg, feature_dim=FEATURES, split="train", phase="main", local_batch=BATCH, seed=0)
  [next(b.iterator) for _ in range(5)]
  states = b.source_states()
  late = batches_lib.build_batches(plan, cfg, feature_dim=FEATURES, split="train", phase="late", local_batch=BATCH,
                                seed=0)
  late.start_from(states)
  next(late.iterator)
  after = late.source_states()
  records = lambda state: json.dumps(state).count("next_index") and _next_index(state)
  for old, new in zip(states, after, strict=True):
    assert records(new) >= records(old)  # No source went back: nothing is repeated.
  assert sum(map(records, after)) > sum(map(records, states))
  # The late phase is mostly code (0.7 of effective tokens).
  accountant = TokenAccountant(plan, "late")
  for _ in range(10):
    metrics = accountant.update(next(late.iterator))
  assert metrics["data/code/share"] > 0.5


def _next_index(state):
  """The IndexedStream position inside a source's (nested) state."""
  if isinstance(state, dict):
    if "next_index" in state:
      return state["next_index"]
    return next(i for v in state.values() if (i := _next_index(v)) is not None)
  return None


# --- malformed records ----------------------------------------------------------------------------

@pytest.fixture()
def broken(tmp_path, manifest):
  root = os.path.dirname(manifest)
  path = os.path.join(root, "code", "part-1.jsonl")
  good = open(path).read().splitlines()
  bad_root = str(tmp_path / "broken")
  write_corpus(bad_root)
  bad = os.path.join(bad_root, "code", "part-1.jsonl")
  write_jsonl(bad, [])
  with open(bad, "w") as f:
    f.write("\n".join(good[:2] + ['{"text": 5}', "not json"] + good[2:]) + "\n")
  return os.path.join(bad_root, "manifest.yaml"), bad


def test_malformed_records_fail_naming_file_and_record(broken, cfg):
  path, bad = broken
  with pytest.raises(DataError, match=rf"(?s)2 malformed record\(s\).*{bad}:line 3: .*\n.*{bad}:line 4: invalid JSON"):
    build_plan(cfg, vocab_size=VOCAB, feature_dim=FEATURES, manifest_path=path)


def test_malformed_records_skip_counts_and_quarantines(broken, cfg, plan, tmp_path):
  path, bad = broken
  skipping = build_plan(dataclasses.replace(cfg, on_malformed="skip"), vocab_size=VOCAB, feature_dim=FEATURES,
                        manifest_path=path)
  assert [(m["file"], m["record"]) for m in skipping.malformed] == [(bad, "line 3"), (bad, "line 4")]
  code = lambda p: next(s for s in p.sources if s.source.name == "code")
  good = sum(len(r) for r in code(plan).records.values())
  assert sum(len(r) for r in code(skipping).records.values()) == good  # Only the bad lines are dropped.
  folder = write_data_record(skipping, str(tmp_path / "run"))
  lines = [json.loads(x) for x in open(os.path.join(folder, "quarantine.jsonl"))]
  assert [x["record"] for x in lines] == ["line 3", "line 4"] and all(x["reason"] for x in lines)
  assert json.load(open(os.path.join(folder, "manifest.json")))["malformed"] == 2


# --- worker lifetime ------------------------------------------------------------------------------

_CHILD = """
import os, sys, time
sys.path.insert(0, {root!r})
from codex_jax.config.schema import DataConfig
from codex_jax.data import batches as batches_lib
from codex_jax.data.plan import build_plan
cfg = DataConfig(seq_len=64, eval_fraction=0.1, num_workers=2, shuffle_window=16)
plan = build_plan(cfg, vocab_size=400, feature_dim=96, manifest_path={manifest!r})
it = batches_lib.make_iterator(plan, cfg, feature_dim=96, split="train", phase="main", local_batch=4, seed=0)
for _ in range(6):
  next(it)
print("ready", flush=True)
time.sleep(600)
"""


def _descendants(pid: int) -> set[int]:
  out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
  children: dict[int, list[int]] = {}
  for line in out.splitlines():
    p, pp = map(int, line.split())
    children.setdefault(pp, []).append(p)
  found, todo = set(), [pid]
  while todo:
    for child in children.get(todo.pop(), []):
      found.add(child)
      todo.append(child)
  return found


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split()[2] != "Z"
  except FileNotFoundError:
    return False


@pytest.mark.slow
def test_no_worker_outlives_a_killed_trainer(manifest):
  proc = subprocess.Popen([sys.executable, "-c", _CHILD.format(root=ROOT, manifest=manifest)],
                          stdout=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  try:
    assert proc.stdout.readline().strip() == "ready"
    workers = _descendants(proc.pid)
    assert len(workers) >= 2 * 2  # Two decoding workers per source read so far (and grain's resource tracker).
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.time() + 15
    while time.time() < deadline and any(_alive(w) for w in workers):
      time.sleep(0.2)
    assert not [w for w in workers if _alive(w)]
  finally:
    if proc.poll() is None:
      proc.kill()


# --- resume rules ---------------------------------------------------------------------------------

def test_resume_feeds_the_checkpoint_shards_with_any_dividing_process_count_and_refuses_changed_data(plan, manifest):
  import jax

  from codex_jax.runtime.inputs import RunInputs
  from tests.helpers import load
  cfg = load("tiny", num_devices=8, **{"data.manifest": manifest, "data.seq_len": SEQ_LEN})
  inputs = RunInputs(cfg, plan, local_batch=BATCH)
  inputs._check_resume(7, {"data": plan.record(), "run_phase": "pretrain", "process_count": 2, "data_shards": 2})
  assert inputs.shards == 2  # This one process feeds both shards of a 2-process run.
  inputs._check_resume(7, {"data": plan.record(), "run_phase": "pretrain", "process_count": 4})
  assert inputs.shards == 4  # A checkpoint from before data.shards: one shard per process.
  assert list(batches_lib.hosted_shards(4, 1, 2)) == [2, 3]
  with pytest.raises(DataError, match=r"has 3 shard\(s\); 2 processes cannot feed whole shards"):
    batches_lib.hosted_shards(3, 0, 2)
  other = {**plan.record(), "manifest_hash": "0" * 64, "tokenizer_sha256": "x"}
  meta = {"data": other, "run_phase": "pretrain", "process_count": jax.process_count()}
  with pytest.raises(DataError, match=r"manifest hash 0{64}, this run's is .*tokenizer differs.*data.phase"):
    inputs._check_resume(7, meta)
  inputs._check_resume(7, {**meta, "run_phase": "an-earlier-phase"})  # A new run phase may change the data.
  assert not inputs.restore_iterator


def _sharded(plan, cfg, shards, count, rows):
  return batches_lib.ShardedBatches({s: batches_lib.build_batches(
      plan, cfg, feature_dim=FEATURES, split="train", phase="main", local_batch=rows, seed=0, process_index=s,
      process_count=count) for s in shards}, count)


def test_one_process_feeding_two_shards_makes_the_global_batches_of_two_processes_and_resumes_theirs(plan, cfg,
                                                                                                    tmp_path):
  """The elastic invariant: shard s's rows come from its own pipeline whoever feeds it, in shard order, and its
  checkpointed position restores into any process that feeds it next."""
  from etils import epath

  from codex_jax.checkpoint.data_shards import DataShardsHandler, DataShardsRestore, DataShardsSave
  one = _sharded(plan, cfg, [0, 1], 2, BATCH // 2)
  two = [_sharded(plan, cfg, [s], 2, BATCH // 2) for s in (0, 1)]  # Processes 0 and 1 of 2.
  for _ in range(3):
    got, parts = next(one), [next(p) for p in two]
    assert got["inputs"].shape[0] == BATCH
    assert_same_batches([got], [{k: np.concatenate([p[k] for p in parts]) for k in got}])
  handler = DataShardsHandler()
  for process in two:
    handler.save(epath.Path(tmp_path), DataShardsSave(process))
  assert sorted(os.listdir(tmp_path)) == ["shard_0-of-2.json", "shard_1-of-2.json"]
  resumed = handler.restore(epath.Path(tmp_path), DataShardsRestore(_sharded(plan, cfg, [0, 1], 2, BATCH // 2)))
  assert_same_batches([next(resumed) for _ in range(2)], [next(one) for _ in range(2)])
