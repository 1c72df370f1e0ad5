"""Data subsystem: embedded corpus, tokenizer, packing and the checkpointable Grain pipeline."""

import dataclasses
import json
import os
import time

import grain
import numpy as np
import pytest

from codex_jax.config.schema import DataConfig
from codex_jax.data import corpus, packing, pipeline
from codex_jax.data import tokenizer as tok_lib
from codex_jax.data.errors import DataError

MAX_BYTES = 300_000
VOCAB = 512
SEQ_LEN = 64
BATCH = 4


@pytest.fixture(scope="module")
def docs():
  return corpus.embedded_documents(MAX_BYTES)


@pytest.fixture(scope="module")
def cfg():
  # A large eval fraction so the small capped corpus still has eval documents.
  return DataConfig(corpus_max_bytes=MAX_BYTES, seq_len=SEQ_LEN, eval_fraction=0.2)


@pytest.fixture(scope="module")
def tok(docs, cfg):
  return tok_lib.load_or_train_tokenizer(cfg, VOCAB, docs, None)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# --- corpus ---------------------------------------------------------------------------------------

def test_corpus_is_deterministic_capped_and_has_both_sources(docs):
  again = corpus.embedded_documents(MAX_BYTES)
  assert [(d.id, d.text) for d in docs] == [(d.id, d.text) for d in again]
  assert {d.source for d in docs} == set(corpus.SOURCES) == {corpus.CODE, corpus.DOCSTRINGS}
  assert all(d.licence == "PSF-2.0" == corpus.SOURCES[d.source]["licence"] for d in docs)
  assert all(d.id.startswith(d.source + ":") and d.text for d in docs)
  sizes = [len(d.text.encode()) for d in docs]
  assert sum(sizes) >= MAX_BYTES
  # The cap is checked per module (code + docstrings), so at most the last module overshoots.
  last_path = docs[-1].id.split(":", 1)[1]
  before_last = sum(s for d, s in zip(docs, sizes, strict=True) if d.id.split(":", 1)[1] != last_path)
  assert before_last < MAX_BYTES
  paths = [d.id.split(":", 1)[1] for d in docs if d.source == corpus.CODE]
  assert paths == sorted(paths)


def test_full_corpus_skips_tests_idle_and_site_packages():
  docs = corpus.embedded_documents()
  assert len(docs) > 500
  paths = {d.id.split(":", 1)[1] for d in docs}
  assert "json/decoder.py" in paths
  for p in paths:
    parts = p.split("/")
    assert not {"test", "tests", "idlelib", "site-packages"} & set(parts), p
  by_id = {d.id: d for d in docs}
  doc = by_id[f"{corpus.DOCSTRINGS}:json/decoder.py"].text
  assert "# json.decoder.JSONDecoder.decode\n" in doc
  assert by_id[f"{corpus.CODE}:json/decoder.py"].text.startswith('"""Implementation of JSONDecoder')


def test_split_is_stable_and_eval_fraction_is_about_right():
  ids = [f"{corpus.CODE}:m{i}.py" for i in range(20_000)]
  splits = [corpus.split_of(i, 0.1) for i in ids]
  assert splits == [corpus.split_of(i, 0.1) for i in ids]
  assert 0.09 < splits.count("eval") / len(ids) < 0.11
  assert [corpus.split_of(f"x:m{i}.py", 0.5) for i in range(8)] == [
      corpus.split_of(f"y:m{i}.py", 0.5) for i in range(8)]  # Source prefix is ignored.
  assert all(corpus.split_of(i, 0.0) == "train" for i in ids[:100])
  assert all(corpus.split_of(i, 1.0) == "eval" for i in ids[:100])


def test_split_golden_values():
  # Fails if the hash changes, e.g. to Python's per-process salted hash().
  got = "".join("e" if corpus.split_of(f"s:m{i}.py", 0.5) == "eval" else "t" for i in range(16))
  assert got == GOLDEN_SPLIT


GOLDEN_SPLIT = "ttttteetetttttte"  # split_of(f"s:m{i}.py", 0.5) for i in range(16).


def test_fingerprint_tracks_ids_and_texts(docs):
  fp = corpus.corpus_fingerprint(docs)
  assert fp == corpus.corpus_fingerprint(list(docs))
  changed = [dataclasses.replace(docs[0], text=docs[0].text + " ")] + docs[1:]
  assert corpus.corpus_fingerprint(changed) != fp
  assert corpus.corpus_fingerprint(docs[1:]) != fp


# --- tokenizer ------------------------------------------------------------------------------------

