"""IndexCache's bounds: users and bytes, least recently searched dropped first, files kept."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.orm import Session

from app.db import get_session_factory, make_engine, migrate
from app.models import Image, User
from app.services.index import IndexCache

MODEL = "test-model"
D = 16


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Session]:
    url = f"sqlite:///{(tmp_path / 'cache.db').as_posix()}"
    migrate(make_engine(url))
    with get_session_factory(url)() as s:
        yield s


def add_user(s: Session, name: str, images: int) -> str:
    user = User(name=name)
    s.add(user)
    s.flush()
    rng = np.random.default_rng(len(name) * 1000 + images)
    for n in range(images):
        v = rng.normal(size=D).astype(np.float32)
        s.add(
            Image(
                user_id=user.id, sha256=f"{n:08d}{name}".ljust(64, "0"), mime="image/png",
                size_bytes=1, width=1, height=1, storage_path=f"{name}/{n}.png",
                embedding=(v / np.linalg.norm(v)).tobytes(), embedding_model=MODEL,
            )
        )  # fmt: skip
    s.commit()
    return user.id


def get(cache: IndexCache, s: Session, user_id: str) -> int:
    return len(cache.get(db_session=s, user_id=user_id, model_id=MODEL, dim=D).index)


def test_byte_budget_drops_the_least_recently_searched(db: Session, tmp_path: Path) -> None:
    users = [add_user(db, f"u{i}", 100) for i in range(3)]
    probe = IndexCache(tmp_path / "probe")
    get(probe, db, users[0])
    one = probe.nbytes
    assert one > 100 * 4 * D  # vectors, ids and the id map are counted
    cache = IndexCache(tmp_path / "index", max_bytes=int(2.5 * one))
    for u in users[:2]:
        assert get(cache, db, u) == 100
    assert cache.evictions == 0 and cache.nbytes == 2 * one
    get(cache, db, users[0])  # users[0] is now the most recent: users[1] goes next
    get(cache, db, users[2])
    assert cache.evictions == 1 and cache.nbytes == 2 * one
    rebuilds = cache.rebuilds
    get(cache, db, users[0])  # still in memory: no file read, no rebuild
    assert cache.rebuilds == rebuilds and cache.evictions == 1
    get(cache, db, users[1])  # dropped from memory, but its file is loaded, not rebuilt
    assert cache.rebuilds == rebuilds and cache.evictions == 2


def test_an_index_over_the_budget_is_still_served(db: Session, tmp_path: Path) -> None:
    small, big = add_user(db, "small", 5), add_user(db, "big", 300)
    cache = IndexCache(tmp_path / "index", max_bytes=1)
    assert get(cache, db, small) == 5
    assert get(cache, db, big) == 300  # the one asked for stays; the other is dropped
    assert cache.evictions == 1
    assert cache.nbytes == cache.get(db_session=db, user_id=big, model_id=MODEL, dim=D).index.nbytes


def test_user_bound_still_applies(db: Session, tmp_path: Path) -> None:
    users = [add_user(db, f"v{i}", 3) for i in range(3)]
    cache = IndexCache(tmp_path / "index", max_users=2)
    for u in users:
        get(cache, db, u)
    assert cache.evictions == 1
