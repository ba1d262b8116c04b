"""The package's import graph, read from the source with ast: no cycles between modules, and no
module reaching into another's private names (``from x import _name`` or ``x._name``).

Every import counts, also those inside functions (a deferred import is still a dependency);
``if TYPE_CHECKING:`` blocks do not (they never run).
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lora_convert"
EXCLUDED: set[str] = set()


def module_files() -> dict[str, Path]:
    files = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


MODULES = module_files()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative levels resolved against `module`)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


class Imports:
    """What one module imports: edges to package modules, and private names it takes from them."""

    def __init__(self, module: str, path: Path):
        self.module, self.edges, self.private = module, set(), []
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        skip = _type_checking_nodes(tree)
        bound = {}  # local name -> package module it refers to
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == PACKAGE and alias.name in MODULES:
                        self.edges.add(alias.name)
                        bound[alias.asname or alias.name] = alias.name
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(module, node)
                if source.split(".")[0] != PACKAGE:
                    continue
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    if sub in MODULES:  # `from pkg import submodule`
                        self.edges.add(sub)
                        bound[alias.asname or alias.name] = sub
                    else:
                        self.edges.add(source)
                    if _private(alias.name):
                        self.private.append(f"from {source} import {alias.name}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and _private(node.attr) and bound[node.value.id] != module):
                self.private.append(f"{bound[node.value.id]}.{node.attr}")
        self.edges.discard(module)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@functools.lru_cache(maxsize=1)
def graph() -> dict[str, Imports]:
    return {m: Imports(m, p) for m, p in MODULES.items() if m not in EXCLUDED}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_is_read():
    """The parser sees the imports it must see (else the checks below would pass vacuously)."""
    g = graph()
    assert len(g) > 30
    assert "lora_convert.formats.base" in g["lora_convert.formats.peft"].edges
    assert "lora_convert.st" in g["lora_convert.formats.peft"].edges
    assert "lora_convert.mathcore" in g["lora_convert.convert"].edges
    assert "lora_convert.formats" in g["lora_convert.cli.options"].edges  # `from .. import formats`
    assert "lora_convert.api" not in g["lora_convert"].edges  # TYPE_CHECKING only


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_private_names_are_caught(tmp_path, monkeypatch):
    src = tmp_path / "m.py"
    src.write_text("from .container import _number\nfrom . import st\nst._read_into(1)\n")
    monkeypatch.setitem(MODULES, "lora_convert.fake", src)
    found = Imports("lora_convert.fake", src).private
    assert found == ["from lora_convert.container import _number", "lora_convert.st._read_into"]


def test_no_import_cycles():
    g = graph()
    edges = {m: {e for e in imp.edges if e not in EXCLUDED} for m, imp in g.items()}
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(set(MODULES) - EXCLUDED))
def test_no_private_imports(module):
    assert graph()[module].private == [], f"{module} uses private names of other modules"


# The layers of docs/ARCHITECTURE.md, bottom first: a module may import its own layer and those
# below it, never one above (the package itself, whose exports are lazy, sits outside them).
LAYERS = [
    ["errors", "st", "atomic", "lru"],
    ["factored", "mathcore", "whiten", "quant"],
    ["adapter", "report", "outer", "formats", "containerspec"],
    ["container", "config", "budget", "calibrated", "convert", "advice"],
    ["hub"],
    ["api", "inspect"],
    ["recovery"],
    ["modeling"],
    ["cli"],
]


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module != PACKAGE else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise KeyError(module)


def test_every_module_has_a_layer():
    assert [m for m in MODULES if m != PACKAGE and not _has_layer(m)] == []


def _has_layer(module: str) -> bool:
    try:
        layer_of(module)
    except KeyError:
        return False
    return True


def test_no_import_runs_up_a_layer():
    up = [f"{m} -> {e}" for m, imp in graph().items() if m != PACKAGE
          for e in sorted(imp.edges) if e != PACKAGE and layer_of(e) > layer_of(m)]
    assert up == [], "imports that run up a layer (docs/ARCHITECTURE.md): " + "; ".join(up)


def test_layer_check_can_fail():
    assert layer_of("lora_convert.cli.convert") > layer_of("lora_convert.container")
    assert layer_of("lora_convert.formats.peft") < layer_of("lora_convert.convert")
