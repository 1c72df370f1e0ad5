"""Records -> model positions: tokenise text, patchify images and video, log-mel audio, embed steps.

Every record becomes one example: per position a token id (text), a modality id and a feature
vector (F = model.feature_dim, zero-padded), so one packed row can hold any mix of modalities.
Layouts (EOS ends every text span):

  image + caption         [image patches] [caption tokens, EOS]
  clip + audio + caption  [video tubelets] [audio patches] [caption tokens, EOS]
  embodied window         [instruction tokens, EOS] then per step: [frame patches] [proprio] [action]
  text / code / tokens    [tokens, EOS]

The next-token target of position i is the token at i+1 when that is text, so a caption is
predicted from its picture; positions followed by a non-text position carry no text loss.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import tokenizers
from PIL import Image

from codex_jax.data.errors import DataError
from codex_jax.data.records import MODALITY_IDS, Record
from codex_jax.data.tokenizer import EOS_ID, PAD_ID

EXAMPLE_FEATURES: dict[str, type] = {  # name -> dtype; each [n] except features [n, F].
    "inputs": np.int32, "targets": np.int32, "loss_mask": np.float32, "modality_ids": np.int32,
    "source_ids": np.int32, "features": np.float32,
    "example_ids": np.int64, "example_positions": np.int32,  # Identity: see data/sample_ids.py.
}


@dataclasses.dataclass(frozen=True)
class EncodeSpec:
  """How non-text modalities become positions (from DataConfig and ModelConfig)."""

  feature_dim: int = 96
  image_size: int = 16  # Pictures and frames are resized to image_size x image_size.
  patch_size: int = 4
  video_frames: int = 8  # Frames sampled uniformly from a clip.
  tubelet_frames: int = 2  # Frames per video tubelet.
  audio_sample_rate: int = 8000
  audio_mels: int = 16
  audio_patch_frames: int = 4  # 10 ms mel frames per audio position.

  def dims(self) -> dict[str, int]:
    p2 = self.patch_size * self.patch_size * 3
    return {"image": p2, "video": p2 * self.tubelet_frames, "audio": self.audio_mels * self.audio_patch_frames}

  def check(self) -> None:
    if self.image_size % self.patch_size or self.video_frames % self.tubelet_frames:
      raise DataError(f"data.image_size {self.image_size} must be a multiple of data.patch_size "
                      f"{self.patch_size}, and data.video_frames {self.video_frames} of data.tubelet_frames "
                      f"{self.tubelet_frames}.")
    widest = max(self.dims().items(), key=lambda kv: kv[1])
    if self.feature_dim and widest[1] > self.feature_dim:
      raise DataError(f"model.feature_dim {self.feature_dim} is narrower than a {widest[0]} position "
                      f"({widest[1]} values); raise it or shrink data.patch_size / tubelet_frames / audio_mels.")


def _resize(frames_NHWC: np.ndarray, size: int) -> np.ndarray:
  """uint8 [N, H, W, C] -> float32 [N, size, size, 3] in [-1, 1]."""
  out = []
  for frame in frames_NHWC:
    image = Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame)
    image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    out.append(np.asarray(image, np.float32))
  return np.stack(out) / 127.5 - 1.0


def _patchify(frames_NSSC: np.ndarray, spec: EncodeSpec, time: int) -> np.ndarray:
  """[N, S, S, 3] -> [N/time * (S/p)^2, time*p*p*3]: spatial patches, `time` frames deep."""
  n, s, _, c = frames_NSSC.shape
  p, g = spec.patch_size, s // spec.patch_size
  x = frames_NSSC.reshape(n // time, time, g, p, g, p, c)
  return x.transpose(0, 2, 4, 1, 3, 5, 6).reshape(n // time * g * g, time * p * p * c)


@functools.lru_cache(maxsize=4)
def _mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
  """Triangular HTK-mel filters [n_fft // 2 + 1, n_mels]."""
  to_mel = lambda hz: 2595.0 * np.log10(1.0 + hz / 700.0)
  to_hz = lambda mel: 700.0 * (10 ** (mel / 2595.0) - 1.0)
  edges_hz = to_hz(np.linspace(0.0, to_mel(sample_rate / 2), n_mels + 2))
  bins_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
  lower, centre, upper = edges_hz[:-2], edges_hz[1:-1], edges_hz[2:]
  up = (bins_hz[:, None] - lower) / (centre - lower)
  down = (upper - bins_hz[:, None]) / (upper - centre)
  return np.maximum(0.0, np.minimum(up, down)).astype(np.float32)


def log_mel(audio: np.ndarray, sample_rate: int, spec: EncodeSpec) -> np.ndarray:
  """Mono waveform -> log-mel frames [T, mels] (25 ms windows every 10 ms), roughly unit scale."""
  if sample_rate != spec.audio_sample_rate:  # Linear resampling: enough for 8 kHz speech-band features.
    duration = len(audio) / sample_rate
    grid = np.arange(int(duration * spec.audio_sample_rate)) / spec.audio_sample_rate
    audio = np.interp(grid, np.arange(len(audio)) / sample_rate, audio).astype(np.float32)
  rate = spec.audio_sample_rate
  window, hop = int(0.025 * rate), int(0.010 * rate)
  n_fft = 1 << (window - 1).bit_length()
  if len(audio) < window:
    audio = np.pad(audio, (0, window - len(audio)))
  starts = np.arange(0, len(audio) - window + 1, hop)
  frames = audio[starts[:, None] + np.arange(window)] * np.hanning(window).astype(np.float32)
  power = np.abs(np.fft.rfft(frames, n=n_fft)) ** 2
  mel = power @ _mel_filters(rate, n_fft, spec.audio_mels)
  return ((np.log(mel + 1e-6) + 5.0) / 5.0).astype(np.float32)


def _audio_patches(audio: np.ndarray, sample_rate: int, spec: EncodeSpec) -> np.ndarray:
  mel_TM = log_mel(audio, sample_rate, spec)
  t = spec.audio_patch_frames
  mel_TM = np.pad(mel_TM, ((0, -len(mel_TM) % t), (0, 0)))
  return mel_TM.reshape(-1, t * spec.audio_mels)


def _video_frames(video: np.ndarray, spec: EncodeSpec) -> np.ndarray:
  """Uniformly samples spec.video_frames frames (repeating when the clip is shorter)."""
  index = np.linspace(0, len(video) - 1, spec.video_frames).round().astype(int)
  return video[index]


class Encoder:
  """Record -> example dict (EXAMPLE_FEATURES); picklable, so it runs in grain workers."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, spec: EncodeSpec, source_id: int,
               rates: dict[str, float]):
    self.tokenizer, self.spec, self.source_id, self.rates = tokenizer, spec, source_id, rates

  def _text(self, record: Record) -> list[tuple[str, np.ndarray]]:
    if "tokens" in record:
      ids = np.asarray(record["tokens"], np.int32)
    elif "text" in record:
      ids = np.asarray(self.tokenizer.encode(record["text"]).ids, np.int32)
    else:
      return []
    return [("text", np.append(ids, np.int32(EOS_ID)))]

  def _media(self, record: Record) -> list[tuple[str, np.ndarray]]:
    spec, spans = self.spec, []
    if "image" in record:
      spans.append(("image", _patchify(_resize(record["image"][None], spec.image_size), spec, 1)))
    if "video" in record and "actions" not in record:
      frames = _resize(_video_frames(record["video"], spec), spec.image_size)
      spans.append(("video", _patchify(frames, spec, spec.tubelet_frames)))
    if "audio" in record:
      spans.append(("audio", _audio_patches(record["audio"], int(record["sample_rate"]), spec)))
    return spans

  def _steps(self, record: Record) -> list[tuple[str, np.ndarray]]:
    """An embodied window: per step, the frame's patches, then proprio, then the action."""
    spans = []
    frames = _resize(record["video"], self.spec.image_size) if "video" in record else None
    for t in range(len(record["actions"])):
      if frames is not None:
        spans.append(("video", _patchify(frames[t:t + 1], self.spec, 1)))
      if "proprio" in record:
        spans.append(("proprio", record["proprio"][t:t + 1]))
      spans.append(("action", record["actions"][t:t + 1]))
    return spans

  def spans(self, record: Record) -> list[tuple[str, np.ndarray]]:
    if "actions" in record:
      return self._text(record) + self._steps(record)
    return self._media(record) + self._text(record)

  def __call__(self, record: Record, example_id: int = 0) -> dict[str, np.ndarray]:
    return assemble(self.spans(record), self.spec.feature_dim, self.source_id, example_id)


def assemble(spans: list[tuple[str, np.ndarray]], feature_dim: int, source_id: int,
             example_id: int = 0) -> dict[str, np.ndarray]:
  """Concatenates spans (text: ids [n]; others: features [n, d]) into one example (id: sample_ids.py)."""
  total = sum(len(values) for _, values in spans)
  ids_n = np.zeros(total, np.int32)  # PAD_ID at non-text positions.
  modality_n = np.zeros(total, np.int32)
  features_nF = np.zeros((total, feature_dim), np.float32)
  start = 0
  for name, values in spans:
    end = start + len(values)
    modality_n[start:end] = MODALITY_IDS[name]
    if name == "text":
      ids_n[start:end] = values
    elif values.shape[1] > feature_dim:
      raise DataError(f"a {name} position has {values.shape[1]} values but model.feature_dim is {feature_dim}.")
    else:
      features_nF[start:end, :values.shape[1]] = values
    start = end
  next_is_text = np.zeros(total, bool)
  next_is_text[:-1] = modality_n[1:] == MODALITY_IDS["text"]
  targets = np.zeros(total, np.int32)
  targets[:-1] = np.where(next_is_text[:-1], ids_n[1:], PAD_ID)
  # A final EOS is only ever a target, never an input: text of n tokens (EOS included) gives n - 1
  # positions, as for plain language modelling. A final action or frame stays: other objectives use it.
  n = total - 1 if modality_n[-1] == MODALITY_IDS["text"] else total
  return {"inputs": ids_n[:n], "targets": targets[:n], "loss_mask": next_is_text[:n].astype(np.float32),
          "modality_ids": modality_n[:n], "source_ids": np.full(n, source_id, np.int32), "features": features_nF[:n],
          "example_ids": np.full(n, example_id, np.int64), "example_positions": np.arange(n, dtype=np.int32)}


def effective_tokens(example: dict[str, np.ndarray], rates_by_id: np.ndarray) -> float:
  """Positions weighted by their modality's exchange rate (rates_by_id[modality id])."""
  return float(rates_by_id[example["modality_ids"]].sum())
