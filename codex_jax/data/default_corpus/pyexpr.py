"""Random small Python expressions and a whitelist evaluator for them: the synthetic corpus states true results."""

from __future__ import annotations

import ast
import operator
import random
from typing import Any

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Mod: operator.mod, ast.Pow: operator.pow}
_CMPOPS = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
           ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.In: lambda a, b: a in b}
_CALLS = {"len": len, "sum": sum, "max": max, "min": min, "sorted": sorted, "abs": abs, "str": str, "list": list,
          "reversed": lambda x: list(reversed(x))}
_METHODS = {"upper", "lower", "title", "strip", "replace", "count", "split", "join", "index"}


class Unsafe(ValueError):
  """The expression uses something outside the whitelist."""


def safe_eval(source: str) -> Any:
  """Evaluates literals, arithmetic, comparisons, indexing, slicing and a few builtins and str methods; no names."""
  def ev(node: ast.AST) -> Any:
    if isinstance(node, ast.Expression):
      return ev(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | str | bool):
      return node.value
    if isinstance(node, ast.List | ast.Tuple):
      items = [ev(e) for e in node.elts]
      return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
      left, right = ev(node.left), ev(node.right)
      if isinstance(node.op, ast.Pow) and (not isinstance(right, int) or abs(right) > 8):
        raise Unsafe("exponent too large")  # Keeps evaluation cheap whatever the input.
      return _BINOPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.Not):
      value = ev(node.operand)
      return -value if isinstance(node.op, ast.USub) else not value
    if isinstance(node, ast.BoolOp):
      values = [ev(v) for v in node.values]
      result = values[0]
      for v in values[1:]:
        result = (result and v) if isinstance(node.op, ast.And) else (result or v)
      return result
    if isinstance(node, ast.Compare) and all(type(op) in _CMPOPS for op in node.ops):
      left = ev(node.left)
      for op, comp in zip(node.ops, node.comparators, strict=True):
        right = ev(comp)
        if not _CMPOPS[type(op)](left, right):
          return False
        left = right
      return True
    if isinstance(node, ast.Subscript):
      return ev(node.value)[ev(node.slice)]
    if isinstance(node, ast.Slice):
      return slice(*(None if p is None else ev(p) for p in (node.lower, node.upper, node.step)))
    if isinstance(node, ast.Call) and not node.keywords:
      args = [ev(a) for a in node.args]
      if isinstance(node.func, ast.Name) and node.func.id in _CALLS:
        return _CALLS[node.func.id](*args)
      if isinstance(node.func, ast.Attribute) and node.func.attr in _METHODS:
        target = ev(node.func.value)
        if isinstance(target, str):
          return getattr(target, node.func.attr)(*args)
    raise Unsafe(f"not allowed: {ast.dump(node)[:60]}")

  return ev(ast.parse(source, mode="eval"))


_WORDS = ("apple", "river", "stone", "cloud", "python", "tiger", "maple", "orbit", "pixel", "lemon", "delta")


def _int_expr(rng: random.Random, depth: int, top: bool = False) -> str:
  if depth == 0 or (not top and rng.random() < 0.3):
    return str(rng.randint(-9, 30) if rng.random() < 0.2 else rng.randint(0, 30))
  op = rng.choice(("+", "-", "*", "//", "%", "**"))
  if op == "**":
    return f"{rng.randint(2, 9)} ** {rng.randint(0, 4)}"
  left, right = _int_expr(rng, depth - 1), _int_expr(rng, depth - 1)
  if op in ("//", "%"):
    right = str(rng.randint(1, 9))  # Never divide by zero.
  return f"{left} {op} {right}" if top else f"({left} {op} {right})"


def _list_expr(rng: random.Random) -> str:
  xs = [rng.randint(-5, 20) for _ in range(rng.randint(3, 7))]
  form = rng.randrange(7)
  if form == 0:
    return f"sorted({xs})"
  if form == 1:
    return f"{xs}[{rng.randint(0, len(xs) - 1)}:{rng.randint(0, len(xs))}]"
  if form == 2:
    return f"sum({xs}) - max({xs})"
  if form == 3:
    return f"{xs}[::{rng.choice((-1, 2, -2, 3))}]"
  if form == 4:
    return f"len({xs}) * min({xs})"
  if form == 5:
    return f"{rng.randint(-5, 20)} in {xs}"
  return f"sorted({xs})[-{rng.randint(1, len(xs))}]"


def _str_expr(rng: random.Random) -> str:
  a, b = rng.sample(_WORDS, 2)
  form = rng.randrange(7)
  if form == 0:
    return f"{a!r}.upper() + {b!r}[{rng.randint(0, 3)}:]"
  if form == 1:
    return f"{a!r}.count({rng.choice(a)!r})"
  if form == 2:
    return f"{a!r}[::-1]"
  if form == 3:
    return f"'-'.join({[a, b]!r})"
  if form == 4:
    return f"len({a!r} * {rng.randint(1, 4)})"
  if form == 5:
    return f"{(a + ' ' + b)!r}.title().split()"
  return f"{a!r}.replace({a[0]!r}, {b[0]!r}) < {b!r}"


def random_expression(rng: random.Random) -> str:
  kind = rng.randrange(3)
  if kind == 0:
    return _int_expr(rng, rng.randint(1, 3), top=True)
  return _list_expr(rng) if kind == 1 else _str_expr(rng)
