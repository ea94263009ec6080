"""A migrated database (SQLite and PostgreSQL via `db_url`), its sessions and one user: what the
job-layer tests (runner, reconciler, use cases) start from."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from app.db import make_engine, make_session_factory, migrate, session_scope
from app.services import users
from app.services.job_runs import SessionFactory

__all__ = ["engine", "factory", "user_id"]


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def factory(engine: Engine) -> SessionFactory:
    return make_session_factory(engine)


@pytest.fixture
def user_id(factory: SessionFactory) -> str:
    with session_scope(factory) as s:
        return users.create_user("alice", db_session=s).id
