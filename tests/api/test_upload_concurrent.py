"""Uploads of the same new bytes by one user at the same moment: every request succeeds, one
image is stored, and every answer but one says duplicate, on SQLite and on the real PostgreSQL.
The lookups of the requests are made to run side by side (each waits a while for the others'),
which without the per-user lock made all of them insert and all but one fail (409 retry)."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from app import repositories
from tests.api.test_search import wait_jobs
from tests.db_fixtures import noisy_jpeg
from tests.model_fixtures import tiny_serving  # noqa: F401

REQUESTS = 3


@pytest.fixture(autouse=True)
def lookups_side_by_side(monkeypatch) -> None:
    barrier = threading.Barrier(REQUESTS)
    lookup = repositories.get_image_by_sha256

    def side_by_side(**kwargs: Any) -> Any:
        found = lookup(**kwargs)
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=1.0)
        return found

    monkeypatch.setattr(repositories, "get_image_by_sha256", side_by_side)


def test_the_same_new_photo_uploaded_at_once_is_stored_once(
    api_client,
    make_user,
    tiny_serving,  # noqa: F811, ARG001 (the model)
):
    user = make_user(api_client)
    data = noisy_jpeg(seed=77)

    def send(n: int) -> Any:
        files = [("files", (f"copy-{n}.jpg", data, "image/jpeg"))]
        return api_client.post("/images", files=files, headers=user.headers)

    with ThreadPoolExecutor(REQUESTS) as pool:
        answers = list(pool.map(send, range(REQUESTS)))
    assert [r.status_code for r in answers] == [202] * REQUESTS, [r.text for r in answers]
    images = [r.json()["images"][0] for r in answers]
    assert len({i["id"] for i in images}) == 1
    assert sorted(i["duplicate"] for i in images) == [False] + [True] * (REQUESTS - 1)
    wait_jobs(api_client)
    listed = api_client.get("/images", headers=user.headers).json()["items"]
    assert [i["id"] for i in listed] == [images[0]["id"]] and listed[0]["embedded"]
