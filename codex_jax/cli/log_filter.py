"""Keeps the console readable: INFO lines from libraries (Orbax logs every save step) are dropped, and their errors
(a full disk fails every writer thread at once) are one line each."""

from __future__ import annotations

import logging as std_logging
import sys
import threading

from absl import logging

QUIET_PACKAGES = ("/orbax/", "/jax/", "/jaxlib/", "/grain/", "/flax/", "/etils/", "/tensorstore/", "/asyncio/")
# Library warnings that are expected by design: we save without OCDBT (one folder per tensor, so a
# damaged file names its tensor), and Orbax warns on every save that there is nothing to merge;
# tensorboardX warns on every non-finite scalar, which we write on purpose (a NaN loss should show in
# TensorBoard; the spike threshold is +inf until its window fills). Restoring one item of a composite
# checkpoint (the snapshot average, `codex eval`) makes Orbax look for step metadata inside the item.
EXPECTED_WARNINGS = ("Skipping merge of OCDBT checkpoints", "NaN or Inf found in input tensor",
                     "/state/_CHECKPOINT_METADATA")


class _LibraryInfoFilter(std_logging.Filter):
  def filter(self, record: std_logging.LogRecord) -> bool:
    library = any(package in record.pathname for package in QUIET_PACKAGES)
    if record.levelno >= std_logging.ERROR and library:
      record.exc_info = record.exc_text = None  # The error's line; its traceback (every thread's) with --verbose.
    if record.levelno >= std_logging.WARNING:
      return not any(text in record.getMessage() for text in EXPECTED_WARNINGS)
    return not library


class _UnretrievedTasks(std_logging.Filter):
  """asyncio reports each failed write of a failed async save again when its task is collected (at exit, past
  the handlers, with a traceback); the save's failure is reported once, by codex."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Task exception was never retrieved")


def _thread_failed(args: threading.ExceptHookArgs) -> None:
  name = args.thread.name if args.thread else "?"
  print(f"background thread {name} failed: {args.exc_type.__name__}: {args.exc_value}", file=sys.stderr)


def _unraisable(args) -> None:
  """Library callbacks that fire after their event loop closed (a failed async save) print nothing."""
  if not (isinstance(args.exc_value, RuntimeError) and "Event loop is closed" in str(args.exc_value)):
    sys.__unraisablehook__(args)


def configure(verbose: bool) -> None:
  """INFO for codex_jax; libraries' INFO, and the tracebacks of their errors and threads, only with --verbose."""
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  if not verbose:
    logging.get_absl_handler().addFilter(_LibraryInfoFilter())
    std_logging.getLogger("asyncio").addFilter(_UnretrievedTasks())  # On the logger: also at interpreter exit.
    threading.excepthook = _thread_failed
    sys.unraisablehook = _unraisable
