"""A dependency that is away gives a clear, retryable answer, never a 500 (issue 13).

The database unreachable: 503 `database_unavailable` with Retry-After, while /healthz still
answers and /readyz names the database. The disk full or read-only: 507 `storage_full` / 503
`storage_unavailable`, nothing half-stored, reads keep working.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app import storage
from app.config import Settings
from app.main import create_app
from tests.db_fixtures import image_bytes

KEY = "polar_0123abcd_" + "x" * 43  # well-formed, so the database is asked


def test_an_unreachable_database_is_a_retryable_503(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        # Port 1: nothing listens; the connection is refused at once.
        database_url="postgresql+psycopg://postgres@127.0.0.1:1/polar",
        broker_url="",
    )
    client = TestClient(create_app(settings))  # no lifespan: it would migrate first
    r = client.get("/images", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "database_unavailable"
    assert int(r.headers["Retry-After"]) > 0
    assert "127.0.0.1" not in r.text  # no connection details leak to clients
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 503 and not ready.json()["checks"]["database"]["ok"]


def png(i: int) -> bytes:
    return image_bytes("PNG", (16, 16), (i * 50 % 256, 7, 9))


@pytest.mark.parametrize(
    ("code", "status", "error_code"),
    [(errno.ENOSPC, 507, "storage_full"), (errno.EROFS, 503, "storage_unavailable")],
)
def test_a_full_or_read_only_disk_refuses_uploads_and_keeps_serving_reads(
    api_client: Any,
    make_user: Any,
    monkeypatch: pytest.MonkeyPatch,
    code: int,
    status: int,
    error_code: str,
) -> None:
    user = make_user(api_client)
    first = api_client.post(
        "/images", files=[("files", ("a.png", png(1), "image/png"))], headers=user.headers
    )
    assert first.status_code == 202

    def no_room(*_: Any) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(storage, "_copy_limited", no_room)
    files = [("files", (f"b{i}.png", png(10 + i), "image/png")) for i in range(3)]
    r = api_client.post("/images", files=files, headers=user.headers)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == error_code
    photos = [("files", (f"c{i}.png", png(20 + i), "image/png")) for i in range(3)]
    c = api_client.post("/concepts", data={"name": "Fido"}, files=photos, headers=user.headers)
    assert (c.status_code, c.json()["error"]["code"]) == (status, error_code)
    # Nothing half-stored, and reading still works.
    listed = api_client.get("/images", headers=user.headers)
    assert listed.status_code == 200 and len(listed.json()["items"]) == 1
    assert api_client.get("/concepts", headers=user.headers).json()["items"] == []
    data_dir = Path(api_client.app.state.container.settings.data_dir)
    assert not any((data_dir / "tmp").glob("upload-*"))


def test_a_session_that_fails_to_close_does_not_cut_the_response(
    api_client: TestClient, make_user: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The database dropped the request's connection after the work was done (a restart under
    load): closing the session fails. The answer still goes out whole; the failure is logged."""
    from sqlalchemy.exc import OperationalError

    user = make_user(api_client)
    real = api_client.app.state.container.session_factory
    closes: list[int] = []

    def factory() -> Any:
        session = real()
        close = session.close

        def failing_close() -> None:
            close()
            closes.append(1)
            raise OperationalError("ROLLBACK", {}, Exception("terminating connection"))

        session.close = failing_close
        return session

    container = api_client.app.state.container
    api_client.app.state.container = dataclasses.replace(container, session_factory=factory)
    try:
        r = api_client.get("/images", headers=user.headers)  # the client re-raises server errors
    finally:
        api_client.app.state.container = container
    assert r.status_code == 200, r.text
    assert r.json()["items"] == []
    assert closes  # the failing close did run
    assert "could not be closed cleanly" in caplog.text
