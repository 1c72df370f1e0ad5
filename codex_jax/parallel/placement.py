"""Where each mesh axis lands on the machine: `tensor` on the fastest link, then `pipeline`, then `data`.

One rule for the mesh builder and the layout cost model. Devices come in fast domains (a TPU slice, joined
by ICI; a GPU host or, on CPU, a process, joined by NVLink or memory): walking the axes innermost first,
each axis takes the share of what is left of a fast domain that its size has in common with it, and the
rest of the axis spans fast domains over the slow link (DCN, InfiniBand). Within a domain jax's
`mesh_utils` orders devices by the physical torus; across domains `create_hybrid_device_mesh` tiles them.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping, Sequence

import numpy as np
from jax.experimental import mesh_utils

from codex_jax.parallel.rules import MESH_AXES

INNERMOST_FIRST = ("tensor", "pipeline", "data")


def split_by_link(sizes: Mapping[str, int], fast_domain: int) -> tuple[dict[str, int], dict[str, int]]:
  """(fast part, slow part) of each axis: fast[a] * slow[a] == sizes[a]; the fast parts fill one domain."""
  left, fast, slow = fast_domain, {}, {}
  for axis in INNERMOST_FIRST:
    fast[axis] = math.gcd(sizes[axis], left)
    slow[axis] = sizes[axis] // fast[axis]
    left //= fast[axis]
  return fast, slow


def link(fast_part: int, slow_part: int) -> str:
  """The link an axis crosses: "fast", "slow", or both (whole fast domains and the slow link between them)."""
  if slow_part == 1:
    return "fast"
  return "slow" if fast_part == 1 else "fast+slow"


def describe(sizes: Mapping[str, int], fast_domain: int, domain: str) -> str:
  """One line: where each axis of size > 1 lands, e.g. "tensor 8: within a host; pipeline 2: across 2 hosts"."""
  fast, slow = split_by_link(sizes, fast_domain)
  parts = []
  for axis in INNERMOST_FIRST:
    if sizes[axis] == 1:
      continue
    where = {"fast": f"within a {domain}", "slow": f"across {slow[axis]} {domain}s",
             "fast+slow": f"{fast[axis]} per {domain} x {slow[axis]} {domain}s"}[link(fast[axis], slow[axis])]
    parts.append(f"{axis} {sizes[axis]}: {where}")
  return "; ".join(parts) or "one device"


def fast_domains(devices: Sequence) -> tuple[str | None, int]:
  """(device attribute that names a device's fast domain, or None for one domain; number of domains)."""
  attr = "slice_index" if devices[0].platform == "tpu" else "process_index"
  members = collections.Counter(getattr(d, attr, 0) for d in devices)
  if len(set(members.values())) > 1:
    raise ValueError(f"devices are spread unevenly over fast domains ({attr} -> device count: "
                     f"{dict(sorted(members.items()))}); every host or slice must bring the same number")
  return (attr if len(members) > 1 else None), len(members)


def device_grid(sizes: Mapping[str, int], devices: Sequence) -> np.ndarray:
  """`devices` as an array shaped like the mesh (MESH_AXES order), placed by `split_by_link`.

  The fast parts always fill a domain exactly: each prime factor of the domain size is taken by the
  innermost axes that have it, and the axis sizes multiply to the device count, a multiple of the domain.
  """
  outer_first = INNERMOST_FIRST[::-1]  # mesh_utils wants the most communication-heavy axis last.
  attr, domains = fast_domains(devices)
  if attr is None:
    grid = mesh_utils.create_device_mesh([sizes[a] for a in outer_first], list(devices),
                                         allow_split_physical_axes=True)
  else:
    fast, slow = split_by_link(sizes, len(devices) // domains)
    grid = mesh_utils.create_hybrid_device_mesh(
        [fast[a] for a in outer_first], [slow[a] for a in outer_first], list(devices),
        process_is_granule=attr == "process_index", allow_split_physical_axes=True)
  return np.transpose(grid, [outer_first.index(a) for a in MESH_AXES])
