"""The one boundary where an ml_collections ConfigDict becomes typed, validated dataclasses."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections

from codex_jax.config import schema
from codex_jax.config.errors import ConfigError
from codex_jax.config.validate import validate


def defaults() -> ml_collections.ConfigDict:
  """Every key an experiment can set, at the schema's default (config/schema.py, where each is commented):
  what an experiment file starts from, setting only what its run changes. Derived keys are left out."""
  def group(cls, prefix: str) -> dict[str, Any]:
    values = {}
    for field in dataclasses.fields(cls):
      if f"{prefix}{field.name}" in schema.DERIVED:
        continue
      value = getattr(cls(), field.name)
      values[field.name] = group(type(value), f"{prefix}{field.name}.") if dataclasses.is_dataclass(value) else value
    return values

  return ml_collections.ConfigDict({name: group(cls, f"{name}.") for name, cls in schema.GROUPS.items()})


def to_dict(config: Any) -> dict[str, Any]:
  """A plain nested dict of a ConfigDict (or dict), for saving and diffing."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  return {k: (to_dict(v) if isinstance(v, Mapping) else _plain(v)) for k, v in config.items()}


def _plain(value: Any) -> Any:
  return list(value) if isinstance(value, tuple) else value


def load(config: Any, num_devices: int | None = None, num_processes: int = 1) -> schema.Config:
  """Converts and validates a whole config; raises ConfigError listing every problem found.

  With `num_devices`, the mesh is checked against the devices that will run it, so an impossible
  layout fails here, before anything is compiled.
  """
  raw = to_dict(config)
  problems: list[str] = []
  groups: dict[str, Any] = {}
  for name in raw:
    if name not in schema.GROUPS:
      problems.append(f"config.{name}: unknown group; expected one of {sorted(schema.GROUPS)}")
  for name, cls in schema.GROUPS.items():
    if name not in raw:
      groups[name] = cls()
      continue
    if not isinstance(raw[name], Mapping):
      problems.append(f"config.{name}={raw[name]!r}: expected a group of keys")
      groups[name] = cls()
      continue
    groups[name] = _build(name, cls, raw[name], problems)
  if problems:
    raise ConfigError(problems)
  cfg = schema.Config(**groups)
  problems = validate(cfg, num_devices=num_devices, num_processes=num_processes)
  if problems:
    raise ConfigError(problems)
  return derive(cfg)


def derive(cfg: schema.Config) -> schema.Config:
  """Fills the model fields that follow from other groups: which objective heads exist, and their widths."""
  o, d = cfg.objectives, cfg.data
  heads = tuple(name for name in o.enabled if name != "text")
  model = dataclasses.replace(
      cfg.model, objectives=heads, pixel_dim=d.patch_size * d.patch_size * 3 if "vision" in heads else 0,
      align_dim=o.align.dim if "align" in heads else 0, action_dim=o.action.dim if "action" in heads else 0,
      action_horizon=o.action.horizon if "action" in heads else 0)
  return dataclasses.replace(cfg, model=model)


def _build(group: str, cls: type, values: Mapping[str, Any], problems: list[str]) -> Any:
  fields = {f.name: f for f in dataclasses.fields(cls)}
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for key, value in values.items():
    where = f"config.{group}.{key}"
    if key not in fields:
      problems.append(f"{where}: unknown key; expected one of {sorted(fields)}")
      continue
    if dataclasses.is_dataclass(hints[key]):  # A sub-group, e.g. objectives.vision.
      if not isinstance(value, Mapping):
        problems.append(f"{where}={value!r}: expected a group of keys")
        continue
      kwargs[key] = _build(f"{group}.{key}", hints[key], value, problems)
      continue
    converted = _coerce(value, hints[key])
    if converted is _BAD:
      problems.append(f"{where}={value!r}: expected {_type_name(hints[key])}")
      continue
    kwargs[key] = converted
  return cls(**kwargs)


_BAD = object()


def _coerce(value: Any, hint: Any) -> Any:
  """The value as `hint`, or _BAD. Only lossless conversions: int->float, list->tuple."""
  origin = typing.get_origin(hint)
  if origin is tuple:
    (item, _) = typing.get_args(hint)
    if isinstance(value, (list, tuple)) and all(_coerce(v, item) is not _BAD for v in value):
      return tuple(value)
    return _BAD
  if origin is dict:
    (key, item) = typing.get_args(hint)
    if isinstance(value, Mapping) and all(_coerce(k, key) is not _BAD and _coerce(v, item) is not _BAD
                                          for k, v in value.items()):
      return {k: _coerce(v, item) for k, v in value.items()}
    return _BAD
  if origin in (typing.Union, types.UnionType):
    return _BAD  # No optional fields: every key has a concrete default.
  if hint is bool:
    return value if isinstance(value, bool) else _BAD
  if hint is int:
    return value if isinstance(value, int) and not isinstance(value, bool) else _BAD
  if hint is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if ok else _BAD
  if hint is str:
    return value if isinstance(value, str) else _BAD
  return _BAD


def _type_name(hint: Any) -> str:
  if typing.get_origin(hint) is tuple:
    return f"a list of {typing.get_args(hint)[0].__name__}"
  if typing.get_origin(hint) is dict:
    return f"a group of {_type_name(typing.get_args(hint)[1])} by name"
  return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """Lines `key: old -> new` for every leaf that differs between two config dicts."""
  flat_saved, flat_current = _flatten(saved), _flatten(current)
  lines = []
  for key in sorted(set(flat_saved) | set(flat_current)):
    old, new = flat_saved.get(key, "<absent>"), flat_current.get(key, "<absent>")
    if old != new:
      lines.append(f"{key}: {old!r} -> {new!r}")
  return lines


# Keys of a group that a saved config from before the group existed is taken to have had at their schema
# defaults (what that run did); its other keys are taken as the current ones (they played no part then).
_GROUP_IDENTITY = {"objectives": ("weights", "phase_weights")}


def resume_conflicts(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """The diff lines that forbid resuming: changes outside schema.RESUME_MUTABLE. A group the saved config
  lacks (written before it existed, e.g. `objectives`) may only differ in its identity keys; a key it lacks
  is taken at its schema default."""
  filled = dict(saved)
  for name, cls in schema.GROUPS.items():
    if name not in current:
      continue
    defaults = to_dict(dataclasses.asdict(cls()))
    if name not in saved:
      filled[name] = {**current[name], **{k: defaults[k] for k in _GROUP_IDENTITY.get(name, ())}}
    else:  # A key added since the workdir was written (e.g. train.grad_accum): that run had its default.
      filled[name] = {**{k: defaults[k] for k in current[name] if k in defaults and k not in saved[name]},
                      **saved[name]}
  return [line for line in diff(filled, current) if line.split(":")[0] not in schema.RESUME_MUTABLE]


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return out
