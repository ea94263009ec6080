"""/jobs through HTTP on SQLite and PostgreSQL: one job, the newest-first listing, filters, 404s."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.db import session_scope
from app.models import Job, JobKind, utcnow
from app.services import job_runs, jobs
from tests.db_fixtures import ApiUser

UNKNOWN = "00000000-0000-4000-8000-000000000000"


def add_job(
    client: TestClient, user: ApiUser, kind: JobKind, payload: dict[str, Any], age_s: float = 0
) -> str:
    """A queued job created straight in the database (nothing dispatches it)."""
    app: Any = client.app
    with session_scope(app.state.container.session_factory) as s:
        job = jobs.create_job(db_session=s, user_id=user.id, kind=kind, payload=payload)
        # Distinct, known creation times: the listing's order is tested, not the clock's.
        job.created_at = utcnow() - timedelta(seconds=age_s)
        return job.id


def set_state(client: TestClient, job_id: str, **values: Any) -> None:
    app: Any = client.app
    with session_scope(app.state.container.session_factory) as s:
        s.execute(update(Job).where(Job.id == job_id).values(**values))


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    return body["error"]


def test_get_job_shows_state_progress_and_links(api_client, make_user):
    user = make_user(api_client)
    concept_id = "2d0f3c4e-1a9b-4c7d-8e6f-5a4b3c2d1e0f"
    job_id = add_job(
        api_client, user, JobKind.TRAIN_CONCEPT, {"concept_id": concept_id, "version": 2}
    )
    r = api_client.get(f"/jobs/{job_id}", headers=user.headers)
    assert r.status_code == 200, r.text
    job = r.json()
    assert (job["id"], job["kind"], job["state"], job["progress"]) == (
        job_id,
        "train_concept",
        "queued",
        0.0,
    )
    assert job["error"] is None and job["attempts"] == 0
    assert job["started_at"] is None and job["finished_at"] is None
    assert job["links"] == {"concept": f"/concepts/{concept_id}", "images": None}

    job_runs.mark_running(job_id, session_factory=api_client.app.state.container.session_factory)
    job_runs.set_progress(
        job_id, 0.25, session_factory=api_client.app.state.container.session_factory
    )
    job = api_client.get(f"/jobs/{job_id}", headers=user.headers).json()
    assert (job["state"], job["progress"], job["attempts"]) == ("running", 0.25, 1)
    assert job["started_at"] is not None


def test_failed_job_shows_its_error_code_and_message(api_client, make_user):
    user = make_user(api_client)
    job_id = add_job(api_client, user, JobKind.EMBED_IMAGES, {"image_ids": ["a", "b"]})
    job_runs.mark_failed(
        job_id,
        "file_missing",
        "a photo is gone",
        session_factory=api_client.app.state.container.session_factory,
    )
    job = api_client.get(f"/jobs/{job_id}", headers=user.headers).json()
    assert job["state"] == "failed" and job["finished_at"] is not None
    assert job["error"] == {"code": "file_missing", "message": "a photo is gone"}
    assert job["links"] == {"concept": None, "images": ["/images/a", "/images/b"]}


def test_foreign_and_unknown_jobs_are_the_same_404(api_client, make_user):
    alice, bob = make_user(api_client, "alice"), make_user(api_client, "bob")
    bobs = add_job(api_client, bob, JobKind.REBUILD_INDEX, {})
    foreign = assert_error(api_client.get(f"/jobs/{bobs}", headers=alice.headers), 404, "not_found")
    unknown = assert_error(
        api_client.get(f"/jobs/{UNKNOWN}", headers=alice.headers), 404, "not_found"
    )
    assert foreign == unknown == {"code": "not_found", "message": "job not found"}
    assert api_client.get(f"/jobs/{bobs}", headers=bob.headers).status_code == 200
    assert_error(api_client.get(f"/jobs/{bobs}"), 401, "unauthorized")


def test_list_is_newest_first_paginated_and_per_user(api_client, make_user):
    alice, bob = make_user(api_client, "alice"), make_user(api_client, "bob")
    ids = [add_job(api_client, alice, JobKind.REBUILD_INDEX, {}, age_s=100 - i) for i in range(5)]
    add_job(api_client, bob, JobKind.REBUILD_INDEX, {})
    seen, cursor, pages = [], None, 0
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        r = api_client.get("/jobs", params=params, headers=alice.headers)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["items"]) <= 2
        seen += [j["id"] for j in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1] and pages == 3
    everything = api_client.get("/jobs", headers=alice.headers).json()
    assert [j["id"] for j in everything["items"]] == ids[::-1]
    assert everything["next_cursor"] is None


def test_same_second_jobs_are_ordered_by_id(api_client, make_user):
    user = make_user(api_client)
    ids = [add_job(api_client, user, JobKind.REBUILD_INDEX, {}) for _ in range(3)]
    stamp = utcnow()
    for job_id in ids:
        set_state(api_client, job_id, created_at=stamp)
    pages = [api_client.get("/jobs", params={"limit": 1}, headers=user.headers).json()]
    while pages[-1]["next_cursor"]:
        params = {"limit": 1, "cursor": pages[-1]["next_cursor"]}
        pages.append(api_client.get("/jobs", params=params, headers=user.headers).json())
    assert [p["items"][0]["id"] for p in pages] == sorted(ids, reverse=True)


def test_list_filters_by_state_and_kind(api_client, make_user):
    user = make_user(api_client)
    failed = add_job(api_client, user, JobKind.EMBED_IMAGES, {"image_ids": []}, age_s=3)
    training = add_job(api_client, user, JobKind.TRAIN_CONCEPT, {"concept_id": UNKNOWN}, age_s=2)
    queued = add_job(api_client, user, JobKind.EMBED_IMAGES, {"image_ids": []}, age_s=1)
    factory = api_client.app.state.container.session_factory
    job_runs.mark_failed(failed, "x", "y", session_factory=factory)

    def listed(**params: str) -> list[str]:
        r = api_client.get("/jobs", params=params, headers=user.headers)
        assert r.status_code == 200, r.text
        return [j["id"] for j in r.json()["items"]]

    assert listed(state="failed") == [failed]
    assert listed(state="queued") == [queued, training]
    assert listed(state="succeeded") == []
    assert listed(kind="train_concept") == [training]
    assert listed(kind="embed_images", state="queued") == [queued]


@pytest.mark.parametrize(
    "params",
    [{"state": "done"}, {"kind": "bake"}, {"limit": 0}, {"limit": 201}, {"cursor": "%%%"}],
)
def test_bad_list_parameters_are_422(api_client, make_user, params):
    user = make_user(api_client)
    r = api_client.get("/jobs", params=params, headers=user.headers)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] in ("validation_failed", "invalid_cursor")