def test_tokenizer_trains_caches_and_round_trips(docs, cfg, tmp_path, monkeypatch):
  monkeypatch.setenv("CODEX_CACHE_DIR", str(tmp_path / "cache"))
  first = tok_lib.load_or_train_tokenizer(cfg, VOCAB, docs, None)
  cached = os.listdir(tmp_path / "cache" / "tokenizers")
  assert len(cached) == 1 and cached[0].endswith(".json")
  assert first.get_vocab_size() == VOCAB
  assert first.token_to_id("<|pad|>") == tok_lib.PAD_ID == 0
  assert first.token_to_id("<|endoftext|>") == tok_lib.EOS_ID == 1

  def no_training(*args, **kwargs):
    raise AssertionError("the cached tokenizer should have been used")

  monkeypatch.setattr(tok_lib, "train_tokenizer", no_training)
  start = time.perf_counter()
  second = tok_lib.load_or_train_tokenizer(cfg, VOCAB, docs, None)
  assert time.perf_counter() - start < 1.0
  assert second.to_str() == first.to_str()
  for text in [docs[0].text[:2000], docs[1].text[:2000], "  x = 'ünïcödé ✓'\n\tif a:\r\n"]:
    assert first.decode(first.encode(text).ids) == text


def test_tokenizer_loads_from_path_and_reports_bad_paths(tok, cfg, docs, tmp_path):
  path = str(tmp_path / "named.json")
  tok.save(path)
  named = lambda p, vocab=VOCAB: tok_lib.load_or_train_tokenizer(
      dataclasses.replace(cfg, tokenizer_path=p), vocab, docs, None)
  loaded = named(path)
  assert loaded.encode("def f(): pass").ids == tok.encode("def f(): pass").ids
  missing = str(tmp_path / "missing.json")
  with pytest.raises(DataError, match="missing.json"):
    named(missing)
  garbage = tmp_path / "garbage.json"
  garbage.write_text("{not json")
  with pytest.raises(DataError, match="garbage.json"):
    named(str(garbage))
  with pytest.raises(DataError, match=r"512.*300"):
    named(path, 300)


def test_tokenizer_is_pinned_in_workdir(tok, cfg, docs, tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  tok_lib.load_or_train_tokenizer(cfg, VOCAB, docs, workdir)
  pinned = os.path.join(workdir, "tokenizer.json")
  assert json.load(open(pinned)) == json.loads(tok.to_str())
  tok_lib.load_or_train_tokenizer(cfg, VOCAB, docs, workdir)  # Identical: fine.
  tok.save(pinned, pretty=True)
  tok_lib.load_or_train_tokenizer(cfg, VOCAB, docs, workdir)  # Same tokenizer, other layout: fine.
  with open(pinned, "w") as f:
    f.write(tok_lib.train_tokenizer(["a different corpus " * 50], 300).to_str())
  with pytest.raises(DataError, match="different tokenizer"):
    tok_lib.load_or_train_tokenizer(cfg, VOCAB, docs, workdir)


# --- packing and pipeline -------------------------------------------------------------------------

def token_ids(tok, text):
  return np.asarray(tok.encode(text).ids + [tok_lib.EOS_ID], np.int32)


@pytest.mark.parametrize("n", [2, 3, SEQ_LEN, SEQ_LEN + 1, SEQ_LEN + 2, 3 * SEQ_LEN + 1,
                               5 * SEQ_LEN + 7])
def test_pieces_reassemble_the_document(n):
  ids = np.arange(100, 100 + n, dtype=np.int32)
  pieces = packing.SplitDocument(SEQ_LEN).flat_map(ids)
  assert len(pieces) == -(-(n - 1) // SEQ_LEN)
  for p in pieces:
    assert 1 <= len(p["inputs"]) == len(p["targets"]) <= SEQ_LEN
    np.testing.assert_array_equal(p["inputs"][1:], p["targets"][:-1])
  np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in pieces]), ids[:-1])
  np.testing.assert_array_equal(np.concatenate([p["targets"] for p in pieces]), ids[1:])


@pytest.mark.parametrize("short", [True, False])
def test_batch_spec_matches_batches_and_packing_invariants(tok, cfg, docs, short):
  # Real documents are mostly many seq_len pieces; cut to 20-120 characters, several share a row.
  if short:
    docs = [dataclasses.replace(d, text=d.text[:20 + 37 * i % 100]) for i, d in enumerate(docs)]
  it = pipeline.make_iterator(cfg, tok, docs, split="train", local_batch=BATCH, seed=3)
  batches = take(it, 12)
  spec = pipeline.batch_spec(BATCH, SEQ_LEN)
  doc_bytes = [token_ids(tok, d.text).tobytes() for d in docs]
  num_segments = 0
  for b in batches:
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
        k: (shape, np.dtype(dtype)) for k, (shape, dtype) in spec.items()}
    seg, pos, mask = b["segment_ids"], b["positions"], b["loss_mask"]
    np.testing.assert_array_equal(mask, (seg > 0).astype(np.float32))
    assert np.all(b["inputs"][seg == 0] == tok_lib.PAD_ID)
    assert np.all(b["targets"][mask == 1] != tok_lib.PAD_ID)
    for r in range(BATCH):
      real = seg[r][seg[r] > 0]
      assert real.size and real[0] == 1
      assert np.all(np.diff(real) >= 0) and np.all(np.diff(real) <= 1)
      assert np.all(seg[r][real.size:] == 0)  # Padding only at the end of a row.
      for s in np.unique(real):
        idx = np.flatnonzero(seg[r] == s)
        num_segments += 1
        np.testing.assert_array_equal(pos[r][idx], np.arange(idx.size))
        x, y = b["inputs"][r][idx], b["targets"][r][idx]
        np.testing.assert_array_equal(x[1:], y[:-1])
        # The segment is a contiguous run of one document's tokens.
        run = np.append(x, y[-1]).astype(np.int32).tobytes()
        assert any((o := db.find(run)) >= 0 and o % 4 == 0 for db in doc_bytes)
  if short:
    assert num_segments > 1.5 * len(batches) * BATCH  # Short documents do get packed together.
  assert np.mean([b["loss_mask"].mean() for b in batches]) > 0.7


