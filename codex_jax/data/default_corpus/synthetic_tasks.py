"""Generators of small worked problems whose answers are computed, not written: arithmetic, units, puzzles."""

from __future__ import annotations

import datetime
import random
from fractions import Fraction

from codex_jax.data.default_corpus import pyexpr


def decimal(x: Fraction) -> str:
  """Exact decimal when the fraction terminates, else rounded to 4 places and marked approximate."""
  den = x.denominator
  for p in (2, 5):
    while den % p == 0:
      den //= p
  if den != 1:
    return f"about {float(x):.4f}".rstrip("0").rstrip(".")
  text = f"{float(x):.12f}".rstrip("0").rstrip(".")
  return "0" if text == "-0" else text


def multiplication(rng: random.Random) -> str:
  a, b = rng.randint(12, 9999), rng.randint(11, 99)
  tens, ones = b // 10 * 10, b % 10
  return (f"Compute {a} × {b}.\nWork: {a} × {tens} = {a * tens}; {a} × {ones} = {a * ones}; "
          f"{a * tens} + {a * ones} = {a * b}.\nAnswer: {a * b}")


def addition(rng: random.Random) -> str:
  xs = [rng.randint(1, 999) for _ in range(rng.randint(3, 6))]
  steps, total = [], xs[0]
  for x in xs[1:]:
    steps.append(f"{total} + {x} = {total + x}")
    total += x
  return f"Add {', '.join(map(str, xs[:-1]))} and {xs[-1]}.\nWork: {'; '.join(steps)}.\nAnswer: {total}"


def division(rng: random.Random) -> str:
  b, q = rng.randint(2, 99), rng.randint(2, 999)
  r = rng.randint(0, b - 1)
  n = b * q + r
  return (f"Divide {n} by {b}.\nWork: {b} × {q} = {b * q}, and {n} − {b * q} = {r}.\n"
          f"Answer: {n} = {b} × {q} + {r}, so the quotient is {q} and the remainder {r}.")


def _term(n: int) -> str:
  return f"({n})" if n < 0 else str(n)  # "4 × (−3)", not "4 × -3".


def order_of_operations(rng: random.Random) -> str:
  a, b, c, d = (rng.randint(1, 20) for _ in range(4))
  inner = c - d
  return (f"Evaluate {a} + {b} × ({c} − {d}).\nWork: parentheses first, {c} − {d} = {inner}; then {b} × "
          f"{_term(inner)} = {b * inner}; then {a} + {_term(b * inner)} = {a + b * inner}.\nAnswer: {a + b * inner}")


def fractions(rng: random.Random) -> str:
  x, y = Fraction(rng.randint(1, 9), rng.randint(2, 12)), Fraction(rng.randint(1, 9), rng.randint(2, 12))
  op = rng.choice("+−")
  z = x + y if op == "+" else x - y
  den = x.denominator * y.denominator
  left, right = x.numerator * y.denominator, y.numerator * x.denominator
  raw = left + right if op == "+" else left - right
  return (f"Compute {x} {op} {y}.\nWork: over the common denominator {den}, {left}/{den} {op} {right}/{den} = "
          f"{raw}/{den}, which reduces to {z}.\nAnswer: {z}")


def percentage(rng: random.Random) -> str:
  p, n = rng.choice((5, 10, 12, 15, 20, 25, 30, 40, 50, 75)), rng.randint(2, 400) * 4
  value = Fraction(p * n, 100)
  return f"What is {p}% of {n}?\nWork: {n} × {p} / 100 = {decimal(value)}.\nAnswer: {decimal(value)}"


_UNITS = (  # (from, to, exact factor)
    ("kilometres", "metres", Fraction(1000)), ("metres", "centimetres", Fraction(100)),
    ("inches", "centimetres", Fraction(254, 100)), ("feet", "inches", Fraction(12)),
    ("miles", "kilometres", Fraction(1609344, 1000000)), ("pounds", "kilograms", Fraction(45359237, 100000000)),
    ("kilograms", "grams", Fraction(1000)), ("litres", "millilitres", Fraction(1000)),
    ("hours", "minutes", Fraction(60)), ("minutes", "seconds", Fraction(60)), ("days", "hours", Fraction(24)),
    ("kibibytes", "bytes", Fraction(1024)), ("mebibytes", "kibibytes", Fraction(1024)),
    ("yards", "feet", Fraction(3)), ("tonnes", "kilograms", Fraction(1000)),
)


def unit_conversion(rng: random.Random) -> str:
  if rng.random() < 0.15:
    c = rng.randint(-40, 120)
    f = Fraction(c) * Fraction(9, 5) + 32
    return (f"Convert {c} °C to Fahrenheit.\nWork: F = C × 9/5 + 32 = {c} × 9/5 + 32 = {decimal(f)}.\n"
            f"Answer: {c} °C = {decimal(f)} °F")
  src, dst, factor = rng.choice(_UNITS)
  value = Fraction(rng.randint(1, 500), rng.choice((1, 1, 2, 4, 10)))
  if rng.random() < 0.4:  # The other way round.
    src, dst, factor = dst, src, 1 / factor
  result = value * factor
  return (f"Convert {decimal(value)} {src} to {dst}.\nWork: 1 {src[:-1] if src.endswith('s') else src} = "
          f"{decimal(factor)} {dst}, so {decimal(value)} × {decimal(factor)} = {decimal(result)}.\n"
          f"Answer: {decimal(value)} {src} = {decimal(result)} {dst}")


