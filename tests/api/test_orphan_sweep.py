"""The startup sweep (issue 28): originals that no row references, left by an upload cut short
(a crash, a full disk), are removed when the database says so, with a log line naming them."""

from __future__ import annotations

import io
import logging
import os
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from app.config import Settings
from app.db import make_engine, make_session_factory, migrate
from app.main import create_app
from app.services.images import SWEEP_MIN_AGE_S, sweep_unreferenced_originals
from app.storage import ImageStore
from tests.db_fixtures import create_api_user, image_bytes

LIMITS = {"max_bytes": 1 << 20, "max_pixels": 10_000_000}
OLD = time.time() - 2 * SWEEP_MIN_AGE_S


def store_file(store: ImageStore, color: tuple[int, int, int], mtime: float = OLD) -> str:
    """An original moved into place, as an upload does before its row is committed."""
    staged = store.stage(io.BytesIO(image_bytes("PNG", (8, 8), color)), "a.png", **LIMITS)
    path, created = store.commit(staged)
    assert created
    os.utime(store.path(path), (mtime, mtime))
    return path


def test_the_sweep_removes_old_unreferenced_originals_only(
    db_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with TestClient(create_app(db_settings)) as client:
        user = create_api_user(client)
        r = client.post("/images", headers=user.headers,
                        files=[("files", ("kept.png", image_bytes("PNG", (8, 8), (9, 9, 9)),
                                          "image/png"))])  # fmt: skip
        assert r.status_code == 202, r.text
        app = client.app
        store: ImageStore = app.state.container.store  # type: ignore[attr-defined]
        kept = r.json()["images"][0]
        kept_path = next(p for p, _ in store.originals())
        os.utime(store.path(kept_path), (OLD, OLD))
        orphan = store_file(store, (1, 2, 3))
        young = store_file(store, (4, 5, 6), mtime=time.time())  # an upload in flight
        factory = app.state.container.session_factory  # type: ignore[attr-defined]
        with caplog.at_level(logging.WARNING, "app.services.images"):
            removed = sweep_unreferenced_originals(factory, store)
        assert removed == [orphan]
        assert not store.path(orphan).exists()
        assert not store.path(store.thumbnail_relpath(orphan)).exists()
        assert store.path(young).exists() and store.path(kept_path).exists()
        assert client.get(f"/images/{kept['id']}/file", headers=user.headers).status_code == 200
        assert f"removed 1 original(s) that no row references: {orphan}" in caplog.text


def test_the_app_sweeps_at_startup(db_settings: Settings) -> None:
    with TestClient(create_app(db_settings)) as client:  # a first start: the schema
        user = create_api_user(client)
        r = client.post("/images", headers=user.headers,
                        files=[("files", ("kept.png", image_bytes("PNG", (8, 8), (9, 9, 9)),
                                          "image/png"))])  # fmt: skip
        assert r.status_code == 202, r.text
    store = ImageStore(db_settings.data_dir)
    orphan = store_file(store, (1, 2, 3))
    with TestClient(create_app(db_settings)):
        assert not store.path(orphan).exists()
    assert len(list(store.originals())) == 1


def test_no_sweep_without_the_databases_word(tmp_path: Path, db_url: str) -> None:
    store = ImageStore(tmp_path / "data")
    orphan = store_file(store, (1, 2, 3))
    # Unreachable: the error propagates, nothing is deleted.
    away = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/nothing")  # a closed port
    with pytest.raises(OperationalError):
        sweep_unreferenced_originals(make_session_factory(away), store)
    away.dispose()
    assert store.path(orphan).exists()
    # A database that references no file at all (the wrong one, or empty) is not believed.
    engine = make_engine(db_url)
    migrate(engine)
    assert sweep_unreferenced_originals(make_session_factory(engine), store) == []
    assert store.path(orphan).exists()
    engine.dispose()
