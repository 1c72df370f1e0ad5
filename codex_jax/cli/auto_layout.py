"""`mesh.auto=True`: the config's mesh (and remat) replaced by the topology adapter's best layout."""

from __future__ import annotations

import copy
from typing import Any

from absl import logging

from codex_jax.config import load as config_load

# The layout keys a candidate sets; a config loaded for ranking has them neutral (one axis, no pipeline).
NEUTRAL_MESH = {"data": -1, "tensor": 1, "pipeline": 1, "schedule": "gpipe", "microbatches": 0, "repeats": 1}


def base_config(as_dict: dict[str, Any]):
  """The typed config with a neutral mesh: every rule checked except the layout's, which ranking checks."""
  neutral = copy.deepcopy(as_dict)
  neutral.setdefault("mesh", {}).update(NEUTRAL_MESH)
  return config_load.load(neutral, num_devices=None)


def resolve(as_dict: dict[str, Any], num_devices: int, num_processes: int = 1) -> dict[str, Any]:
  """`as_dict` with the best layout for `num_devices` (this host's devices, or as many of its kind)."""
  import jax

  from codex_jax.parallel import layout_cost, topology

  cfg = base_config(as_dict)
  if num_devices == jax.device_count():
    topo = topology.discover()
  else:
    topo = topology.hypothetical(jax.devices()[0].device_kind, num_devices, num_processes)
  choice = layout_cost.best(cfg, topo)
  chosen = copy.deepcopy(as_dict)
  for group, values in choice.layout.config_values().items():  # As layout_cost.apply sets them on a typed config.
    chosen.setdefault(group, {}).update(values)
  logging.info("mesh.auto: %s on %s (predicted %.3g s/step, %.2f GB/device%s); `codex mesh` shows the ranking",
               choice.layout.label(), topo.describe(), choice.step_s, choice.total_bytes / 1e9,
               "" if choice.fits else ", OVER the device memory")
  return chosen
