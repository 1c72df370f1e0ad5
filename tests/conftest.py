"""Test setup: a fake 8-device CPU mesh, fixed before jax is imported anywhere."""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests must not write into the user's cache: tokenizers and probes go to a per-session folder.
os.environ.setdefault("CODEX_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "codex"))

assert "jax" not in sys.modules, "conftest must run before jax is imported"