def test_eval_stream_ends_padded_and_counts_every_token_once(tok, cfg, docs):
  it = pipeline.make_iterator(cfg, tok, docs, split="eval", local_batch=BATCH, seed=0, num_epochs=1)
  batches = list(it)
  eval_docs = [d for d in docs if corpus.split_of(d.id, cfg.eval_fraction) == "eval"]
  assert eval_docs and len(eval_docs) < len(docs)
  expected = sum(len(token_ids(tok, d.text)) - 1 for d in eval_docs)
  assert sum(b["loss_mask"].sum() for b in batches) == expected
  assert all(b["inputs"].shape == (BATCH, SEQ_LEN) for b in batches)


def test_epochs_are_reshuffled(docs, tok):
  ds = pipeline.build_source_dataset(docs[:12], tok, seed=5, num_epochs=2)
  ids = [a.tobytes() for a in ds]
  first, second = ids[:12], ids[12:]
  assert sorted(first) == sorted(second) and first != second


def test_process_shards_are_disjoint_and_cover(docs, cfg):
  kw = dict(split="train", eval_fraction=cfg.eval_fraction)
  train = [d.id for d in docs if corpus.split_of(d.id, cfg.eval_fraction) == "train"]
  shards = [[d.id for d in pipeline.shard_documents(docs, process_index=i, process_count=3, **kw)]
            for i in range(3)]
  assert all(shards) and sorted(sum(shards, [])) == sorted(train)
  assert not set(shards[0]) & set(shards[1])
  with pytest.raises(DataError, match="No train documents"):
    pipeline.shard_documents(docs[:2], process_index=5, process_count=6, **kw)


@pytest.fixture(scope="module")
def tiny(docs, tok):
  """Three short documents: an epoch is a few batches, so state crosses epoch boundaries."""
  small = [dataclasses.replace(d, text=d.text[:200]) for d in docs[:3]]
  cfg = DataConfig(seq_len=32, eval_fraction=0.0)
  return cfg, small


@pytest.mark.parametrize("split_at", [0, 1, 3, 7, 11])
def test_state_round_trips_across_epochs(tiny, tok, split_at):
  cfg, small = tiny
  make = lambda: pipeline.make_iterator(cfg, tok, small, split="train", local_batch=2, seed=1)
  reference = take(make(), 20)
  # An epoch of 3 x 200 characters is a few batches: 20 batches span more than 3 epochs.
  assert sum(b["loss_mask"].sum() for b in reference) > 3 * sum(
      len(token_ids(tok, d.text)) - 1 for d in small)
  it = make()
  take(it, split_at)
  state = it.get_state()
  json.dumps(state)  # Orbax's grain handler stores the state as JSON.
  resumed = make()
  resumed.set_state(state)
  assert_same_batches(take(resumed, 20 - split_at), reference[split_at:])
  assert_same_batches(take(it, 20 - split_at), reference[split_at:])


def test_orbax_composite_round_trip(tok, cfg, docs, tmp_path):
  import orbax.checkpoint as ocp
  make = lambda: pipeline.make_iterator(cfg, tok, docs, split="train", local_batch=BATCH, seed=2)
  reference = take(make(), 9)
  it = make()
  take(it, 5)
  state = {"w": np.arange(6, dtype=np.float32)}  # Saved beside the iterator, as the trainer will.
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                         data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  take(it, 2)  # Move on, so a restore that did nothing would be caught.
  restored = make()
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    assert mngr.latest_step() == 5
    out = mngr.restore(5, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state), data=grain.checkpoint.CheckpointRestore(restored)))
  np.testing.assert_array_equal(out.state["w"], state["w"])
  assert_same_batches(take(restored, 4), reference[5:])


def test_worker_processes_give_the_same_stream_and_portable_state(tiny, tok):
  cfg, small = tiny
  make = lambda workers: pipeline.make_iterator(dataclasses.replace(cfg, num_workers=workers), tok,
                                                small, split="train", local_batch=2, seed=4)
  reference = take(make(0), 10)
  in_process = make(0)
  take(in_process, 4)
  for workers in (1, 2):
    it = make(workers)
    try:
      assert_same_batches(take(it, 4), reference[:4])
      assert it.get_state() == in_process.get_state()  # The worker count is not in the state.
    finally:
      it.close()
  resumed = make(2)  # A run checkpointed in process resumes with workers.
  try:
    resumed.set_state(in_process.get_state())
    assert_same_batches(take(resumed, 6), reference[4:])
  finally:
    resumed.close()
