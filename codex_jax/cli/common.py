"""Flags every command shares, and the config they name turned into the typed Config."""

from __future__ import annotations

import os

from absl import flags
from ml_collections import config_flags

from codex_jax.config import load as config_load

config_flags.DEFINE_config_file(
    "config", None, "Experiment file and variant, e.g. experiments/codex.py:tiny; override keys with "
    "--config.train.steps=100.", lock_config=True)
flags.DEFINE_bool("json", False, "Print one JSON object with the result on stdout.")


def load_config(flag_values, num_devices: int | None, num_processes: int = 1):
  """(typed Config, plain dict of the config) from --config, validated against the devices."""
  raw = flag_values.config
  if raw is None:
    raise flags.ValidationError("--config is required, e.g. --config=experiments/codex.py:tiny")
  try:
    as_dict = config_load.to_dict(raw)
  except OSError as e:  # config_flags defers a missing or unloadable file to first use.
    where = config_flags.get_config_filename(flag_values["config"])
    raise flags.ValidationError(f"--config={where}: cannot load the experiment file: "
                                f"{str(e).strip().splitlines()[-1].strip()}") from e
  if as_dict.get("mesh", {}).get("auto") and num_devices is not None:
    from codex_jax.cli import auto_layout
    as_dict = auto_layout.resolve(as_dict, num_devices, num_processes)  # The chosen layout is what is recorded.
  return config_load.load(as_dict, num_devices=num_devices, num_processes=num_processes), as_dict


def check_workdir(workdir: str | None) -> None:
  """A workdir this command can write: refused in one line, before anything is loaded, if it cannot be."""
  if not workdir:
    raise flags.ValidationError("--workdir is required, e.g. --workdir=runs/tiny")
  scheme, sep, _ = workdir.partition("://")
  if sep:  # Else `gs://b/run` would silently become a local folder named `gs:`.
    raise flags.ValidationError(f"--workdir={workdir}: {scheme}:// workdirs are not supported yet; give a local "
                                "or mounted path")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise flags.ValidationError(f"--workdir={workdir}: is a file; expected a directory (new, or a run's)")
