"""Embodied episodes: scripted controllers acting in Gymnasium's classic-control simulators, rendered to 32x32."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import os
from collections.abc import Callable

import numpy as np
from PIL import Image

from codex_jax.data.default_corpus import writers

EPISODES_PER_ENV = 12
FRAME_SIZE = 32
_SEED = 1000


def cartpole(obs: np.ndarray) -> float:
  """PD on the pole's angle and angular velocity, with a weak pull of the cart towards the centre."""
  x, v, angle, omega = (float(o) for o in obs)
  return float(angle + 0.5 * omega + 0.05 * x + 0.1 * v > 0)


def pendulum(obs: np.ndarray) -> float:
  """Energy-shaping swing-up far from the top; PD once the pendulum is within ~30 degrees of upright."""
  cos, sin, omega = (float(o) for o in obs)
  if cos > 0.85:
    torque = -(10.0 * math.atan2(sin, cos) + 2.0 * omega)
  else:
    # Energy relative to resting upright (theta'' = 15 sin(theta) in Pendulum-v1): pump while short, brake when over.
    energy = 0.5 * omega * omega + 15.0 * (cos - 1.0)
    torque = 2.0 * math.copysign(1.0, omega) if energy < 0 else -0.5 * omega
  return float(np.clip(torque, -2.0, 2.0))


def mountain_car(obs: np.ndarray) -> float:
  """Push in the direction of motion: each swing climbs higher until the car reaches the flag."""
  return 2.0 if obs[1] >= 0 else 0.0


def acrobot(obs: np.ndarray) -> float:
  """Torque on the elbow in the direction of the elbow's angular velocity, which pumps energy into the swing."""
  return 2.0 if obs[5] > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class Task:
  env: str
  instruction: str
  controller: Callable[[np.ndarray], float]
  max_steps: int
  discrete: bool


TASKS = (
    Task("CartPole-v1", "Balance the pole on the cart by pushing the cart left or right.", cartpole, 160, True),
    Task("Pendulum-v1", "Swing the pendulum up and hold it upright by applying torque at the pivot.", pendulum, 128,
         False),
    Task("MountainCar-v0", "Drive the underpowered car back and forth until it reaches the flag on the right hill.",
         mountain_car, 160, True),
    Task("Acrobot-v1", "Swing the two-link arm until its tip rises above the bar, using torque at the elbow.",
         acrobot, 160, True),
)


def succeeded(task: Task, obs: np.ndarray, steps: int, terminated: bool) -> bool:
  if task.env == "CartPole-v1":
    return steps == task.max_steps and not terminated  # Balanced for the whole episode.
  if task.env == "Pendulum-v1":
    return bool(obs[0] > 0.95 and abs(obs[2]) < 1.0)  # Ends upright and nearly still.
  return terminated  # MountainCar and Acrobot terminate exactly when the goal is reached.


def _frame(env) -> np.ndarray:
  image = Image.fromarray(env.render())
  # LANCZOS after a box pre-reduction: anti-aliased like a plain LANCZOS, several times faster on 600x400 frames.
  small = image.resize((FRAME_SIZE, FRAME_SIZE), Image.Resampling.LANCZOS, reducing_gap=2.0)
  return np.asarray(small.convert("RGB"), np.uint8)


def rollout(env, task: Task, seed: int) -> tuple[dict, dict[str, np.ndarray]]:
  """One seeded episode: (meta, {"frames", "proprio", "actions"}), step t holding the state seen before action t."""
  obs, _ = env.reset(seed=seed)
  frames, proprio, actions = [], [], []
  terminated = truncated = False
  while len(actions) < task.max_steps and not (terminated or truncated):
    frames.append(_frame(env))
    proprio.append(np.asarray(obs, np.float32))
    action = task.controller(obs)
    actions.append([action])
    obs, _, terminated, truncated, _ = env.step(int(action) if task.discrete else np.array([action], np.float32))
  meta = {"task": task.instruction, "env": task.env, "fps": int(env.metadata["render_fps"]),
          "num_steps": len(actions), "success": succeeded(task, obs, len(actions), terminated), "seed": seed}
  arrays = {"frames": np.stack(frames), "proprio": np.stack(proprio), "actions": np.asarray(actions, np.float32)}
  return meta, arrays


def _licence_file() -> str | None:
  try:
    dist = importlib.metadata.distribution("gymnasium")
  except importlib.metadata.PackageNotFoundError:
    return None
  for file in dist.files or ():
    if file.name.upper().startswith("LICENSE"):
      return str(dist.locate_file(file))
  return None


def build(root: str, *, limit: int | None = None) -> writers.Stats:
  """Writes embodied/episode_NNNNNN/{meta.json, frames.npy, proprio.npy, actions.npy}; tasks take turns."""
  # Before pygame is first imported (by the renderers): no window, no greeting on stdout.
  os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
  os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
  import gymnasium  # Imported late: it pulls in pygame, and only this source needs it.

  total = EPISODES_PER_ENV * len(TASKS) if limit is None else limit
  envs = {task.env: gymnasium.make(task.env, render_mode="rgb_array") for task in TASKS}
  stats = writers.Stats()
  try:
    for i in range(total):
      task = TASKS[i % len(TASKS)]
      meta, arrays = rollout(envs[task.env], task, _SEED + i)
      folder = os.path.join(root, "embodied", f"episode_{i:06d}")
      os.makedirs(folder, exist_ok=True)
      writers.write_json(os.path.join(folder, "meta.json"), meta)
      for name, array in arrays.items():
        writers.write_npy(os.path.join(folder, f"{name}.npy"), array)
      stats.files += 4
      stats.records += 1
      stats.bytes += sum(os.path.getsize(os.path.join(folder, f)) for f in sorted(os.listdir(folder)))
  finally:
    for env in envs.values():
      env.close()
  writers.copy_notice(_licence_file(), os.path.join(root, "embodied", "LICENSE"))
  return stats


def _version() -> str:
  try:
    return importlib.metadata.version("gymnasium")
  except importlib.metadata.PackageNotFoundError:
    return "(not installed)"


SOURCE = writers.Source(
    name="gymnasium-control", kind="embodied", licence="MIT", build=build,
    origin=f"Trajectories generated by codex-jax's scripted controllers (no learning) in Gymnasium {_version()}'s "
           "classic-control simulators CartPole-v1, Pendulum-v1, MountainCar-v0 and Acrobot-v1 (Gymnasium: MIT, "
           "notice in LICENSE), rendered by its pygame-ce renderers and resized to 32x32.")
