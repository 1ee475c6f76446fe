"""The package's import graph: no module imports (directly or through others) a module that imports it back, and
package modules are imported at the top of a file, not inside functions (except the optional, heavy dependency
the list below names)."""

from __future__ import annotations

import ast
from pathlib import Path

import hfcompress

PACKAGE = Path(hfcompress.__file__).parent
# Inside-function imports of package modules that stay: they pull in a heavy optional dependency.
ALLOWED_LOCAL_IMPORTS = {("quantization/bitsandbytes.py", "hfcompress.quantization.bnb_embeddings")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, node: ast.AST, modules: set[str]) -> set[str]:
    """The package modules an import statement names (`from . import x` names the module x when there is one)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name.split(".")[0] == "hfcompress"}
    if node.level:
        base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module or ""
    if base.split(".")[0] != "hfcompress":
        return set()
    named = {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules}
    return named or {base}


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """Module -> the package modules it imports at its top level; and the imports made inside functions."""
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph, local = {name: set() for name in files}, []
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = imported_modules(path, node, set(files))
            if node.col_offset == 0:
                graph[name] |= {target for target in targets if target in files and target != name}
            else:
                local += [(str(path.relative_to(PACKAGE)), target) for target in targets]
    return graph, local


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_circles():
    graph, _ = import_graph()
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_package_modules_are_imported_at_the_top_of_each_file():
    _, local = import_graph()
    assert {(path, target) for path, target in local} <= ALLOWED_LOCAL_IMPORTS
