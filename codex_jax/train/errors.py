"""The error a run stops with when its numbers go bad: light, so the CLI can catch it without importing jax."""


class NumericsError(RuntimeError):
  """Too many consecutive steps were skipped as non-finite or as loss spikes."""
