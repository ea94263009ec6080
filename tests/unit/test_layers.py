"""The import layers cover the whole app by construction, and docs/ARCHITECTURE.md draws them as
the linter checks them."""

from __future__ import annotations

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
