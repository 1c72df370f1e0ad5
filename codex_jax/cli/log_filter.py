"""Keeps the console readable: INFO lines from libraries (Orbax logs every save step) are dropped."""

from __future__ import annotations

import logging as std_logging

from absl import logging

QUIET_PACKAGES = ("/orbax/", "/jax/", "/jaxlib/", "/grain/", "/flax/", "/etils/", "/tensorstore/")
# Library warnings that are expected by design: we save without OCDBT (one folder per tensor, so a
# damaged file names its tensor), and Orbax warns on every save that there is nothing to merge;
# tensorboardX warns on every non-finite scalar, which we write on purpose (a NaN loss should show in
# TensorBoard; the spike threshold is +inf until its window fills). Restoring one item of a composite
# checkpoint (the snapshot average, `codex eval`) makes Orbax look for step metadata inside the item.
EXPECTED_WARNINGS = ("Skipping merge of OCDBT checkpoints", "NaN or Inf found in input tensor",
                     "/state/_CHECKPOINT_METADATA")


class _LibraryInfoFilter(std_logging.Filter):
  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      return not any(text in record.getMessage() for text in EXPECTED_WARNINGS)
    return not any(package in record.pathname for package in QUIET_PACKAGES)


def configure(verbose: bool) -> None:
  """INFO for codex_jax; libraries' INFO only with --verbose."""
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  if not verbose:
    logging.get_absl_handler().addFilter(_LibraryInfoFilter())
