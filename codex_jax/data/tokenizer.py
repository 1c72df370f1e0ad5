"""Byte-level BPE tokenizer: load a named file, or train one on the corpus and cache it."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from codex_jax import atomic
from codex_jax.config.schema import DataConfig
from codex_jax.data.errors import DataError
from codex_jax.data.records import cache_dir

PAD_ID = 0
EOS_ID = 1
SPECIAL_TOKENS = ("<|pad|>", "<|endoftext|>")  # In id order: PAD_ID, EOS_ID.
# Bump when the training recipe changes, so cached tokenizers from the old recipe are not reused.
RECIPE_VERSION = "bytebpe-v1"
_MIN_VOCAB = len(SPECIAL_TOKENS) + 256  # Specials plus the byte alphabet.
PINNED_FILE = "tokenizer.json"


def pinned_path(workdir: str) -> str:
  """Where a run pins its tokenizer at its start; resume, eval, generate and export read it back from there."""
  return os.path.join(workdir, PINNED_FILE)


def _check(tok: tokenizers.Tokenizer, vocab_size: int, where: str) -> tokenizers.Tokenizer:
  size = tok.get_vocab_size(with_added_tokens=True)
  if size > vocab_size:
    raise DataError(
        f"Tokenizer {where} has {size} tokens but the model's vocab_size is {vocab_size}; "
        f"raise model.vocab_size to at least {size} or use a smaller tokenizer.")
  for want, token in enumerate(SPECIAL_TOKENS):
    if tok.token_to_id(token) != want:
      raise DataError(f"Tokenizer {where} must map {token!r} to id {want} "
                      f"(it maps it to {tok.token_to_id(token)}).")
  return tok


def load_tokenizer(path: str, vocab_size: int) -> tokenizers.Tokenizer:
  if not os.path.isfile(path):
    raise DataError(f"Tokenizer file not found: {path!r} (data.tokenizer_path).")
  try:
    tok = tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # The Rust side raises a bare Exception for malformed JSON.
    raise DataError(f"Tokenizer file {path!r} could not be loaded: {e}") from e
  return _check(tok, vocab_size, repr(path))


def train_tokenizer(texts: list[str], vocab_size: int) -> tokenizers.Tokenizer:
  if vocab_size < _MIN_VOCAB:
    raise DataError(f"vocab_size {vocab_size} is below {_MIN_VOCAB} "
                    "(256 byte tokens plus the special tokens).")
  tok = tokenizers.Tokenizer(models.BPE())
  # No prefix space: code is whitespace-sensitive and a document's first token should be its own.
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
  return tok


def load_or_train_tokenizer(data_cfg: DataConfig, vocab_size: int, texts: Callable[[], list[str]], data_key: str,
                            workdir: str | None) -> tokenizers.Tokenizer:
  """The run's tokenizer; with a workdir, also pinned there as tokenizer.json for resume.

  data.tokenizer_path names a file to load; else a workdir's pinned tokenizer is the run's (a new data phase
  keeps it); otherwise a BPE is trained on `texts()` and cached under a key of `data_key` (what the texts are
  drawn from), the vocab size and the recipe, so the texts are only read when no cached tokenizer exists.
  """
  pinned = pinned_path(workdir) if workdir else None
  if not data_cfg.tokenizer_path and pinned and os.path.isfile(pinned):
    return load_tokenizer(pinned, vocab_size)
  if data_cfg.tokenizer_path:
    tok = load_tokenizer(data_cfg.tokenizer_path, vocab_size)
  else:
    key = json.dumps([data_key, vocab_size, RECIPE_VERSION])
    name = hashlib.sha256(key.encode()).hexdigest() + ".json"
    path = os.path.join(cache_dir(), "tokenizers", name)
    if os.path.isfile(path):
      tok = tokenizers.Tokenizer.from_file(path)
    else:
      tok = train_tokenizer(texts(), vocab_size)
      atomic.write_text(path, tok.to_str())
    tok = _check(tok, vocab_size, repr(path))
  if workdir:
    _pin(tok, pinned_path(workdir))
  return tok


def _pin(tok: tokenizers.Tokenizer, path: str) -> None:
  text = tok.to_str()
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      existing = f.read()
    try:
      same = json.loads(existing) == json.loads(text)  # Parsed: a pretty-printed copy is the same.
    except ValueError:
      same = False
    if not same:
      raise DataError(
          f"{path} holds a different tokenizer than this run's; a resumed run must keep its "
          "tokenizer. Use a fresh workdir, or set data.tokenizer_path to that file.")
    return
  atomic.write_text(path, text)
