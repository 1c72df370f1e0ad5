"""Step-level numerics guard: which updates to skip (non-finite or spiking loss) and the loss window that decides.

W is the spike window: the last W accepted losses, a ring buffer carried (and checkpointed) in the TrainState.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from codex_jax.config.schema import TrainConfig
from codex_jax.train.errors import NumericsError  # noqa: F401  (raised here; the CLI imports it light)


@flax.struct.dataclass
class Guard:
  skipped: jax.Array          # int32: updates skipped over the whole run.
  consecutive_bad: jax.Array  # int32: bad steps since the last applied update.
  losses_W: jax.Array         # float32[max(W, 1)]: the last accepted losses (only finite ones ever enter).
  count: jax.Array            # int32: valid entries in losses_W, at most W.
  next: jax.Array             # int32: the slot the next accepted loss overwrites.
  window: int = flax.struct.field(pytree_node=False)  # W; 0: spike detection off.


def init_guard(window: int) -> Guard:
  zero = jnp.zeros((), jnp.int32)
  # Orbax refuses to save zero-size arrays, so a disabled window still keeps one slot (never read).
  return Guard(skipped=zero, consecutive_bad=zero, losses_W=jnp.zeros((max(window, 1),), jnp.float32),
               count=zero, next=zero, window=window)


def window_stats(guard: Guard) -> tuple[jax.Array, jax.Array]:
  """(mean, population std) of the valid entries of the window; (0, 0) when it is empty."""
  valid_W = jnp.arange(guard.losses_W.shape[0]) < guard.count
  n = jnp.maximum(guard.count, 1).astype(jnp.float32)
  mean = jnp.sum(jnp.where(valid_W, guard.losses_W, 0.0)) / n
  var = jnp.sum(jnp.where(valid_W, jnp.square(guard.losses_W - mean), 0.0)) / n
  return mean, jnp.sqrt(var)


def spike_threshold(guard: Guard, sigmas: float, min_steps: int) -> jax.Array:
  """mean + sigmas * std of the window; +inf until it holds `min_steps` losses (too few to trust)."""
  if guard.window == 0:
    return jnp.float32(jnp.inf)
  mean, std = window_stats(guard)
  return jnp.where(guard.count >= min_steps, mean + sigmas * std, jnp.inf).astype(jnp.float32)


def is_bad(guard: Guard, loss: jax.Array, grad_norm: jax.Array, update_ratio: jax.Array,
           cfg: TrainConfig) -> tuple[jax.Array, jax.Array]:
  """(whether this step's update must be skipped, the spike threshold it was judged by). `update_ratio` is
  |update| / |params|: a finite loss does not make an update of a size no optimizer step should have safe."""
  threshold = spike_threshold(guard, cfg.spike_sigmas, cfg.spike_min_steps)
  oversized = ~jnp.isfinite(update_ratio) | (update_ratio > cfg.max_update_ratio) if cfg.max_update_ratio > 0 else False
  bad = ~jnp.isfinite(loss) | ~jnp.isfinite(grad_norm) | (loss > threshold) | oversized
  return bad, threshold


def update_guard(guard: Guard, loss: jax.Array, bad: jax.Array) -> Guard:
  """The guard after one step: counters move; only an accepted loss enters the window."""
  guard = guard.replace(skipped=guard.skipped + bad.astype(jnp.int32),
                        consecutive_bad=jnp.where(bad, guard.consecutive_bad + 1, 0))
  if guard.window == 0:
    return guard
  pushed_W = guard.losses_W.at[guard.next].set(loss.astype(jnp.float32))
  return guard.replace(losses_W=jnp.where(bad, guard.losses_W, pushed_W),
                       count=jnp.where(bad, guard.count, jnp.minimum(guard.count + 1, guard.window)),
                       next=jnp.where(bad, guard.next, (guard.next + 1) % guard.window))


def keep_if_bad(bad: jax.Array, old, new):
  """`old` where the step is bad, else `new`, leaf by leaf. A select, so NaNs in `new` never leak."""
  return jax.tree.map(lambda o, n: jnp.where(bad, o, n), old, new)


def check_consecutive(metrics: dict, limit: int, step: int) -> None:
  """Raises NumericsError once `limit` steps in a row were skipped (the loop calls this with the step's metrics)."""
  count = int(metrics["consecutive_bad"])
  if count >= limit:
    raise NumericsError(
        f"step {step}: {count} consecutive steps skipped as numerically bad (train.max_consecutive_bad={limit}); "
        f"last loss {float(metrics['loss'])}, grad_norm {float(metrics['grad_norm'])}, spike threshold "
        f"{float(metrics['spike_threshold'])}, update / weights {float(metrics['update_ratio']):.3g} (at most "
        "train.max_update_ratio). No update was applied from these steps, so the state is that of "
        "the last good step. Lower optimizer.learning_rate, or check the data these steps read "
        "(NaN/Inf features, corrupt records).")
