"""Shared fixtures. Integration tests use the real PostgreSQL and Redis (see README)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.db_fixtures import *  # noqa: F403


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", broker_url="")


@pytest.fixture
def client(settings: Settings) -> Iterator[httpx.Client]:
    with TestClient(create_app(settings)) as c:
        yield c
