"""The code's shape: no import cycles among alexnet's modules (module-level and function-level
imports alike), modules small enough to hold in one's head, nothing loaded unsafely."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "alexnet"
MAX_LINES = 450


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The alexnet modules ``name`` imports anywhere in its code, as written: ``from a.b
    import c`` is a.b.c when that is a module, else a.b."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # imports for type checkers only never run
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package this module is in
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[:len(package) - node.level + 1]
                base = ".".join([*package, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    visiting, done = set(), set()
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        visiting.add(node)
        stack.append(node)
        for nxt in sorted(edges[node]):
            if nxt in visiting:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in done and (cycle := visit(nxt)):
                return cycle
        visiting.discard(node)
        done.add(node)
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in done and (cycle := visit(node)):
            return cycle
    return None


def test_the_walker_sees_function_level_imports_and_finds_a_cycle():
    edges = graph()
    assert "alexnet.models.registry" in edges["alexnet.config"]  # imported inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_among_the_modules():
    assert find_cycle(graph()) is None


def test_no_module_is_long_without_saying_why():
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        if len(lines) > MAX_LINES:
            head = "\n".join(lines[:12]).lower()
            assert "long because" in head, f"{name} has {len(lines)} lines and no reason"


def test_nothing_is_loaded_in_a_way_that_can_run_code():
    unsafe = re.compile(r"weights_only\s*=\s*False|pickle\.loads?\(|yaml\.load\(|"
                        r"yaml\.unsafe_load|cloudpickle\.load")
    for name, path in modules().items():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not unsafe.search(line), f"{name}:{number}: {line.strip()}"
