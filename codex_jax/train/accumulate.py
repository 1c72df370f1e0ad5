"""Gradient accumulation: one update's batch as k micro-batches, a function's results combined over them.

An update's rows are split with a stride: micro-batch m is rows m, m + k, m + 2k, ... So when the rows are
sharded over `data` in contiguous blocks (each a multiple of k rows), every device splits its own rows
and no row moves. The host builds the update's batch to match (runtime/feed.py `interleave`): row r of pipeline batch m
goes to row r * k + m, so micro-batch m is exactly the pipeline's batch m, on every process.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def split(x, k: int):
  """[rows, ...] -> [k, rows / k, ...]: micro-batch m is rows m, m + k, ... (see the module docstring)."""
  return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)


def accumulate(fn: Callable, batch: dict, k: int):
  """fn(micro_batch, index) -> pytree, combined over the k micro-batches of `batch` by a lax.scan.

  Float leaves are averaged (accumulated in float32 at least), integer leaves summed (counts), bool
  leaves OR-ed. k == 1 is fn(batch, 0) itself, with nothing added to the program. Memory: the scan
  keeps one micro-batch's activations live at a time, plus the running totals.
  """
  if k == 1:
    return fn(batch, 0)
  micro = jax.tree.map(lambda x: split(x, k), batch)
  shapes = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], micro), 0)

  def zero(s):
    dtype = jnp.promote_types(s.dtype, jnp.float32) if jnp.issubdtype(s.dtype, jnp.floating) else s.dtype
    return jnp.zeros(s.shape, dtype)

  def add(total, value):
    if total.dtype == jnp.bool_:
      return total | value
    return total + value.astype(total.dtype)

  def body(totals, xs):
    mb, index = xs
    return jax.tree.map(add, totals, fn(mb, index)), None

  totals, _ = jax.lax.scan(body, jax.tree.map(zero, shapes), (micro, jnp.arange(k)))
  return jax.tree.map(lambda t, s: (t / k).astype(s.dtype) if jnp.issubdtype(s.dtype, jnp.floating) else t,
                      totals, shapes)


def micro_key(key: jax.Array, index, k: int) -> jax.Array:
  """Micro-batch `index`'s key from the update's: the key itself when k == 1 (the unaccumulated program),
  else fold_in(key, index)."""
  return key if k == 1 else jax.random.fold_in(key, index)


def count(batch: dict, micro_rows: int) -> int:
  """k, the micro-batches in `batch`: its rows over `micro_rows` (static: from the shape)."""
  rows = jax.tree.leaves(batch)[0].shape[0]
  if rows % micro_rows:
    raise ValueError(f"a batch of {rows} rows is no whole number of micro-batches of {micro_rows} rows")
  return rows // micro_rows
