"""WebDataset-style tar shards: each sample is the group of members sharing a key.

Layout:
  files      names ending .tar (uncompressed: records are read by offset, without parsing the tar).
  samples    a member "dir/000123.caption.txt" has key "dir/000123" (the name up to the first "." of its
             basename; a leading "./" is dropped) and extension "caption.txt" (lower-cased). Members of
             one key form one sample, in order of the key's first member; they need not be adjacent.
             Members without an extension, or whose basename starts with ".", are skipped, as in
             WebDataset; so are directories and links.
  extensions txt, caption.txt, text   UTF-8 text (the first present, in this order)
             json                     when no text member: its string "caption" (else "text") is the text
             png, jpg, jpeg, webp     image (the first present): grey -> uint8 [H, W, 1], RGB -> [H, W, 3],
                                      others (RGBA, palette, CMYK, 16-bit...) converted to RGB
             frames.npy               video, uint8 [T, H, W, C] (a .npy, no pickles)
             wav                      PCM audio, 8/16/24/32-bit, channels averaged to mono, float32 in
                                      [-1, 1] (divided by 2**(bits-1)), with its sample_rate
             tokens.npy               token ids, integer [N], returned as int32
             anything else            ignored (WebDataset convention: e.g. cls, metadata side files).
  names      "sample <key>".
  locator    {extension: [data offset, size], ..., "__key__": key}; a key with two members of one
             extension also holds "__error__", so that sample is reported malformed.
A sample with no text, image, video, audio or tokens, or whose members cannot be decoded, is malformed.
"""

from __future__ import annotations

import io
import json
import tarfile
import wave
from collections.abc import Callable

import numpy as np
from PIL import Image

from codex_jax.data.errors import DataError
from codex_jax.data.formats.base import Format, Locator, OpenFile
from codex_jax.data.records import MalformedRecord, Record, check_record

TEXT_EXTS = ("txt", "caption.txt", "text")
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
_WAV_DTYPES = {1: np.uint8, 2: np.dtype("<i2"), 4: np.dtype("<i4")}


class WdsFormat(Format):
  name = "wds"
  suffixes = (".tar",)
  defaults: dict = {}

  def scan(self, path: str, options: dict) -> list[tuple[str, Locator]]:
    samples: dict[str, dict] = {}
    try:
      with tarfile.open(path, mode="r:") as tar:
        for info in tar:
          split = _split(info.name)
          if not info.isfile() or split is None:
            continue
          key, ext = split
          sample = samples.setdefault(key, {"__key__": key})
          if ext in sample:
            sample["__error__"] = f"two members with extension {ext!r}"
          sample[ext] = [info.offset_data, info.size]
    except (OSError, tarfile.TarError, EOFError) as e:
      raise DataError(f"Cannot read {path} as an uncompressed tar: {e}") from e
    self.cache("files").put(path, OpenFile(path))  # Refreshed: the file may have changed.
    return [(f"sample {key}", sample) for key, sample in samples.items()]

  def read(self, path: str, locator: Locator, options: dict) -> Record:
    where = f"sample {locator.get('__key__', '?')}"
    if "__error__" in locator:
      raise MalformedRecord(path, where, locator["__error__"])
    file = self.cache("files").get(path, OpenFile)

    def member(ext: str) -> bytes:
      offset, size = locator[ext]
      data = file.read(offset, size)
      if len(data) != size:
        raise ValueError(f"member {ext!r} is cut short (was the file changed after indexing?)")
      return data

    try:
      record = _decode({ext for ext in locator if not ext.startswith("__")}, member)
    except (ValueError, OSError, EOFError, wave.Error, Image.DecompressionBombError) as e:
      raise MalformedRecord(path, where, str(e)) from None
    if not record:
      found = sorted(ext for ext in locator if not ext.startswith("__"))
      raise MalformedRecord(path, where, f"no recognised modality among members {found}; expected one of "
                                         f"{[*TEXT_EXTS, 'json', *IMAGE_EXTS, 'frames.npy', 'wav', 'tokens.npy']}")
    return check_record(record, path, where)


