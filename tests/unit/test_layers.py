"""The import layers cover the whole app by construction, and docs/ARCHITECTURE.md draws them as
the linter checks them."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    return list(contract["layers"])


def _rooms(layer: str) -> list[str]:
    return [name.strip() for name in re.split(r"[|:]", layer)]


def test_every_top_level_module_of_app_is_in_a_layer():
    named = {room for layer in _layers() for room in _rooms(layer)}
    present = {
        f"app.{p.stem if p.suffix == '.py' else p.name}"
        for p in (ROOT / "app").iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()
    }
    assert present - named == set(), "give these a layer in pyproject.toml"
    assert named - present - {"workers"} == set(), "layers name rooms that are gone"


def _drawn(path: Path, heading: str) -> list[str]:
    """The rooms of the first code block under `heading`, one layer per unindented line."""
    block = path.read_text().split(heading, 1)[1].split("```", 2)[1]
    return [line.split("  ")[0].strip() for line in block.splitlines() if line[:1].strip()]


def test_the_architecture_pictures_are_the_linted_layers():
    assert _drawn(ROOT / "docs" / "ARCHITECTURE.md", "## Layers") == _layers()
    assert _drawn(ROOT / "README.md", "## How it is built") == _layers()


# Request-side use cases take one environment object and a value, as jobs take JobEnvironment
# (docs/CONTRACTS.md#request-side-use-cases); a sixth parameter means an environment is missing.
MAX_USE_CASE_PARAMETERS = 5


def parameter_count(node: ast.FunctionDef) -> int:
    args = node.args
    extra = (args.vararg is not None) + (args.kwarg is not None)
    return len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs) + extra


def over_the_limit(source: str, limit: int = MAX_USE_CASE_PARAMETERS) -> list[str]:
    """The public module-level functions of `source` that take more than `limit` parameters."""
    return [
        f"{node.name} ({parameter_count(node)})"
        for node in ast.parse(source).body
        if isinstance(node, ast.FunctionDef)
        and not node.name.startswith("_")
        and parameter_count(node) > limit
    ]


def test_the_count_sees_every_kind_of_parameter():
    source = "\n".join(
        [
            "def f(a, /, b, *c, d, **e): ...",
            "def g(a, b, *, c, d, e): ...",
            "def _h(a, b, c, d, e, f): ...",
        ]
    )
    assert over_the_limit(source, 4) == ["f (5)", "g (5)"]
    assert over_the_limit(source) == []


def test_no_use_case_takes_more_than_five_parameters():
    found = {
        str(path.relative_to(ROOT)): over
        for path in sorted((ROOT / "app" / "services").glob("*.py"))
        if (over := over_the_limit(path.read_text()))
    }
    assert found == {}, "give these use cases an environment object (docs/CONTRACTS.md)"
