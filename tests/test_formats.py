"""Format readers and the validating index, on tiny files written by the tests themselves."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import re
import tarfile
import wave

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from codex_jax.data import fingerprint, formats
from codex_jax.data.errors import DataError
from codex_jax.data.records import MalformedRecord


def read_all(fmt: formats.Format, path: str, options: dict | None = None) -> list[tuple[str, dict]]:
  options = fmt.validate_options(options)
  return [(name, fmt.read(path, locator, options)) for name, locator in fmt.scan(path, options)]


def expect_malformed(fmt: formats.Format, path: str, locator, record: str, reason: str, options=None):
  with pytest.raises(MalformedRecord) as info:
    fmt.read(path, locator, fmt.validate_options(options))
  message = str(info.value)
  assert path in message and record in message and reason in message, message
  return info.value


# ---- jsonl ----

JSONL_LINES = ['{"text": "first"}', "", '{"text": "third", "id": 3}', "   ", '{"text": "fifth \\u00e9"}']


def write_jsonl(path, lines: list[str]) -> str:
  data = ("\n".join(lines) + "\n").encode()
  if str(path).endswith(".gz"):
    data = gzip.compress(data)
  elif str(path).endswith(".zst"):
    data = zstandard.ZstdCompressor().compress(data)
  path.write_bytes(data)
  return str(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_round_trip(tmp_path, suffix):
  path = write_jsonl(tmp_path / f"a{suffix}", JSONL_LINES)
  got = read_all(formats.JsonlFormat(), path)
  assert got == [("line 1", {"text": "first"}), ("line 3", {"text": "third"}), ("line 5", {"text": "fifth é"})]


def test_jsonl_compressed_same_records_as_plain(tmp_path):
  fmt = formats.JsonlFormat()
  plain = fmt.scan(write_jsonl(tmp_path / "a.jsonl", JSONL_LINES), {})
  for suffix in (".jsonl.gz", ".jsonl.zst"):
    assert fmt.scan(write_jsonl(tmp_path / f"a{suffix}", JSONL_LINES), {}) == plain


def test_jsonl_text_field_option(tmp_path):
  path = write_jsonl(tmp_path / "a.jsonl", ['{"content": "x = 1", "text": 5}'])
  assert read_all(formats.JsonlFormat(), path, {"text_field": "content"}) == [("line 1", {"text": "x = 1"})]


@pytest.mark.parametrize("line, reason", [
    ('{"text": "unterminated', "invalid JSON: Unterminated string"),
    ('["text"]', "expected a JSON object, got list"),
    ('{"body": "x"}', "no field 'text'"),
    ('{"text": 7}', "field 'text' is int, expected a string"),
    ('{"text": "  "}', "field 'text' is empty"),
])
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst"])
def test_jsonl_malformed(tmp_path, line, reason, suffix):
  path = write_jsonl(tmp_path / f"bad{suffix}", ['{"text": "ok"}', "", line])
  fmt = formats.JsonlFormat()
  records = fmt.scan(path, {})
  assert [name for name, _ in records] == ["line 1", "line 3"]
  expect_malformed(fmt, path, records[1][1], "line 3", reason)
  # A fresh reader (as in a grain worker) has no scan table and counts lines to name the record.
  expect_malformed(formats.JsonlFormat(), path, records[1][1], "line 3", reason)


def test_jsonl_unreadable_compressed_file(tmp_path):
  path = tmp_path / "cut.jsonl.gz"
  path.write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:-20])
  with pytest.raises(DataError, match=r"Cannot decompress .*cut\.jsonl\.gz"):
    formats.JsonlFormat().scan(str(path), {})
  (tmp_path / "x.jsonl.zst").write_bytes(b"not zstd")
  with pytest.raises(DataError, match=r"Cannot decompress .*x\.jsonl\.zst"):
    formats.JsonlFormat().scan(str(tmp_path / "x.jsonl.zst"), {})


# ---- parquet ----

def test_parquet_round_trip_over_row_groups(tmp_path):
  path = str(tmp_path / "a.parquet")
  texts = [f"doc {i}" for i in range(5)]
  pq.write_table(pa.table({"id": list(range(5)), "body": texts}), path, row_group_size=2)
  fmt = formats.ParquetFormat()
  records = fmt.scan(path, {"text_field": "body"})
  assert records == [("row 0", [0, 0]), ("row 1", [0, 1]), ("row 2", [1, 0]), ("row 3", [1, 1]), ("row 4", [2, 0])]
  assert read_all(fmt, path, {"text_field": "body"}) == [(f"row {i}", {"text": t}) for i, t in enumerate(texts)]


def test_parquet_malformed_rows_and_files(tmp_path):
  path = str(tmp_path / "a.parquet")
  pq.write_table(pa.table({"text": ["good", None, ""], "n": [1, 2, 3]}), path, row_group_size=2)
  fmt = formats.ParquetFormat()
  records = fmt.scan(path, {})
  expect_malformed(fmt, path, records[1][1], "row 1", "column 'text' is null")
  expect_malformed(fmt, path, records[2][1], "row 2", "column 'text' is empty")
  expect_malformed(fmt, path, records[0][1], "row 0", "holds int", {"text_field": "n"})
  with pytest.raises(DataError, match=r"a\.parquet has no column 'body'"):
    fmt.scan(path, {"text_field": "body"})
  (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
  with pytest.raises(DataError, match="junk.parquet as Parquet"):
    fmt.scan(str(tmp_path / "junk.parquet"), {})


# ---- wds ----

def png(array: np.ndarray, mode: str | None = None) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array, mode).save(buffer, format="PNG")
  return buffer.getvalue()


def wav(samples_TC: np.ndarray, rate: int = 16000) -> bytes:
  buffer = io.BytesIO()
  with wave.open(buffer, "wb") as w:
    w.setnchannels(samples_TC.shape[1])
    w.setsampwidth(2)
    w.setframerate(rate)
    w.writeframes(samples_TC.astype("<i2").tobytes())
  return buffer.getvalue()


def npy(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, array)
  return buffer.getvalue()


def write_tar(path, members: dict[str, bytes] | list[tuple[str, bytes]]) -> str:
  with tarfile.open(path, "w") as tar:
    for name, data in members.items() if isinstance(members, dict) else members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return str(path)


RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (4, 5, 3), dtype=np.uint8)
GREY = RNG.integers(0, 256, (3, 2), dtype=np.uint8)
RGBA = RNG.integers(0, 256, (2, 3, 4), dtype=np.uint8)
STEREO = RNG.integers(-32768, 32768, (50, 2)).astype(np.int16)
FRAMES = RNG.integers(0, 256, (2, 3, 4, 3), dtype=np.uint8)


def test_wds_round_trip(tmp_path):
  path = write_tar(tmp_path / "shard.tar", {
      "000000.txt": b"a red square", "000000.png": png(RGB), "000000.cls": b"3",
      "000001.json": b'{"caption": "grey", "width": 2}', "000001.png": png(GREY, "L"),
      "000002.wav": wav(STEREO, 8000),
      "000003.frames.npy": npy(FRAMES), "000003.tokens.npy": npy(np.arange(4, dtype=np.int64)),
      "./sub/000004.caption.txt": b"nested", "sub/000004.png": png(RGBA, "RGBA"),
  })
  got = dict(read_all(formats.WdsFormat(), path))
  assert list(got) == [f"sample {k}" for k in ("000000", "000001", "000002", "000003", "sub/000004")]
  assert got["sample 000000"]["text"] == "a red square"
  np.testing.assert_array_equal(got["sample 000000"]["image"], RGB)
  assert got["sample 000001"]["text"] == "grey"
  np.testing.assert_array_equal(got["sample 000001"]["image"], GREY[:, :, None])
  audio = got["sample 000002"]
  assert audio["sample_rate"] == 8000 and audio["audio"].dtype == np.float32 and "text" not in audio
  np.testing.assert_allclose(audio["audio"], STEREO.astype(np.float64).mean(axis=1) / 32768, atol=1 / 32767)
  np.testing.assert_array_equal(got["sample 000003"]["video"], FRAMES)
  assert got["sample 000003"]["tokens"].dtype == np.int32
  np.testing.assert_array_equal(got["sample 000003"]["tokens"], [0, 1, 2, 3])
  assert got["sample sub/000004"]["text"] == "nested"
  np.testing.assert_array_equal(got["sample sub/000004"]["image"], RGBA[:, :, :3])


@pytest.mark.parametrize("members, reason", [
    ({"000002.txt": b"x", "000002.jpg": b"not a jpeg"}, "cannot decode jpg image"),
    ({"000002.wav": b"RIFF....WAVEjunk"}, "cannot read wav"),
    ({"000002.frames.npy": b"\x93NUMPY garbage"}, "cannot load frames.npy"),
    ({"000002.tokens.npy": npy(np.ones(3, np.float32))}, "field 'tokens' is float32"),
    ({"000002.cls": b"1", "000002.json": b'{"label": 1}'}, "no recognised modality"),
    ({"000002.txt": b"\xff\xfe"}, "txt is not UTF-8"),
])
def test_wds_malformed(tmp_path, members, reason):
  path = write_tar(tmp_path / "shard.tar", {"000001.txt": b"fine", **members})
  fmt = formats.WdsFormat()
  records = fmt.scan(path, {})
  assert fmt.read(path, records[0][1], {}) == {"text": "fine"}
  expect_malformed(fmt, path, records[1][1], "sample 000002", reason)


def test_wds_two_members_of_one_extension_make_the_sample_malformed(tmp_path):
  path = write_tar(tmp_path / "dup.tar", [("a.txt", b"one"), ("b.txt", b"fine"), ("a.txt", b"two")])
  fmt = formats.WdsFormat()
  records = fmt.scan(path, {})
  assert [name for name, _ in records] == ["sample a", "sample b"]
  expect_malformed(fmt, path, records[0][1], "sample a", "two members with extension 'txt'")


def test_wds_not_a_tar(tmp_path):
  (tmp_path / "x.tar").write_bytes(gzip.compress(b"x" * 1000))
  with pytest.raises(DataError, match=r"x\.tar as an uncompressed tar"):
    formats.WdsFormat().scan(str(tmp_path / "x.tar"), {})


# ---- episodes ----

def write_episode(root, name: str, steps: int, meta: dict | None = None, meta_text: str | None = None,
                  **arrays: np.ndarray | None) -> str:
  """An episode directory; `meta` / `arrays` override the good defaults (None: leave the file out)."""
  folder = root / name
  folder.mkdir(parents=True)
  meta = {"task": f"push the block ({name})", "env": "PushT", "fps": 10, "num_steps": steps, "success": True,
          **(meta or {})}
  arrays = {"frames": np.arange(steps * 2 * 2 * 3, dtype=np.uint8).reshape(steps, 2, 2, 3),
            "proprio": np.arange(steps * 2, dtype=np.float32).reshape(steps, 2),
            "actions": -np.arange(steps, dtype=np.float32).reshape(steps, 1), **arrays}
  (folder / "meta.json").write_text(json.dumps(meta) if meta_text is None else meta_text)
  for key, array in arrays.items():
    if array is not None:
      np.save(folder / f"{key}.npy", array)
  return str(folder)


def test_episodes_windows_keep_partial_last_window_of_two_steps(tmp_path):
  fmt = formats.EpisodesFormat()
  long = write_episode(tmp_path, "episode_000", 19)
  short = write_episode(tmp_path, "episode_001", 17)
  (tmp_path / "notes").mkdir()
  assert fmt.files(str(tmp_path)) == [long, short]
  assert fmt.files(long) == [long] and fmt.files(str(tmp_path / "episode_*")) == [long, short]
  assert fmt.scan(long, {}) == [("episode_000 window 0", [0, 8]), ("episode_000 window 8", [8, 16]),
                                ("episode_000 window 16", [16, 19])]
  assert [loc for _, loc in fmt.scan(short, {})] == [[0, 8], [8, 16]]  # A 1-step tail is dropped.
  assert [loc for _, loc in fmt.scan(long, {"window_steps": 10})] == [[0, 10], [10, 19]]
  record = fmt.read(long, [16, 19], {})
  assert record["text"] == "push the block (episode_000)"
  frames = np.arange(19 * 12, dtype=np.uint8).reshape(19, 2, 2, 3)
  np.testing.assert_array_equal(record["video"], frames[16:19])
  np.testing.assert_array_equal(record["proprio"], np.arange(38, dtype=np.float32).reshape(19, 2)[16:19])
  np.testing.assert_array_equal(record["actions"], [[-16.0], [-17.0], [-18.0]])


@pytest.mark.parametrize("overrides, reason", [
    ({"actions": None}, "missing actions.npy"),
    ({"meta_text": "{not json"}, "meta.json is not valid JSON"),
    ({"meta": {"num_steps": 12}}, "frames.npy has 10 steps but meta.json says num_steps=12"),
    ({"proprio": np.zeros((10, 2), np.float64)}, "proprio.npy is float64[10, 2]; expected float32 [T, P]"),
    ({"frames": np.zeros((10, 4, 3), np.uint8)}, "frames.npy is uint8[10, 4, 3]; expected uint8 [T, H, W, C]"),
    ({"meta": {"task": 3}}, "'task' is 3; expected str"),
])
def test_episodes_malformed_episode_is_one_bad_window(tmp_path, overrides, reason):
  path = write_episode(tmp_path, "episode_007", 10, **overrides)
  fmt = formats.EpisodesFormat()
  assert fmt.scan(path, {}) == [("episode_007 window 0", [0, 0])]
  expect_malformed(fmt, path, [0, 0], "episode_007 window 0", reason)
  index = _index(fmt, path, {})
  assert index.records == [] and index.malformed[0][0] == "episode_007 window 0" and reason in index.malformed[0][1]


# ---- array_record ----

def test_array_record_round_trip_and_malformed(tmp_path):
  path = str(tmp_path / "tokens.array_record")
  sequences = [[1, 2, 3], np.array([2**31 - 1, -5], np.int64), range(7)]
  assert formats.write_token_records(path, sequences) == 3
  got = read_all(formats.ArrayRecordFormat(), path)
  assert [name for name, _ in got] == ["record 0", "record 1", "record 2"]
  for (_, record), want in zip(got, sequences, strict=True):
    assert record["tokens"].dtype == np.int32
    np.testing.assert_array_equal(record["tokens"], np.asarray(want))
  bad = str(tmp_path / "bad.array_record-00000-of-00001")
  writer = ArrayRecordWriter(bad, "group_size:1")
  for data in (np.int32(4).tobytes(), b"", b"abcdef"):
    writer.write(data)
  writer.close()
  fmt = formats.ArrayRecordFormat()
  assert fmt.files(str(tmp_path)) == sorted([path, bad])
  assert fmt.scan(bad, {}) == [("record 0", 0), ("record 1", 1), ("record 2", 2)]
  expect_malformed(fmt, bad, 1, "record 1", "empty record")
  expect_malformed(fmt, bad, 2, "record 2", "6 bytes is not a whole number of int32")
  with pytest.raises(DataError, match="outside int32"):
    formats.write_token_records(str(tmp_path / "big.array_record"), [[2**31]])
  (tmp_path / "junk.array_record").write_bytes(b"junk" * 100)
  with pytest.raises(DataError, match="junk.array_record as an ArrayRecord file"):
    fmt.scan(str(tmp_path / "junk.array_record"), {})


# ---- index ----

def _index(fmt, path, options):
  return formats.index_file(fmt, path, options, fingerprint.file_sha256(path))


def test_index_lists_malformed_and_keeps_good(tmp_path, monkeypatch):
  monkeypatch.setenv("CODEX_CACHE_DIR", str(tmp_path / "cache"))
  path = write_jsonl(tmp_path / "a.jsonl", ['{"text": "a"}', "{oops", "", '{"text": ""}', '{"text": "e"}'])
  index = _index(formats.get_format("jsonl"), path, {})
  assert index.path == path
  assert index.records == [("line 1", [0, 13]), ("line 5", [34, 13])]
  assert [name for name, _ in index.malformed] == ["line 2", "line 4"]
  assert "invalid JSON" in index.malformed[0][1] and "is empty" in index.malformed[1][1]


def test_index_cache_used_until_file_changes(tmp_path, monkeypatch):
  monkeypatch.setenv("CODEX_CACHE_DIR", str(tmp_path / "cache"))
  path = write_jsonl(tmp_path / "a.jsonl", ['{"text": "a"}', '{"text": "b"}'])
  fmt = formats.JsonlFormat()
  first = _index(fmt, path, {})
  assert len(first.records) == 2 and not first.malformed
  [cache_file] = os.listdir(tmp_path / "cache" / "index")

  def fail(*args):
    raise AssertionError("validated again")

  monkeypatch.setattr(fmt, "read", fail)
  monkeypatch.setattr(fmt, "scan", fail)
  assert _index(fmt, path, {"text_field": "text"}) == first  # Same options once defaults are merged.
  monkeypatch.undo()
  monkeypatch.setenv("CODEX_CACHE_DIR", str(tmp_path / "cache"))
  # Same size, one byte different, the old modification time put back: validated again (keyed by content).
  stat = os.stat(path)
  write_jsonl(tmp_path / "a.jsonl", ['{"text": "a"}', '{"text": 123}'])
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  assert os.path.getsize(path) == stat.st_size
  second = _index(fmt, path, {})
  assert second.records == first.records[:1] and second.malformed[0][0] == "line 2"
  [second_file] = set(os.listdir(tmp_path / "cache" / "index")) - {cache_file}
  # A corrupt cache file is ignored and rebuilt.
  (tmp_path / "cache" / "index" / second_file).write_text("{truncated")
  assert _index(fmt, path, {}) == second
  cached = json.loads((tmp_path / "cache" / "index" / second_file).read_text())
  assert cached["names"] == ["line 1"] and cached["locators"] == [[0, 13]] and cached["malformed"][0][0] == "line 2"


# ---- pickling, options, files ----

def test_formats_pickle_without_caches(tmp_path):
  jsonl = write_jsonl(tmp_path / "a.jsonl.zst", ['{"text": "z"}'])
  parquet = str(tmp_path / "a.parquet")
  pq.write_table(pa.table({"text": ["p"]}), parquet)
  tar = write_tar(tmp_path / "a.tar", {"k.txt": b"w"})
  episode = write_episode(tmp_path, "episode_0", 4)
  array_record = str(tmp_path / "a.array_record")
  formats.write_token_records(array_record, [[9]])
  for fmt, path in [(formats.JsonlFormat(), jsonl), (formats.ParquetFormat(), parquet), (formats.WdsFormat(), tar),
                    (formats.EpisodesFormat(), episode), (formats.ArrayRecordFormat(), array_record)]:
    [(name, before)] = read_all(fmt, path)
    assert fmt.__dict__.get("_caches"), fmt.name
    clone = pickle.loads(pickle.dumps(fmt))
    assert "_caches" not in clone.__dict__
    locator = fmt.scan(path, {})[0][1]
    after = clone.read(path, locator, {})
    assert before.keys() == after.keys(), fmt.name
    for key in before:
      np.testing.assert_array_equal(before[key], after[key])


def test_options_and_format_names():
  assert formats.OPTIONS["jsonl"] == {"text_field": "text"} and formats.OPTIONS["episodes"] == {"window_steps": 8}
  assert formats.validate_options("episodes", {"window_steps": 4}) == {"window_steps": 4}
  with pytest.raises(DataError, match=r"Unknown option 'text_feild' for format 'jsonl'; allowed: \['text_field'\]"):
    formats.validate_options("jsonl", {"text_feild": "body"})
  with pytest.raises(DataError, match="must be a int"):
    formats.validate_options(formats.get_format("episodes"), {"window_steps": "8"})
  with pytest.raises(DataError, match=">= 1"):
    formats.validate_options("episodes", {"window_steps": 0})
  with pytest.raises(DataError, match=r"Unknown data format 'csv'; known formats: \['array_record', 'episodes'"):
    formats.get_format("csv")


def test_files_directories_globs_and_missing(tmp_path):
  for name in ("b.jsonl", "sub/a.jsonl.gz", "sub/deeper/c.jsonl.zst", "sub/notes.txt", ".hidden/d.jsonl"):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(b"")
  fmt = formats.get_format("jsonl")
  want = [str(tmp_path / n) for n in ("b.jsonl", "sub/a.jsonl.gz", "sub/deeper/c.jsonl.zst")]
  assert fmt.files(str(tmp_path)) == want
  assert fmt.files(str(tmp_path / "**" / "*.jsonl*")) == want
  assert fmt.files(str(tmp_path / "b.jsonl")) == want[:1]
  missing = str(tmp_path / "nowhere" / "*.jsonl")
  with pytest.raises(DataError, match=re.escape(f"No jsonl files at '{missing}'")):
    fmt.files(missing)
  with pytest.raises(DataError, match="No parquet files at"):
    formats.get_format("parquet").files(str(tmp_path))
  with pytest.raises(DataError, match="No episodes at"):
    formats.get_format("episodes").files(str(tmp_path / "missing"))
