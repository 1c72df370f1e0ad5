"""Keeps the console readable: INFO lines from libraries (Orbax logs every save step) are dropped."""

from __future__ import annotations

import logging as std_logging

from absl import logging

QUIET_PACKAGES = ("/orbax/", "/jax/", "/jaxlib/", "/grain/", "/flax/", "/etils/", "/tensorstore/")


class _LibraryInfoFilter(std_logging.Filter):
  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      return True
    return not any(package in record.pathname for package in QUIET_PACKAGES)


def configure(verbose: bool) -> None:
  """INFO for codex_jax; libraries' INFO only with --verbose."""
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  if not verbose:
    logging.get_absl_handler().addFilter(_LibraryInfoFilter())
