"""The package's import graph has no circle: every import of a ``dfkd_bench`` module by another,
at module level or inside a function, read from the source with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO_ROOT


def module_files() -> dict[str, Path]:
    files = {}
    for path in sorted((REPO_ROOT / "dfkd_bench").rglob("*.py")):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((REPO_ROOT / "methods").glob("*.py")):  # installed as dfkd_bench.methods
        files["dfkd_bench.methods" if path.stem == "__init__" else f"dfkd_bench.methods.{path.stem}"] = path
    return files


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)  # a package's own __init__ is not an edge from its modules
                    break
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_finds_a_planted_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_the_package():
    graph = import_graph()
    assert "dfkd_bench.train.engine" in graph and graph["dfkd_bench.cli"]  # the graph was read
    assert cycles(graph) == []


# ------------------------------------------------------------------ layers ---

def row_names(line: str) -> list[str]:
    """The names of a table row: the words before the run of two or more spaces."""
    return line.strip().split("  ")[0].split()


def unit_of(module: str) -> str:
    """The table name a module belongs to: its subpackage, or its own name for a top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "dfkd_bench"


def package_rule(unit: str) -> set[str] | None:
    """The names a subpackage's ``__init__`` docstring allows after "May import:"."""
    path = REPO_ROOT / ("methods" if unit == "methods" else f"dfkd_bench/{unit}") / "__init__.py"
    if not path.exists():
        return None
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert "May import:" in doc, f"{path} does not say what it may import"
    line = doc.split("May import:", 1)[1].split(".\n", 1)[0].split("(", 1)[0]
    return {name.strip(" .") for name in line.replace("\n", " ").split(",") if name.strip(" .")}


def allowed_imports() -> dict[str, set[str]]:
    rows = [row_names(line) for line in _table_lines()]
    allowed: dict[str, set[str]] = {}
    for i, row in enumerate(rows):
        below = {name for lower in rows[i + 1:] for name in lower}
        for name in row:
            rule = package_rule(name)
            if rule is not None:
                assert rule <= below, f"{name}/__init__.py allows {sorted(rule - below)}, which are not below it"
                allowed[name] = rule
            else:
                allowed[name] = below
    return allowed


def _table_lines() -> list[str]:
    doc = ast.get_docstring(ast.parse((REPO_ROOT / "dfkd_bench" / "__init__.py").read_text()))
    block = doc.split("Layers:\n", 1)[1].split("\n\n", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def layer_violations(graph: dict[str, set[str]], allowed: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in sorted(graph.items()):
        unit = unit_of(module)
        for target in sorted(targets):
            other = unit_of(target)
            if target == "dfkd_bench" or other == unit:
                continue  # the root package (its version) and a module's own package
            if other not in allowed.get(unit, set()):
                found.append(f"{module} imports {target}")
    return found


def test_every_package_and_top_level_module_is_in_the_layer_table():
    names = {name for line in _table_lines() for name in row_names(line)}
    units = {unit_of(module) for module in module_files()} - {"dfkd_bench"}
    assert units == names, f"not in the table: {sorted(units - names)}; in the table only: {sorted(names - units)}"


def test_imports_only_go_down_the_layers():
    assert layer_violations(import_graph(), allowed_imports()) == []


def test_the_layer_check_finds_an_upward_import():
    graph = {"dfkd_bench.train.engine": {"dfkd_bench.cluster.launch", "dfkd_bench.train.graphs"},
             "dfkd_bench.data.loaders": {"dfkd_bench.models.registry"},
             "dfkd_bench.cli": {"dfkd_bench.report.writer"}}
    assert layer_violations(graph, allowed_imports()) == [
        "dfkd_bench.data.loaders imports dfkd_bench.models.registry",  # same row: beside, not below
        "dfkd_bench.train.engine imports dfkd_bench.cluster.launch"]
