"""Fixtures shared by the API tests of folder libraries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.model_fixtures import tiny_serving  # noqa: F401


@pytest.fixture
def folder_user(api_client, make_user, tiny_serving, tmp_path: Path) -> tuple[Any, Path]:  # noqa: F811, ARG001 (the model)
    """A user, and the folder lib/ under tmp_path/photos, where the module's settings allow
    libraries (tests/api/test_libraries.py `db_settings`)."""
    return make_user(api_client), tmp_path / "photos" / "lib"
