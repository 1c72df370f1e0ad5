"""The built-in task files, generated deterministically from the embedded corpus's generators and sources.

  arithmetic         mc     worked sums and products (synthetic-curated's format): the answer after "Answer:"
  python-expression  mc     `>>> expr` and its evaluated repr, against other expressions' values
  stdlib-facts       mc     required-argument counts and constant values of the stdlib API (python-stdlib-docs)
  code-completion    cloze  the next line of standard-library code from the lines before it
  digit-captions     mc     "A handwritten digit" + the digit, after the 8x8 scan (digits-captions), 10 choices

Seeds differ from the corpus's, so problems are new draws from the training distribution; code lines and
facts are the corpus's own text (a memorisation probe). Written once per folder and version.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import random

from codex_jax import atomic
from codex_jax.data.default_corpus import pyexpr, synthetic, synthetic_tasks

VERSION = 1
MARKER = f".builtin-v{VERSION}"
EXAMPLES = 200
_SEED = 4242
_CODE_MODULES = ("textwrap", "fnmatch", "shlex", "colorsys", "bisect", "heapq", "glob", "string", "pprint",
                 "calendar", "difflib", "csv", "base64", "json.encoder", "statistics")


def _near(rng: random.Random, value: int, k: int) -> list[int]:
  """k distinct wrong answers that look like `value` (off by one, by ten, by a digit)."""
  out: set[int] = set()
  while len(out) < k:
    out.add(value + rng.choice((-1, 1, -10, 10, -2, 2, 100, -100)) * rng.randint(1, 3))
    out.discard(value)
  return sorted(out)


def _mc(context: str, gold_text: str, wrong: list[str], rng: random.Random) -> dict:
  choices = [gold_text, *wrong]
  rng.shuffle(choices)
  return {"context": context, "choices": choices, "gold": choices.index(gold_text)}


def arithmetic(rng: random.Random) -> list[dict]:
  rows = []
  makers = (synthetic_tasks.multiplication, synthetic_tasks.addition, synthetic_tasks.order_of_operations)
  while len(rows) < EXAMPLES:
    text = rng.choice(makers)(rng)
    context, _, answer = text.rpartition("Answer:")
    value = int(answer.strip())
    rows.append(_mc(context + "Answer:", f" {value}", [f" {v}" for v in _near(rng, value, 3)], rng))
  return rows


def python_expression(rng: random.Random) -> list[dict]:
  pairs = []
  while len(pairs) < EXAMPLES + 50:
    expr = pyexpr.random_expression(rng)
    pairs.append((expr, repr(pyexpr.safe_eval(expr))))
  rows = []
  for expr, value in pairs[:EXAMPLES]:
    others = sorted({v for _, v in pairs if v != value})
    same_type = [v for v in others if v[:1] == value[:1]]
    wrong = rng.sample(same_type if len(same_type) >= 3 else others, 3)
    rows.append(_mc(f">>> {expr}\n", value, wrong, rng))
  return rows


def stdlib_facts(rng: random.Random) -> list[dict]:
  facts = [f for name in synthetic.FACT_MODULES for f in synthetic.module_facts(name)]
  rows = []
  needs = [f for f in facts if f.startswith("Calling ") and " needs " in f]
  for fact in needs:
    head, _, tail = fact.partition(" needs ")
    count = int(tail.split()[0])
    if count < 4:
      rows.append({"context": f"{head} needs", "choices": [f" {n} required" for n in range(4)], "gold": count})
  constants = [f for f in facts if " the constant " in f and " equals " in f]
  values = sorted({f.partition(" equals ")[2] for f in constants})
  for fact in constants:
    head, _, value = fact.partition(" equals ")
    wrong = rng.sample([v for v in values if v != value], 3)
    rows.append(_mc(f"{head} equals", f" {value}", [f" {v}" for v in wrong], rng))
  rng.shuffle(rows)
  return rows[:EXAMPLES]


def code_completion(rng: random.Random) -> list[dict]:
  import importlib

  candidates = []
  for name in _CODE_MODULES:
    lines = inspect.getsource(importlib.import_module(name)).splitlines()
    for i in range(8, len(lines)):
      text = lines[i].strip()
      if len(text) >= 12 and not text.startswith(("#", '"', "'")) and all(lines[i - 8:i]):
        indent = lines[i][:len(lines[i]) - len(lines[i].lstrip())]
        candidates.append({"context": "\n".join(lines[i - 8:i]) + "\n" + indent, "continuation": text})
  return rng.sample(candidates, min(EXAMPLES, len(candidates)))


def digit_captions(rng: random.Random, folder: str) -> list[dict]:
  from PIL import Image

  from codex_jax.data.default_corpus import digits

  images, labels = digits.load()
  os.makedirs(os.path.join(folder, "digit-captions"), exist_ok=True)
  rows = []
  for i in sorted(rng.sample(range(len(images)), EXAMPLES)):
    name = f"digit-captions/{i:04d}.png"
    buf = io.BytesIO()
    Image.fromarray(images[i], mode="L").save(buf, format="PNG")
    with open(os.path.join(folder, name), "wb") as f:
      f.write(buf.getvalue())
    rows.append({"context": "A handwritten digit", "choices": [f" {d}" for d in range(10)], "gold": int(labels[i]),
                 "image": name})
  return rows


FAMILIES = {"arithmetic": arithmetic, "python-expression": python_expression, "stdlib-facts": stdlib_facts,
            "code-completion": code_completion}


def write_builtin(folder: str, images: bool = True) -> str:
  """Writes the built-in task files into `folder` (once: a marker file says they are complete)."""
  if os.path.exists(os.path.join(folder, MARKER)):
    return folder
  os.makedirs(folder, exist_ok=True)
  families = dict(FAMILIES)
  if images:
    families["digit-captions"] = lambda rng: digit_captions(rng, folder)
  for name, make in families.items():
    rows = make(random.Random(f"{_SEED}:{name}"))
    atomic.write_text(os.path.join(folder, f"{name}.jsonl"), "".join(
        json.dumps({"id": f"{name}-{i}", **row}, ensure_ascii=False) + "\n" for i, row in enumerate(rows)))
  open(os.path.join(folder, MARKER), "w").close()
  return folder
