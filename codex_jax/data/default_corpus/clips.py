"""Procedural video clips with sound: coloured shapes that move and bounce, a tone per shape, a click per bounce."""

from __future__ import annotations

import dataclasses
import io
import wave

import numpy as np

from codex_jax.data.default_corpus import writers

NUM_CLIPS = 400
SAMPLES_PER_SHARD = 100
FRAMES, SIZE, FPS = 16, 32, 16  # 16 frames at 16 fps: one second, the length of the sound.
SAMPLE_RATE = 8000
_SEED = 7411
_SUPER = 4  # Sub-pixel samples per axis: shape edges are anti-aliased, not jagged.

PITCH_HZ = {"square": 220, "circle": 440, "triangle": 660}  # The sound tells the shape.
COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (60, 90, 235), "yellow": (235, 210, 40),
    "orange": (240, 140, 30), "purple": (160, 70, 210), "white": (240, 240, 240), "cyan": (40, 200, 210),
}
BACKGROUNDS = {"black": (12, 12, 16), "grey": (110, 110, 110), "dark blue": (18, 28, 72), "dark green": (16, 52, 30)}
DIRECTIONS = ("right", "up and to the right", "up", "up and to the left", "left", "down and to the left", "down",
              "down and to the right")


@dataclasses.dataclass
class Shape:
  kind: str
  colour: str
  radius: float
  x: float
  y: float
  vx: float
  vy: float
  direction: str
  bounces: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (frame, wall)


def _random_shape(rng: np.random.Generator) -> Shape:
  kind = str(rng.choice(list(PITCH_HZ)))
  colour = str(rng.choice(list(COLOURS)))
  radius = float(rng.uniform(3.0, 5.5))
  d = int(rng.integers(len(DIRECTIONS)))
  angle = d * np.pi / 4 + rng.uniform(-0.15, 0.15)
  speed = rng.uniform(0.5, 1.6)
  x, y = rng.uniform(radius, SIZE - 1 - radius, size=2)
  # Screen rows grow downwards, so "up" is negative y.
  return Shape(kind, colour, radius, float(x), float(y), float(speed * np.cos(angle)), float(-speed * np.sin(angle)),
               DIRECTIONS[d])


def _step(shape: Shape, frame: int) -> None:
  lo, hi = shape.radius, SIZE - 1 - shape.radius
  shape.x += shape.vx
  shape.y += shape.vy
  for axis, walls in (("x", ("left", "right")), ("y", ("top", "bottom"))):
    pos, vel = getattr(shape, axis), getattr(shape, "v" + axis)
    if pos < lo or pos > hi:
      wall = walls[0] if pos < lo else walls[1]
      pos = 2 * lo - pos if pos < lo else 2 * hi - pos
      setattr(shape, axis, pos)
      setattr(shape, "v" + axis, -vel)
      shape.bounces.append((frame, wall))


def _background(rng: np.random.Generator) -> tuple[np.ndarray, str]:
  name = str(rng.choice(list(BACKGROUNDS)))
  base = np.array(BACKGROUNDS[name], np.float32)
  if rng.random() < 0.5:
    return np.broadcast_to(base, (SIZE, SIZE, 3)).copy(), f"a plain {name} background"
  ramp = np.linspace(0.55, 1.45, SIZE, dtype=np.float32)
  vertical = rng.random() < 0.5
  ramp = ramp[:, None, None] if vertical else ramp[None, :, None]
  image = np.clip(np.broadcast_to(base * ramp, (SIZE, SIZE, 3)) + 6.0, 0, 255).astype(np.float32)
  return image, f"a {'vertical' if vertical else 'horizontal'} {name} gradient"


