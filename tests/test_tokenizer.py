"""The byte-level BPE: trained once and cached, loaded from a named file, pinned in the workdir."""

import dataclasses
import json
import os
import time

import pytest

from codex_jax.config.schema import DataConfig
from codex_jax.data import tokenizer as tok_lib
from codex_jax.data.errors import DataError
from tests.data_fixtures import stdlib_texts

VOCAB = 512


@pytest.fixture(scope="module")
def texts():
  return stdlib_texts(40)


@pytest.fixture(scope="module")
def tok(texts):
  return tok_lib.train_tokenizer(texts, VOCAB)


def test_tokenizer_trains_caches_and_round_trips(texts, tmp_path, monkeypatch):
  monkeypatch.setenv("CODEX_CACHE_DIR", str(tmp_path / "cache"))
  calls = []
  source = lambda: calls.append(1) or texts
  first = tok_lib.load_or_train_tokenizer(DataConfig(), VOCAB, source, "data-key", None)
  cached = os.listdir(tmp_path / "cache" / "tokenizers")
  assert len(cached) == 1 and cached[0].endswith(".json") and calls == [1]
  assert first.get_vocab_size() == VOCAB
  assert first.token_to_id("<|pad|>") == tok_lib.PAD_ID == 0
  assert first.token_to_id("<|endoftext|>") == tok_lib.EOS_ID == 1

  def no_training(*args, **kwargs):
    raise AssertionError("the cached tokenizer should have been used")

  monkeypatch.setattr(tok_lib, "train_tokenizer", no_training)
  start = time.perf_counter()
  second = tok_lib.load_or_train_tokenizer(DataConfig(), VOCAB, source, "data-key", None)
  assert time.perf_counter() - start < 1.0 and calls == [1]  # The texts were not even read.
  assert second.to_str() == first.to_str()
  for text in [texts[0][:2000], texts[1][:2000], "  x = 'ünïcödé ✓'\n\tif a:\r\n"]:
    assert first.decode(first.encode(text).ids) == text
  with pytest.raises(AssertionError):  # Another data key trains anew.
    tok_lib.load_or_train_tokenizer(DataConfig(), VOCAB, source, "other-data", None)


def test_tokenizer_loads_from_path_and_reports_bad_paths(tok, tmp_path):
  path = str(tmp_path / "named.json")
  tok.save(path)
  named = lambda p, vocab=VOCAB: tok_lib.load_or_train_tokenizer(DataConfig(tokenizer_path=p), vocab, list, "", None)
  assert named(path).encode("def f(): pass").ids == tok.encode("def f(): pass").ids
  with pytest.raises(DataError, match="missing.json"):
    named(str(tmp_path / "missing.json"))
  garbage = tmp_path / "garbage.json"
  garbage.write_text("{not json")
  with pytest.raises(DataError, match="garbage.json"):
    named(str(garbage))
  with pytest.raises(DataError, match=r"512.*300"):
    named(path, 300)


def test_tokenizer_is_pinned_in_workdir(tok, tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  path = str(tmp_path / "named.json")
  tok.save(path)
  cfg = dataclasses.replace(DataConfig(), tokenizer_path=path)
  load = lambda: tok_lib.load_or_train_tokenizer(cfg, VOCAB, list, "", workdir)
  load()
  pinned = os.path.join(workdir, "tokenizer.json")
  assert json.load(open(pinned)) == json.loads(tok.to_str())
  load()  # Identical: fine.
  tok.save(pinned, pretty=True)
  load()  # Same tokenizer, other layout: fine.
  with open(pinned, "w") as f:
    f.write(tok_lib.train_tokenizer(["a different corpus " * 50], 300).to_str())
  with pytest.raises(DataError, match="different tokenizer"):
    load()


def test_a_workdirs_pinned_tokenizer_is_the_runs_without_training_again(tok, tmp_path):
  """A new data phase changes what the default tokenizer would be trained on; the run keeps its pinned one."""
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  tok.save(os.path.join(workdir, "tokenizer.json"))

  def texts():
    raise AssertionError("a run with a pinned tokenizer trains none")

  got = tok_lib.load_or_train_tokenizer(DataConfig(), VOCAB, texts, "other data", workdir)
  assert json.loads(got.to_str()) == json.loads(tok.to_str())