def _split(name: str) -> tuple[str, str] | None:
  """(key, extension) of a member name, or None for a member WebDataset skips."""
  folder, _, base = name.removeprefix("./").rpartition("/")
  stem, dot, ext = base.partition(".")
  if not stem or not dot or not ext:
    return None
  return f"{folder}/{stem}" if folder else stem, ext.lower()


def _decode(exts: set[str], member: Callable[[str], bytes]) -> Record:
  """The record of one sample; `member(ext)` returns a member's bytes. Raises ValueError when bad."""
  record: Record = {}
  text_ext = next((e for e in TEXT_EXTS if e in exts), None)
  if text_ext:
    try:
      record["text"] = member(text_ext).decode("utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"{text_ext} is not UTF-8: {e}") from None
  elif "json" in exts:
    text = _json_text(member("json"))
    if text is not None:
      record["text"] = text
  image_ext = next((e for e in IMAGE_EXTS if e in exts), None)
  if image_ext:
    record["image"] = _image(member(image_ext), image_ext)
  if "frames.npy" in exts:
    record["video"] = _npy(member("frames.npy"), "frames.npy")
  if "wav" in exts:
    record["audio"], record["sample_rate"] = _wav(member("wav"))
  if "tokens.npy" in exts:
    tokens = _npy(member("tokens.npy"), "tokens.npy")
    if tokens.dtype.kind in "iu" and tokens.size and (tokens.min() < -2**31 or tokens.max() >= 2**31):
      raise ValueError("tokens.npy holds ids outside int32")
    record["tokens"] = tokens.astype(np.int32) if tokens.dtype.kind in "iu" else tokens
  return record


def _json_text(data: bytes) -> str | None:
  try:
    obj = json.loads(data)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"json member is not valid JSON: {e}") from None
  if isinstance(obj, dict):
    for field in ("caption", "text"):
      if isinstance(obj.get(field), str):
        return obj[field]
  return None


def _image(data: bytes, ext: str) -> np.ndarray:
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      if image.mode == "L":
        return np.asarray(image, dtype=np.uint8)[:, :, None]
      return np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)
  except (OSError, SyntaxError, ValueError) as e:  # PIL raises all three for broken images.
    raise ValueError(f"cannot decode {ext} image: {e}") from None


def _npy(data: bytes, ext: str) -> np.ndarray:
  try:
    return np.load(io.BytesIO(data), allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise ValueError(f"cannot load {ext}: {e}") from None


def _wav(data: bytes) -> tuple[np.ndarray, int]:
  try:
    with wave.open(io.BytesIO(data), "rb") as w:
      width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
      frames = w.readframes(w.getnframes())
  except (wave.Error, EOFError) as e:
    raise ValueError(f"cannot read wav: {e}") from None
  if width == 3:  # 24-bit: widen each little-endian sample to int32, keeping the sign.
    raw = np.frombuffer(frames[:len(frames) // 3 * 3], np.uint8).reshape(-1, 3).astype(np.int32)
    samples = (raw[:, 0] | raw[:, 1] << 8 | raw[:, 2] << 16) << 8 >> 8
  elif width in _WAV_DTYPES:
    samples = np.frombuffer(frames[:len(frames) // width * width], _WAV_DTYPES[width]).astype(np.float64)
    if width == 1:
      samples -= 128  # 8-bit WAV is unsigned.
  else:
    raise ValueError(f"wav has {8 * width}-bit samples; expected 8, 16, 24 or 32-bit PCM")
  if channels < 1 or rate < 1:
    raise ValueError(f"wav has {channels} channels at {rate} Hz")
  samples = np.asarray(samples, np.float64)[:len(samples) // channels * channels].reshape(-1, channels)
  return (samples.mean(axis=1) / 2.0 ** (8 * width - 1)).astype(np.float32), int(rate)
