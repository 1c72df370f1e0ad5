"""Test setup: a fake 8-device CPU mesh, fixed before jax is imported anywhere."""

import os
import sys

from tests.xla_flags import xla_flags  # noqa: E402  (no jax import)

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests must not write into the user's cache: tokenizers and probes go to a per-session folder.
os.environ.setdefault("CODEX_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "codex"))
# A persistent compilation cache in the checkout, shared by the xdist workers and the `codex` subprocesses
# (they inherit the environment): a program compiled once (a subprocess run's step, a shared fixture's) is
# loaded by every later compile of it. Delete .pytest_cache to start cold.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".pytest_cache", "jax"))

# Every program, not only those compiling over a second (jax's default): a resumed subprocess run loads its
# step instead of compiling it again.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

assert "jax" not in sys.modules, "conftest must run before jax is imported"
