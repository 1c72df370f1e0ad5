"""Placement by link: `tensor` on the fastest link, then `pipeline`, then `data`, on fake clusters and real CPU devices."""

import dataclasses
import itertools

import jax
import numpy as np
import pytest

from codex_jax.cli import auto_layout
from codex_jax.config import schema
from codex_jax.parallel import layout_cost, placement, topology
from codex_jax.parallel.layout_cost import Layout
from codex_jax.parallel.mesh import build_mesh
from codex_jax.parallel.rules import MESH_AXES
from tests.helpers import config_dict


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  """What jax's mesh utilities read from a device."""

  id: int
  process_index: int
  platform: str
  device_kind: str
  slice_index: int = 0
  coords: tuple = (0, 0, 0)
  core_on_chip: int = 0


def gpu_hosts(hosts: int, per_host: int = 8) -> list[FakeDevice]:
  devices = [FakeDevice(h * per_host + i, h, "gpu", "NVIDIA H100 80GB HBM3") for h in range(hosts) for i in range(per_host)]
  return devices[1::2] + devices[::2]  # Not in id order: the builder must not lean on the list's order.


def v5p_slice(shape=(2, 2, 4), slice_index: int = 0, first_id: int = 0) -> list[FakeDevice]:
  """A v5p slice's chips at torus coordinates; a host holds a 2 x 2 x 1 block of them."""
  out = []
  for z, y, x in itertools.product(*(range(n) for n in shape[::-1])):
    host = (slice_index * shape[2] + z) if shape[:2] == (2, 2) else 0
    out.append(FakeDevice(first_id + len(out), host, "tpu", "TPU v5p", slice_index, (x, y, z)))
  return out


def groups(grid: np.ndarray, axis: str) -> list[list]:
  """The device groups that collectives over `axis` run in: all devices sharing the other axes' indices."""
  moved = np.moveaxis(grid, MESH_AXES.index(axis), -1)
  return [list(row) for row in moved.reshape(-1, moved.shape[-1])]


def sizes(data=1, tensor=1, pipeline=1) -> dict:
  return {"data": data, "tensor": tensor, "pipeline": pipeline}


def test_two_eight_gpu_hosts_keep_tensor_within_a_host():
  devices = gpu_hosts(2)
  grid = placement.device_grid(sizes(tensor=8, pipeline=2), devices)
  assert grid.shape == (1, 8, 2) and sorted(d.id for d in grid.flat) == list(range(16))
  for group in groups(grid, "tensor"):  # The case: jax.make_mesh put tensor on [0, 2, ..., 14].
    assert {d.process_index for d in group} == {group[0].process_index}
  for group in groups(grid, "pipeline"):
    assert {d.process_index for d in group} == {0, 1}
  grid = placement.device_grid(sizes(data=4, tensor=4), devices)
  assert all(len({d.process_index for d in g}) == 1 for g in groups(grid, "tensor"))
  for group in groups(grid, "data"):  # Two data replicas per host; the gradient all-reduce crosses hosts.
    assert sorted(d.process_index for d in group) == [0, 0, 1, 1]


def _contiguous(group) -> bool:
  coords = np.array([d.coords for d in group])
  low, high = coords.min(0), coords.max(0)
  return np.prod(high - low + 1) == len(group)  # A sub-cuboid of the torus: neighbours on ICI.


def test_a_v5p_slice_puts_tensor_groups_on_neighbouring_chips():
  devices = v5p_slice()
  for layout in (sizes(data=4, tensor=4), sizes(data=2, tensor=2, pipeline=4), sizes(data=8, tensor=2)):
    grid = placement.device_grid(layout, devices)
    assert sorted(d.id for d in grid.flat) == list(range(16))
    assert all(_contiguous(g) for g in groups(grid, "tensor")), layout
  # ICI spans the slice: one domain across its four hosts, whatever the process count.
  assert placement.fast_domains(devices) == (None, 1)


def test_two_slices_put_data_across_slices_and_tensor_inside_one():
  devices = v5p_slice((2, 2, 2), 0) + v5p_slice((2, 2, 2), 1, first_id=8)
  grid = placement.device_grid(sizes(data=2, tensor=8), devices)
  assert all(len({d.slice_index for d in g}) == 1 for g in groups(grid, "tensor"))
  assert all({d.slice_index for d in g} == {0, 1} for g in groups(grid, "data"))
  grid = placement.device_grid(sizes(data=4, tensor=2, pipeline=2), devices)
  assert all(len({d.slice_index for d in g}) == 1 for g in groups(grid, "tensor") + groups(grid, "pipeline"))
  assert all(sorted(d.slice_index for d in g) == [0, 0, 1, 1] for g in groups(grid, "data"))


def test_uneven_hosts_are_refused_by_name():
  devices = gpu_hosts(2)[:12]  # One host brought 8 GPUs, the other 4.
  with pytest.raises(ValueError, match="unevenly.*process_index"):
    placement.device_grid(sizes(data=3, tensor=4), devices)


def test_the_cost_model_reads_the_same_rule_as_the_builder():
  """Per axis, the link the cost model charges is the link the builder's groups actually cross."""
  cfg = auto_layout.base_config(config_dict("tiny"))
  h100 = topology.hypothetical("NVIDIA H100", 16)
  devices = gpu_hosts(2)
  for layout in (Layout(1, 8, 2), Layout(4, 4), Layout(2, 2, 4), Layout(16, 1), Layout(1, 16)):
    links = layout_cost.estimate(cfg, layout, h100).links
    grid = placement.device_grid(sizes(layout.data, layout.tensor, layout.pipeline), devices)
    for axis in MESH_AXES:
      hosts_per_group = len({d.process_index for d in groups(grid, axis)[0]})
      group_size = grid.shape[MESH_AXES.index(axis)]
      crossed = "fast" if hosts_per_group == 1 else ("slow" if hosts_per_group == group_size else "fast+slow")
      assert links[axis] == crossed, (layout, axis)


def test_the_cpu_mesh_puts_tensor_on_neighbouring_devices():
  mesh = build_mesh(schema.MeshConfig(data=1, tensor=4, pipeline=2))
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  assert mesh.axis_names == MESH_AXES and ids.shape == (1, 4, 2)
  assert [list(g) for g in ids[0].T] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # Each pipeline stage's tensor group.
  assert jax.device_count() == 8
