"""Synthetic curated text with verifiable content: worked problems and facts read off the running interpreter."""

from __future__ import annotations

import importlib
import inspect
import os
import platform
import random
from collections.abc import Iterator

from codex_jax.data.default_corpus import synthetic_tasks, writers

TARGET_BYTES = 2 << 20
_SHARD_BYTES = 1 << 20
_SEED = 31337
_PY = ".".join(platform.python_version_tuple()[:2])

# Modules whose public API is described. Only signatures, names and constant values are used, never docstring
# text, so the facts carry no PSF-licensed prose and the source stays CC0.
FACT_MODULES = (
    "base64", "bisect", "calendar", "collections", "colorsys", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "enum", "fnmatch", "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "hmac",
    "html", "inspect", "ipaddress", "itertools", "json", "keyword", "math", "operator", "os.path", "pathlib",
    "pprint", "random", "re", "secrets", "shlex", "shutil", "statistics", "string", "struct", "tarfile", "tempfile",
    "textwrap", "unicodedata", "urllib.parse", "zipfile", "zlib",
)


def _public_names(module) -> list[str]:
  names = getattr(module, "__all__", None)
  if names is None:  # Without __all__, only what the module itself defines: not what it imported.
    names = [n for n in dir(module) if getattr(getattr(module, n), "__module__", None) == module.__name__]
  return sorted(n for n in names if not n.startswith("_") and hasattr(module, n))


def _signature(obj) -> inspect.Signature | None:
  try:
    return inspect.signature(obj).replace(return_annotation=inspect.Signature.empty)
  except (TypeError, ValueError):
    return None


def _required(sig: inspect.Signature) -> list[str]:
  kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
  return [p.name for p in sig.parameters.values() if p.kind in kinds and p.default is inspect.Parameter.empty]


def _function_facts(qualname: str, sig: inspect.Signature, what: str) -> Iterator[str]:
  params = str(sig)[1:-1]
  if params:
    yield f"In Python {_PY}, the {what} {qualname} takes the parameters {params}."
  else:
    yield f"In Python {_PY}, the {what} {qualname} takes no parameters."
  required = _required(sig)
  if what == "function" and params:
    count = f"{len(required)} required positional argument{'s' if len(required) != 1 else ''}"
    yield f"Calling {qualname}() needs {count}{': ' + ', '.join(required) if required else ''}."


def module_facts(name: str) -> list[str]:
  """Sentences about one stdlib module's public API, from inspect: signatures, bases, methods, constants."""
  module = importlib.import_module(name)
  facts, functions, classes = [], [], []
  for attr in _public_names(module):
    obj = getattr(module, attr)
    qualname = f"{name}.{attr}"
    if inspect.isclass(obj):
      classes.append(attr)
      bases = [b.__name__ for b in obj.__bases__ if b is not object]
      if bases:
        facts.append(f"The class {qualname} derives from {', '.join(bases)}.")
      methods = sorted(m for m in vars(obj) if not m.startswith("_") and callable(getattr(obj, m, None)))
      if methods:
        facts.append(f"The class {qualname} defines the public methods {', '.join(methods)}.")
      sig = _signature(obj)
      if sig is not None and obj.__init__ is not object.__init__:
        facts.extend(_function_facts(qualname, sig, "constructor of the class"))
    elif callable(obj):
      functions.append(attr)
      sig = _signature(obj)
      if sig is not None:
        facts.extend(_function_facts(qualname, sig, "function"))
    elif isinstance(obj, int | float | str) and not isinstance(obj, bool) and len(repr(obj)) <= 100 \
        and not (isinstance(obj, str) and os.path.isabs(obj)):  # A path (tempfile.tempdir) is this machine's.
      facts.append(f"In Python {_PY}, the constant {qualname} equals {obj!r}.")
  if functions:
    facts.append(f"The module {name} defines {len(functions)} public functions: {', '.join(functions)}.")
  if classes:
    facts.append(f"The module {name} defines {len(classes)} public classes: {', '.join(classes)}.")
  # Reprs of sentinels and default functions hold memory addresses, which differ on every run.
  return [f for f in facts if " at 0x" not in f]


def stdlib_facts() -> list[dict[str, str]]:
  return [{"text": fact, "kind": "stdlib-fact"} for name in FACT_MODULES for fact in module_facts(name)]


def problems(rng: random.Random, max_bytes: int) -> list[dict[str, str]]:
  names = sorted(synthetic_tasks.GENERATORS)
  weights = [synthetic_tasks.GENERATORS[n][1] for n in names]
  rows, total = [], 0
  while total < max_bytes:
    name = rng.choices(names, weights)[0]
    text = synthetic_tasks.GENERATORS[name][0](rng)
    rows.append({"text": text, "kind": name})
    total += len(text.encode("utf-8"))
  return rows


def records(limit: int | None = None, max_bytes: int = TARGET_BYTES) -> list[dict[str, str]]:
  """Problems and stdlib facts, shuffled together with a fixed seed; about `max_bytes` of text."""
  rng = random.Random(_SEED)
  facts = stdlib_facts()
  rows = problems(rng, max_bytes - sum(len(f["text"].encode("utf-8")) for f in facts)) + facts
  rng.shuffle(rows)
  return rows if limit is None else rows[:limit]


def build(root: str, *, limit: int | None = None) -> writers.Stats:
  """Writes synthetic/synthetic-0000N.jsonl.gz, JSON lines {"text", "kind"}."""
  return writers.write_shards(root, "synthetic", "synthetic", ".jsonl.gz",
                              writers.chunk_by_bytes(records(limit), _SHARD_BYTES), writers.write_jsonl_gz)


SOURCE = writers.Source(
    name="synthetic-curated", kind="synthetic", licence="CC0-1.0", build=build,
    origin="Generated by codex-jax (codex_jax/data/default_corpus/synthetic*.py): worked arithmetic, exact unit "
           "conversions, puzzles, Python expressions with their evaluated results, and API facts (signatures, names, "
           "constants) read from the running interpreter with inspect; dedicated to the public domain under CC0 1.0.")
