"""IndexCache's bounds: users and bytes, least recently searched dropped first, files kept."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import delete, select
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


def bump(s: Session, user_id: str) -> None:
    user = s.get(User, user_id)
    assert user is not None
    user.index_generation += 1
    s.commit()


def db_ids(s: Session, user_id: str) -> list[int]:
    return sorted(s.scalars(select(Image.vec_id).where(Image.user_id == user_id)))


def test_a_change_updates_the_cached_index_in_place(db: Session, tmp_path: Path) -> None:
    user = add_user(db, "w", 50)
    cache = IndexCache(tmp_path / "index")
    first = cache.get(db_session=db, user_id=user, model_id=MODEL, dim=D)
    assert cache.rebuilds == 1 and cache.refreshes == 0
    # 7 new images (as an embed batch commits them) and 3 deleted, one generation bump.
    rng = np.random.default_rng(7)
    for n in range(7):
        v = rng.normal(size=D).astype(np.float32)
        db.add(
            Image(
                user_id=user, sha256=f"new{n:06d}".ljust(64, "0"), mime="image/png", size_bytes=1,
                width=1, height=1, storage_path=f"new/{n}.png",
                embedding=(v / np.linalg.norm(v)).tobytes(), embedding_model=MODEL,
            )
        )  # fmt: skip
    for vec_id in db_ids(db, user)[:3]:
        db.execute(delete(Image).where(Image.vec_id == vec_id))
    db.commit()
    bump(db, user)
    second = cache.get(db_session=db, user_id=user, model_id=MODEL, dim=D)
    assert cache.rebuilds == 1 and cache.refreshes == 1  # no full read of the embeddings
    assert second.generation == first.generation + 1
    assert sorted(second.index.ids().tolist()) == db_ids(db, user)
    # The added vectors are the stored ones: each one is its own best match.
    for vec_id, blob in db.execute(select(Image.vec_id, Image.embedding)):
        _, ids = second.index.search(np.frombuffer(blob, np.float32)[None], 1)
        assert ids[0, 0] == vec_id
    # The file is written in the background at the new generation: a new process loads it.
    cache.flush()
    fresh = IndexCache(tmp_path / "index")
    loaded = fresh.get(db_session=db, user_id=user, model_id=MODEL, dim=D)
    assert fresh.rebuilds == 0 and loaded.generation == second.generation
    assert sorted(loaded.index.ids().tolist()) == db_ids(db, user)
    cache.close()


def test_a_large_change_rebuilds_instead(db: Session, tmp_path: Path) -> None:
    user = add_user(db, "x", 10)
    cache = IndexCache(tmp_path / "index")
    get(cache, db, user)
    db.execute(delete(Image).where(Image.user_id == user))
    db.commit()
    bump(db, user)
    assert get(cache, db, user) == 0
    assert cache.refreshes == 1  # 10 changes are under the limit (n/2 + 1000)
    big = add_user(db, "y", 0)
    get(cache, db, big)
    many = 1200
    rng = np.random.default_rng(3)
    vecs = rng.normal(size=(many, D)).astype(np.float32)
    for n in range(many):
        db.add(
            Image(
                user_id=big, sha256=f"m{n:06d}".ljust(64, "0"), mime="image/png", size_bytes=1,
                width=1, height=1, storage_path=f"m/{n}.png",
                embedding=(vecs[n] / np.linalg.norm(vecs[n])).tobytes(), embedding_model=MODEL,
            )
        )  # fmt: skip
    db.commit()
    bump(db, big)
    rebuilds = cache.rebuilds
    assert get(cache, db, big) == many
    assert cache.rebuilds == rebuilds + 1 and cache.refreshes == 1


def test_a_stored_row_embedded_again_gets_a_new_vector_id_and_the_cache_follows(
    db: Session, tmp_path: Path
) -> None:
    """A vec_id names one vector: an ORM write of a stored row's embedding gives it a new id
    (a new row keeps the id it is given), so the cache, synced by id difference, swaps the
    vector at the next search, and a restart does not load the old one from the file."""
    user_id = add_user(db, "u", images=3)
    cache = IndexCache(tmp_path / "idx")
    get(cache, db, user_id)
    row = db.scalars(select(Image).where(Image.user_id == user_id)).first()
    assert row is not None
    old_id = row.vec_id
    new = np.zeros(D, np.float32)
    new[0] = 1.0
    row.embedding = new.tobytes()
    bump = db.get(User, user_id)
    assert bump is not None
    bump.index_generation += 1
    db.commit()
    assert row.vec_id != old_id
    for c in (cache, IndexCache(tmp_path / "idx")):  # this process, then a restart
        entry = c.get(db_session=db, user_id=user_id, model_id=MODEL, dim=D)
        scores, ids = entry.index.search(new[None, :], 1)
        assert int(ids[0, 0]) == row.vec_id and scores[0, 0] == pytest.approx(1.0)
        assert old_id not in entry.index.ids()
        c.flush()
    fresh = Image(
        user_id=user_id, vec_id=7, sha256="f" * 64, mime="image/png", size_bytes=1,
        width=1, height=1, storage_path="x", embedding=new.tobytes(),
    )  # fmt: skip
    assert fresh.vec_id == 7
