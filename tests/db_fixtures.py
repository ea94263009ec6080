"""Database fixtures: SQLite and the real PostgreSQL, each test isolated.

Postgres: one fresh schema per test session (migrated once, dropped at the end; the URL carries
`search_path`, so the app, Alembic and raw SQL all land in it), truncated after every test.
SQLite: a copy per test (in tmp_path) of one database migrated once per session.

`api_client` runs a test once per backend (the Postgres run is marked `postgres`);
`make_user(client)` creates a user with a key in that app's database.
"""

from __future__ import annotations

import io
import random
import shutil
import struct
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import text

from app.bench.harness import POSTGRES_URL
from app.bench.harness import temporary_pg_schema as _temporary_schema
from app.config import Settings
from app.db import make_engine, migrate
from app.main import create_app
from app.models import Base
from app.services import users

__all__ = [
    "POSTGRES_URL",
    "ApiUser",
    "api_client",
    "create_api_user",
    "db_settings",
    "db_url",
    "image_bytes",
    "make_user",
    "noisy_jpeg",
    "png_claiming",
    "postgres_schema_url",
    "postgres_url",
    "sqlite_template",
    "temporary_pg_schema",
    "truncate_all",
]


@contextmanager
def temporary_pg_schema(base_url: str = POSTGRES_URL) -> Iterator[str]:
    """A new empty schema for a test session; yields its URL; drops it afterwards."""
    with _temporary_schema(base_url, prefix="polar_test") as url:
        yield url


def truncate_all(url: str) -> None:
    """Empty every application table (Postgres), keeping the schema and its revision."""
    engine = make_engine(url)
    try:
        # DELETE, dependents first: a test leaves a few rows, and TRUNCATE's fixed cost (new
        # files for every table) was about 0.25 s, twice per Postgres test.
        with engine.begin() as conn:
            for table in reversed(Base.metadata.sorted_tables):
                conn.execute(text(f'DELETE FROM "{table.name}"'))
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A migrated Postgres schema shared by the session's tests (truncated between them)."""
    with temporary_pg_schema() as url:
        engine = make_engine(url)
        migrate(engine)
        engine.dispose()
        yield url


@pytest.fixture
def postgres_schema_url() -> Iterator[str]:
    """A fresh, empty (unmigrated) Postgres schema for this test only."""
    with temporary_pg_schema() as url:
        yield url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty SQLite database made once per session; each test gets a copy of it
    (migrating a new file took 0.2-1.2 s of every SQLite test on a busy 2-core machine, a
    copy about 5 ms). The apps still run `migrate` at startup, which finds it at head."""
    path = tmp_path_factory.mktemp("sqlite-template") / "migrated.db"
    engine = make_engine(f"sqlite:///{path.as_posix()}")
    try:
        migrate(engine)
    finally:
        engine.dispose()  # the last connection closed: the WAL is folded into the file
    for extra in ("-wal", "-shm"):
        assert not path.with_name(path.name + extra).exists(), "the template is not one file"
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database URL, once per backend; the database is migrated and empty when the test
    starts."""
    if request.param == "sqlite":
        path = tmp_path / "test.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path.as_posix()}"
        return
    url = request.getfixturevalue("postgres_url")
    truncate_all(url)  # also covers a previous test that died before its teardown
    yield url
    truncate_all(url)


@pytest.fixture
def db_settings(tmp_path: Path, db_url: str) -> Settings:
    """Settings on `db_url` with a fresh data folder and the in-process job runner."""
    return Settings(data_dir=tmp_path / "data", database_url=db_url, broker_url="")


@pytest.fixture
def api_client(db_settings: Settings) -> Iterator[TestClient]:
    """The app on `db_settings`, started (schema migrated) and stopped around the test."""
    with TestClient(create_app(db_settings)) as client:
        yield client


@dataclass(frozen=True)
class ApiUser:
    """A user with a fresh key, as a client sees it."""

    id: str
    key: str
    key_id: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def create_api_user(client: TestClient, name: str = "alice") -> ApiUser:
    """Create a user and a key in the database of the app behind `client`."""
    app: Any = client.app
    with app.state.container.session_factory() as db_session:
        user = users.create_user(name, db_session=db_session)
        api_key, key = users.create_api_key(user.id, db_session=db_session)
        return ApiUser(id=user.id, key=key, key_id=api_key.id)


@pytest.fixture
def make_user() -> Callable[..., ApiUser]:
    """`make_user(client, name="alice")` -> ApiUser."""
    return create_api_user


# -- test images, made in memory ------------------------------------------------------------


def image_bytes(
    fmt: str = "JPEG", size: tuple[int, int] = (32, 24), color: Any = (200, 30, 30), **save: Any
) -> bytes:
    """An image of one colour (pass a different colour for different content)."""
    mode = (
        "RGBA" if fmt in ("PNG", "WEBP") and isinstance(color, tuple) and len(color) == 4 else "RGB"
    )
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, fmt, **save)
    return buf.getvalue()


def noisy_jpeg(size: tuple[int, int] = (96, 64), seed: int = 0) -> bytes:
    """A JPEG whose scan data fills most of the file (so cutting it really truncates pixels)."""
    rng = random.Random(seed)
    img = Image.frombytes(
        "RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3))
    )
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose header claims width × height (a decompression bomb)."""
    data = bytearray(image_bytes("PNG", (1, 1)))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)
