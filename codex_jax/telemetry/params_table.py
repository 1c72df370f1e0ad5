"""A fixed-width table of a parameter pytree: path, shape, dtype and count per leaf, and the total."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np


def param_table(params: Any) -> str:
  """One row per leaf (arrays or `jax.ShapeDtypeStruct`s), paths joined with '/', then a total row."""
  rows = []
  total = total_bytes = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    shape = tuple(np.shape(leaf))
    # Never np.asarray a jax array: that would copy every parameter to the host.
    dtype = np.dtype(leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype)
    count = math.prod(shape)
    total += count
    total_bytes += count * dtype.itemsize
    rows.append((path_str(path), str(shape), dtype.name, f"{count:,}"))
  rows.append((f"total ({_human_bytes(total_bytes)})", "", "", f"{total:,} ({human_count(total)})"))
  header = ("path", "shape", "dtype", "count")
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]

  def line(r):
    return "  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1]), r[2].ljust(widths[2]),
                      r[3].rjust(widths[3])]).rstrip()

  rule = "-" * len(line(tuple("-" * w for w in widths)))
  return "\n".join([line(header), rule, *map(line, rows[:-1]), rule, line(rows[-1])])


def path_str(path) -> str:
  """'params/layers/attn/q' from a key path (dict keys, attributes and sequence indices)."""
  parts = []
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]  # Flax's Partitioned / LogicallyPartitioned box around the array.
  for key in path:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey.
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def human_count(n: float) -> str:
  """1234567 -> '1.23M'."""
  for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.2f}{unit}"
  return str(int(n))


def _human_bytes(n: float) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{int(n)} B"
