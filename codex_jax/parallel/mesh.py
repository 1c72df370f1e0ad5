"""Builds the named device mesh (data x tensor x pipeline) from the config, in one place."""

from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from codex_jax.config import schema
from codex_jax.config.validate import resolve_mesh_shape
from codex_jax.parallel import placement
from codex_jax.parallel.rules import MESH_AXES


def build_mesh(cfg: schema.MeshConfig, devices: list | None = None) -> Mesh:
  """A mesh over `devices` (default: all) shaped by cfg and placed by link (parallel/placement.py).

  The config was validated against the devices. Axes are Auto (GSPMD propagation steered by logical
  constraints) rather than jax 0.10's default Explicit, which would require every op in the model to carry
  a sharding in its type.
  """
  devices = list(jax.devices()) if devices is None else list(devices)
  sizes = resolve_mesh_shape(cfg, len(devices))
  return Mesh(placement.device_grid(sizes, devices), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def one_device_mesh(cfg: schema.MeshConfig) -> Mesh:
  """The mesh of a one-device config (checkpoint reads, evals, the importer), on this process's first device."""
  return build_mesh(cfg, jax.devices()[:1])


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of every [batch, length] input array: rows over `data`."""
  return NamedSharding(mesh, PartitionSpec("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
