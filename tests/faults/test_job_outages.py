"""Infrastructure errors are not job failures, and accepted photos never stay unembedded
(issue 28), with a real Celery worker, Redis and PostgreSQL.

- The database cuts a job's connection in the middle of a statement: the job goes back to
  `queued` and is retried (its `attempts` say so), never failed.
- A job failed anyway (as the incident of issue 28 left one: `internal_error`, its photos never
  embedded): the worker's reconciler gives the photos a new job, with no one asking.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import redis
from sqlalchemy import text

from app.db import make_engine
from tests.db_fixtures import temporary_pg_schema
from tests.faults.conftest import Stack, wait_until
from tests.faults.test_pool_process_lost import finished, job, upload

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(600)]


@pytest.fixture
def database_url() -> Iterator[str]:
    with temporary_pg_schema() as url:
        yield url


def test_a_connection_cut_mid_statement_is_retried_not_failed(
    stack: Stack, api: httpx.Client, database_url: str
) -> None:
    stack.start_worker()
    warm = upload(api, 0, 2)
    assert finished(api, warm)["state"] == "succeeded", stack.worker_log(0)
    engine = make_engine(database_url)
    try:
        with engine.connect() as lock:
            # Hold the user's row: the job's last UPDATE waits on it, and is cut there.
            lock.execute(text("SELECT id FROM users FOR NO KEY UPDATE"))
            job_id = upload(api, 10, 20)

            def waiting_backend() -> int | None:
                with engine.connect() as c:
                    return c.execute(text(
                        "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND query LIKE 'UPDATE users%'"
                    )).scalar()  # fmt: skip

            backend = wait_until(waiting_backend, 90, "the job never reached its UPDATE")
            with engine.connect() as c:  # what a server restart or a proxy does to one session
                c.execute(text("SELECT pg_terminate_backend(:p)"), {"p": backend})
            lock.rollback()
    finally:
        engine.dispose()
    done = finished(api, job_id)
    assert (done["state"], done["attempts"], done["error"]) == ("succeeded", 2, None), (
        stack.worker_log(0)[-5000:]
    )
    index = api.get("/index").json()
    assert (index["images"], index["embedded"]) == (22, 22)


def test_photos_whose_job_failed_get_a_new_one(
    stack: Stack, api: httpx.Client, database_url: str
) -> None:
    job_id = upload(api, 0, 12)  # no worker yet: it waits
    # The API publishes from a background thread: once its message is in the broker, the
    # incident (the job failed, its message consumed) can be staged; a message published after
    # the flush below would run the failed job again instead.
    broker = redis.Redis.from_url(stack.redis.url)
    wait_until(lambda: broker.llen("celery") >= 1, 60, "the job's message in the broker")
    engine = make_engine(database_url)
    try:
        with engine.begin() as c:  # failed, as the incident left it
            c.execute(text(
                "UPDATE jobs SET state = 'failed', error_code = 'internal_error', "
                "finished_at = now(), updated_at = now() - interval '1 hour' WHERE id = :j"
            ), {"j": job_id})  # fmt: skip
    finally:
        engine.dispose()
    assert job(api, job_id)["state"] == "failed"
    assert api.get("/index").json()["embedded"] == 0
    broker.flushall()  # its message was consumed when it failed

    stack.start_worker()  # its reconciler finds 12 photos that no job will embed
    wait_until(lambda: api.get("/index").json()["embedded"] == 12, 120,
               "the photos of the failed job were never embedded")  # fmt: skip
    listed = api.get("/jobs", params={"kind": "embed_images"}).json()["items"]
    assert [(j["state"], j["id"] == job_id) for j in listed] == [
        ("succeeded", False), ("failed", True),
    ]  # fmt: skip
    assert "embedding job(s) created for photos" in stack.worker_log(0)