def _coverage(shape: Shape) -> np.ndarray:
  """Fraction of each pixel that the shape covers, [SIZE, SIZE] in [0, 1]."""
  grid = (np.arange(SIZE * _SUPER, dtype=np.float32) + 0.5) / _SUPER - 0.5
  dx, dy = grid[None, :] - shape.x, grid[:, None] - shape.y
  r = shape.radius
  if shape.kind == "circle":
    inside = dx * dx + dy * dy <= r * r
  elif shape.kind == "square":
    inside = (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
  else:  # An upward triangle: below both slanted edges and above the base.
    inside = (dy <= r * 0.6) & (dy >= -r + 1.7 * np.abs(dx))
  return inside.reshape(SIZE, _SUPER, SIZE, _SUPER).mean(axis=(1, 3))


def _frames(shapes: list[Shape], background: np.ndarray) -> np.ndarray:
  video = np.empty((FRAMES, SIZE, SIZE, 3), np.uint8)
  for t in range(FRAMES):
    if t:
      for shape in shapes:
        _step(shape, t)
    image = background.copy()
    for shape in shapes:
      alpha = _coverage(shape)[..., None]
      image = image * (1 - alpha) + np.array(COLOURS[shape.colour], np.float32) * alpha
    video[t] = np.clip(np.rint(image), 0, 255).astype(np.uint8)
  return video


def _sound(shapes: list[Shape], rng: np.random.Generator) -> np.ndarray:
  """One second of float audio: each shape's tone, louder just after its bounces, and a click at each bounce."""
  t = np.arange(SAMPLE_RATE, dtype=np.float64) / SAMPLE_RATE
  fade = np.minimum(1.0, np.minimum(t, 1.0 - t) / 0.02)  # 20 ms fades: no click at the clip's edges.
  audio = np.zeros_like(t)
  for shape in shapes:
    loudness = np.full_like(t, 0.18)
    for frame, _ in shape.bounces:
      onset = frame / FPS
      after = t >= onset
      loudness[after] += 0.22 * np.exp(-(t[after] - onset) / 0.12)
      n = int(0.015 * SAMPLE_RATE)
      start = int(onset * SAMPLE_RATE)
      burst = rng.standard_normal(n) * np.exp(-np.arange(n) / (0.003 * SAMPLE_RATE)) * 0.5
      audio[start:start + n] += burst[:len(audio) - start]
    audio += loudness * np.sin(2 * np.pi * PITCH_HZ[shape.kind] * t)
  return np.clip(audio * fade, -1.0, 1.0)


def wav_bytes(audio: np.ndarray) -> bytes:
  buf = io.BytesIO()
  with wave.open(buf, "wb") as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(SAMPLE_RATE)
    w.writeframes(np.rint(audio * 32767).astype("<i2").tobytes())
  return buf.getvalue()


def _when(frame: int) -> str:
  return "early on" if frame < FRAMES / 3 else ("halfway through" if frame < 2 * FRAMES / 3 else "near the end")


def _a(word: str) -> str:
  return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _motion(shape: Shape, article: str) -> str:
  text = f"{article} {shape.colour} {shape.kind} moves {shape.direction}"
  firsts: dict[str, int] = {}
  for frame, wall in shape.bounces:
    firsts.setdefault(wall, frame)
  hits = [f"the {wall} wall {_when(frame)}" for wall, frame in firsts.items()]
  return f"{text} and bounces off " + " and then ".join(hits) if hits else text


def caption(shapes: list[Shape], background: str, variant: int) -> str:
  """Shape, colour, direction, bounces and sound of a clip, in one of three sentence forms."""
  first = shapes[0]
  motions = [_motion(first, _a(first.colour)[:-len(first.colour) - 1])]
  if len(shapes) > 1:
    second = shapes[1]
    same = (second.kind, second.colour) == (first.kind, first.colour)
    motions.append(_motion(second, "another" if same else _a(second.colour)[:-len(second.colour) - 1]))
  scene = motions[0][0].upper() + motions[0][1:] + (f", while {motions[1]}" if len(motions) > 1 else "")
  pitches = list(dict.fromkeys(PITCH_HZ[s.kind] for s in shapes))
  tones = " and ".join(f"a {p} Hz tone" for p in pitches)
  clicks = sum(len(s.bounces) for s in shapes)
  if clicks == 0:
    sound = tones.replace("a ", "a steady ", 1)
  elif clicks == 1:
    sound = f"{tones} with a click at the bounce"
  else:
    sound = f"{tones} with a click at each of the {clicks} bounces"
  if variant == 0:
    return f"{scene}; {sound}."
  if variant == 1:
    return f"{scene}, over {background}. Sound: {sound}."
  return f"Over {background}, {scene[0].lower() + scene[1:]}. You hear {sound}."


def clip(index: int) -> tuple[np.ndarray, np.ndarray, str]:
  """(frames uint8 [16, 32, 32, 3], audio float [8000] in [-1, 1], caption) of clip `index`; its own seed."""
  rng = np.random.default_rng([_SEED, index])
  background, background_words = _background(rng)
  shapes = [_random_shape(rng) for _ in range(2 if rng.random() < 0.35 else 1)]
  video = _frames(shapes, background)
  return video, _sound(shapes, rng), caption(shapes, background_words, int(rng.integers(3)))


def build(root: str, *, limit: int | None = None) -> writers.Stats:
  """Writes clips/clips-0000N.tar: per sample `<key>.frames.npy`, `<key>.wav` (1 s, 8 kHz, 16-bit) and `<key>.txt`."""
  n = NUM_CLIPS if limit is None else min(limit, NUM_CLIPS)

  def sample(i: int) -> tuple[str, dict[str, bytes]]:
    video, audio, text = clip(i)
    return f"{i:06d}", {"frames.npy": writers.npy_bytes(video), "wav": wav_bytes(audio), "txt": text.encode("utf-8")}

  shards = ([sample(i) for i in keys] for keys in writers.chunk_by_count(range(n), SAMPLES_PER_SHARD))
  return writers.write_shards(root, "clips", "clips", ".tar", shards, writers.write_tar)


SOURCE = writers.Source(
    name="procedural-clips", kind="video", licence="CC0-1.0", build=build,
    origin="Generated by codex-jax's procedural renderer and synthesiser (codex_jax/data/default_corpus/clips.py); "
           "the codex-jax authors dedicate this generated data to the public domain under CC0 1.0.")
