"""app.bench's import graph has no cycle, and only its CLI modules are entry points."""

from __future__ import annotations

import ast
from pathlib import Path

import app.bench

BENCH = Path(app.bench.__file__).parent
ENTRY_POINTS = {"cli", "__main__"}


def bench_imports() -> dict[str, set[str]]:
    """module -> the app.bench modules it imports anywhere (function bodies included)."""
    graph: dict[str, set[str]] = {}
    for path in BENCH.glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "app.bench":
                    deps |= {a.name for a in node.names}
                elif node.module.startswith("app.bench."):
                    deps.add(node.module.removeprefix("app.bench.").split(".")[0])
            elif isinstance(node, ast.Import):
                deps |= {
                    a.name.removeprefix("app.bench.") for a in node.names
                    if a.name.startswith("app.bench.")
                }  # fmt: skip
        graph[path.stem] = deps - {path.stem}
    return graph


def test_no_import_cycle() -> None:
    graph = bench_imports()
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module in done:
            return
        for dep in graph.get(module, ()):
            visit(dep, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())
    assert {"service", "runner", "regions", "cli"} <= set(graph)


def test_library_modules_have_no_main() -> None:
    for path in BENCH.glob("*.py"):
        if path.stem in ENTRY_POINTS:
            continue
        source = path.read_text()
        assert "__main__" not in source and "def main(" not in source, path.name
