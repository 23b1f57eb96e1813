"""The package's import graph: no cycles, the demo imported by nothing outside it, no imports of
the repository's config or data folders, and function-level imports only for optional heavy
dependencies, each with its reason."""

from __future__ import annotations

import ast
import pathlib
import sys
import tomllib

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "vbert_jax"
# Imported inside functions on purpose: optional (torch is a test requirement only) or slow to
# import (TFDS and clu's writers import TensorFlow).
LAZY = {"torch", "torchvision", "safetensors", "tensorflow_datasets", "clu"}


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(REPO).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: pathlib.Path):
  """(imported name, line, inside a function) of every import statement in the file."""
  tree = ast.parse(path.read_text())
  here = _module_name(path)

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
      if isinstance(child, ast.Import):
        for alias in child.names:
          yield alias.name, child.lineno, in_function
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ""
        if child.level:
          package = here.split(".")[:-child.level] if path.name != "__init__.py" else \
              here.split(".")[:len(here.split(".")) - child.level + 1]
          base = ".".join(package + ([base] if base else []))
        for alias in child.names:
          yield f"{base}.{alias.name}", child.lineno, in_function
        yield base, child.lineno, in_function
      yield from visit(child, inner)
  yield from visit(tree, False)


def _own_module(name: str) -> str | None:
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def _graph() -> dict[str, set[str]]:
  graph = {}
  for name, path in MODULES.items():
    targets = {_own_module(n) for n, _, _ in _imports(path) if n.startswith("vbert_jax")}
    # A module's own packages run before it anyway: importing them is no cycle.
    graph[name] = {t for t in targets if t and t != name and not name.startswith(t + ".")}
  return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []
  sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))

  def connect(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        connect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))
  for v in sorted(graph):
    if v not in index:
      connect(v)
  return out


def test_the_graph_sees_real_edges():
  graph = _graph()
  assert "vbert_jax.train" in graph["vbert_jax.pretrain"]
  assert "vbert_jax.checkpoints" in graph["vbert_jax.train"]
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
  assert _cycles(_graph()) == []


def test_nothing_outside_the_demo_imports_it():
  for name, targets in _graph().items():
    if not name.startswith("vbert_jax.demo"):
      demo = sorted(t for t in targets if t.startswith("vbert_jax.demo"))
      assert not demo, f"{name} imports {demo}"


def test_the_library_imports_neither_configs_nor_data():
  for name, path in MODULES.items():
    for imported, line, _ in _imports(path):
      assert imported.split(".")[0] not in ("configs", "data", "bench", "tests", "helpers"), \
          f"{path.relative_to(REPO)}:{line} imports {imported}"


def test_function_level_imports_are_optional_heavy_dependencies_with_a_reason():
  for name, path in MODULES.items():
    lines = path.read_text().splitlines()
    for imported, line, in_function in _imports(path):
      if not in_function:
        continue
      assert imported.split(".")[0] in LAZY, \
          f"{path.relative_to(REPO)}:{line} imports {imported} inside a function"
      said = lines[line - 1] + lines[line - 2]
      assert "#" in said, f"{path.relative_to(REPO)}:{line}: say why {imported} is imported late"


def test_only_the_library_is_installed():
  project = tomllib.loads((REPO / "pyproject.toml").read_text())
  assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["vbert_jax*"]
  for folder in ("configs", "data"):
    assert not (REPO / folder / "__init__.py").exists(), f"{folder}/ is a package"