def sequence(rng: random.Random) -> str:
  form = rng.randrange(4)
  if form == 0:
    a, d = rng.randint(-20, 50), rng.choice([k for k in range(-9, 13) if k])
    xs, rule = [a + d * i for i in range(7)], f"each term adds {d}"
  elif form == 1:
    a, r = rng.randint(1, 6), rng.randint(2, 4)
    xs, rule = [a * r ** i for i in range(7)], f"each term is multiplied by {r}"
  elif form == 2:
    a, b = rng.randint(0, 5), rng.randint(1, 6)
    xs = [a, b]
    while len(xs) < 7:
      xs.append(xs[-1] + xs[-2])
    rule = "each term is the sum of the two before it"
  else:
    k = rng.randint(1, 6)
    xs, rule = [(i + k) ** 2 for i in range(7)], f"the terms are the squares of the integers from {k} on"
  shown = ", ".join(map(str, xs[:5]))
  return f"What are the next two terms of {shown}, ...?\nRule: {rule}.\nAnswer: {xs[5]}, {xs[6]}"


_NAMES = ("Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "June")
_ADJ = (("taller", "tallest", "shortest"), ("older", "oldest", "youngest"), ("faster", "fastest", "slowest"))


def ordering(rng: random.Random) -> str:
  names = rng.sample(_NAMES, rng.randint(3, 5))  # names[0] ranks first.
  comp, most, least = rng.choice(_ADJ)
  facts = [f"{names[i]} is {comp} than {names[i + 1]}." for i in range(len(names) - 1)]
  rng.shuffle(facts)
  ask_most = rng.random() < 0.5
  answer = names[0] if ask_most else names[-1]
  return (f"{' '.join(facts)} Who is the {most if ask_most else least}?\n"
          f"Order from {most} to {least}: {', '.join(names)}.\nAnswer: {answer}")


def booleans(rng: random.Random) -> str:
  env = {v: rng.random() < 0.5 for v in "ABC"}
  terms = [rng.choice(("", "not ")) + v for v in rng.sample("ABC", rng.randint(2, 3))]
  expr = terms[0]
  for term in terms[1:]:
    expr = f"({expr} {rng.choice(('and', 'or'))} {term})"
  value = pyexpr.safe_eval(expr.replace("A", str(env["A"])).replace("B", str(env["B"])).replace("C", str(env["C"])))
  given = ", ".join(f"{k} = {v}" for k, v in env.items())
  return f"Given {given}, what is {expr}?\nAnswer: {value}"


def letter_count(rng: random.Random) -> str:
  word = rng.choice(("strawberry", "mississippi", "banana", "bookkeeper", "committee", "parallel", "assessment",
                     "onomatopoeia", "referee", "successful", "abracadabra", "tennessee"))
  letter = rng.choice(sorted(set(word)))
  n = word.count(letter)
  spelled = "-".join(word)
  return f"How many times does the letter '{letter}' appear in '{word}'?\nSpelled out: {spelled}.\nAnswer: {n}"


_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")  # Not strftime: locale-free.


def dates(rng: random.Random) -> str:
  start = datetime.date(1990, 1, 1) + datetime.timedelta(days=rng.randint(0, 14000))
  days = rng.randint(1, 400)
  end = start + datetime.timedelta(days=days)
  if rng.random() < 0.5:
    return (f"How many days are there from {start.isoformat()} to {end.isoformat()}?\nAnswer: {days} days; "
            f"{start.isoformat()} is a {_DAYS[start.weekday()]} and {end.isoformat()} a {_DAYS[end.weekday()]}.")
  return (f"What date is {days} days after {start.isoformat()} ({_DAYS[start.weekday()]})?\n"
          f"Answer: {end.isoformat()}, a {_DAYS[end.weekday()]}.")


def python_expression(rng: random.Random) -> str:
  expr = pyexpr.random_expression(rng)
  value = pyexpr.safe_eval(expr)
  return rng.choice((f">>> {expr}\n{value!r}", f"In Python, `{expr}` evaluates to `{value!r}`."))


GENERATORS = {  # name -> (generator, relative weight)
    "multiplication": (multiplication, 2), "addition": (addition, 1), "division": (division, 1),
    "order-of-operations": (order_of_operations, 1), "fractions": (fractions, 1), "percentage": (percentage, 1),
    "unit-conversion": (unit_conversion, 2), "sequence": (sequence, 2), "ordering": (ordering, 2),
    "booleans": (booleans, 1), "letter-count": (letter_count, 1), "dates": (dates, 1),
    "python-expression": (python_expression, 4),
}
