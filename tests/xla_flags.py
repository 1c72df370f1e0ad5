"""XLA flags of every test process (pytest's and its subprocesses'): a fake CPU device count, and LLVM's
optimisations off, which halves compile time here (docs/results.md, "The test suite"). Both sides of every
comparison compile alike; HLO passes (fusion, the SPMD partitioner) run as in production. CODEX_TEST_FULL_OPT=1
runs the suite at XLA's default optimisation level instead."""

import os

FAST_COMPILE = "" if os.environ.get("CODEX_TEST_FULL_OPT") else "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
  return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}".strip()
