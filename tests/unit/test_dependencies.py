"""The declared dependencies say what the suite ran on: every runtime floor is met by the
installed version, and Starlette, whose private parser state app/api/forms.py uses, is bounded
above to the minor release the suite checked (tests/api/test_multipart.py)."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def _runtime() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(spec) for spec in project["dependencies"]]


def test_every_runtime_dependency_has_a_floor_the_installed_version_meets():
    for req in _runtime():
        floors = [s for s in req.specifier if s.operator in (">=", "==", "~=")]
        assert floors, f"{req.name} has no floor"
        installed = Version(version(req.name))
        assert installed in req.specifier, f"{req.name} {installed} is outside {req.specifier}"


def test_starlette_is_bounded_to_the_minor_release_its_private_names_were_checked_on():
    forms = (ROOT / "app" / "api" / "forms.py").read_text()
    assert re.search(r"^from starlette\.formparsers import", forms, re.M)
    (starlette,) = [r for r in _runtime() if r.name == "starlette"]
    uppers = [Version(s.version) for s in starlette.specifier if s.operator == "<"]
    floors = [Version(s.version) for s in starlette.specifier if s.operator == ">="]
    assert uppers and floors, starlette
    # One minor release: the floor's next minor is the bound.
    assert uppers[0] == Version(f"{floors[0].major}.{floors[0].minor + 1}"), starlette
