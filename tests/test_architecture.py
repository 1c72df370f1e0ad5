"""The floors of ARCHITECTURE.md hold: no module imports a package above its own, and no import cycle."""

import ast
import pathlib

from tests.helpers import ROOT

# Bottom to top. A module may import its own package and the packages on the floors below, never above.
FLOORS = (("atomic", "cache", "hashing", "workdir"), ("config",), ("data",), ("model",), ("objectives",), ("telemetry",),
          ("planning",), ("parallel",), ("runtime",), ("checkpoint",), ("eval",), ("train",), ("interop",),
          ("cli",), ("__main__", "__init__"))
FLOOR = {unit: i for i, units in enumerate(FLOORS) for unit in units}
PACKAGE = pathlib.Path(ROOT) / "codex_jax"


def _imports() -> dict[str, set[str]]:
  """Module -> the codex_jax modules it imports (anywhere in the file, late imports included)."""
  modules = {".".join(f.relative_to(ROOT).with_suffix("").parts): f for f in PACKAGE.rglob("*.py")}
  graph = {}
  for name, path in modules.items():
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("codex_jax"):
        for alias in node.names:  # `from package import module` imports the module; any other name, its module.
          name_or_module = f"{node.module}.{alias.name}"
          found.add(name_or_module if _is_module(name_or_module, modules) else node.module)
      elif isinstance(node, ast.Import):
        found |= {a.name for a in node.names if _is_module(a.name, modules)}
    module = name.removesuffix(".__init__")
    graph[module] = found - {module, "codex_jax"}
  return graph


def _is_module(name: str, modules) -> bool:
  return name in modules or f"{name}.__init__" in modules


def _unit(module: str) -> str:
  return (module.split(".") + ["__init__"])[1]


def test_every_package_is_on_a_floor():
  units = {_unit(m) for m in _imports()}
  assert units <= set(FLOOR), f"packages missing from FLOORS (and ARCHITECTURE.md): {sorted(units - set(FLOOR))}"


def _upward(graph) -> list[str]:
  return sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets if FLOOR[_unit(t)] > FLOOR[_unit(m)])


def _cycles(graph) -> list[str]:
  state, cycles = {}, []

  def visit(module, path):
    state[module] = "open"
    for target in sorted(graph.get(module, ())):
      if state.get(target) == "open":
        cycles.append(" -> ".join(path[path.index(target):] + [target]))
      elif target not in state:
        visit(target, path + [target])
    state[module] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  return cycles


def test_no_module_imports_a_package_above_its_own():
  upward = _upward(_imports())
  assert not upward, "imports against the floors:\n" + "\n".join(upward)


def test_no_import_cycle_between_modules():
  cycles = _cycles(_imports())
  assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checks_name_an_upward_import_and_a_cycle():
  """Each check can fail: the eval -> train import this layering removed, and a two-module cycle."""
  knot = {"codex_jax.eval.suite": {"codex_jax.train.setup"}, "codex_jax.train.setup": {"codex_jax.runtime.engine"}}
  assert _upward(knot) == ["codex_jax.eval.suite -> codex_jax.train.setup"]
  loop = {"codex_jax.train.a": {"codex_jax.train.b"}, "codex_jax.train.b": {"codex_jax.train.a"}}
  assert _cycles(loop) == ["codex_jax.train.a -> codex_jax.train.b -> codex_jax.train.a"]
  assert "codex_jax.runtime.engine" in _imports()["codex_jax.eval.suite"]  # And the graph is read from the code.
