"""The run's workdir: its saved config, checked on resume so a run never silently changes meaning.

WORKDIR/config.json is the config in force; WORKDIR/configs/<config hash>.json keeps every config the run ever
ran under (the canonical JSON the hash is taken over), so every lineage record's config hash re-derives after an
allowed change rewrote config.json.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from codex_jax import atomic
from codex_jax.config.errors import ConfigError
from codex_jax.config.load import diff, resume_conflicts
from codex_jax.hashing import canonical_json

CONFIG_FILE = "config.json"
CONFIGS_DIR = "configs"


def config_hash(config: dict[str, Any]) -> str:
  return hashlib.sha256(canonical_json(config)).hexdigest()


def config_path(workdir: str, digest: str) -> str:
  """Where the config with hash `digest` is kept."""
  return os.path.join(workdir, CONFIGS_DIR, digest + ".json")


def check_config(workdir: str, config: dict[str, Any]) -> list[str]:
  """On a rerun, refuses changed keys outside the allow-list; returns the allowed changes. Writes nothing."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return []
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError([f"{path}: cannot read the saved config of this workdir ({e})"]) from e
  conflicts = resume_conflicts(saved, config)
  if conflicts:
    raise ConfigError([f"{path}: this workdir was started with another config; resuming would change "
                       f"{', '.join(conflicts)} (only {_allowed()} may change; use a new --workdir)"])
  return diff(saved, config)


def write_config(workdir: str, config: dict[str, Any]) -> None:
  """Records `config` as the workdir's config (atomically), once every check has passed, and keeps it by hash."""
  kept = config_path(workdir, config_hash(config))
  if not os.path.exists(kept):
    atomic.write_bytes(kept, canonical_json(config))
  atomic.write_json(os.path.join(workdir, CONFIG_FILE), config, sort_keys=True)


def _allowed() -> str:
  from codex_jax.config.schema import RESUME_MUTABLE
  return ", ".join(sorted(RESUME_MUTABLE))
