"""Where codex keeps what it derives (tokenizers, fingerprints, indexes, the default corpus, probes)."""

import os


def cache_dir() -> str:
  """$CODEX_CACHE_DIR, else ~/.cache/codex_jax."""
  return os.environ.get("CODEX_CACHE_DIR") or os.path.expanduser("~/.cache/codex_jax")
