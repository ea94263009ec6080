"""A Celery pool process killed in the middle of a database statement, on PostgreSQL (issue 28).

A prefork worker (one pool process) embeds an upload; the test holds a lock that the job's
last statement waits for, kills the pool process while it waits, and lets go. The job is
resumed at once (the worker's main process reports the lost process; the heartbeat deadline is
set far beyond the test), and jobs of every kind then run in the replacement process, which
was forked from a main process whose reconciler holds pooled connections: none of them may
fail or need a retry (before issue 28 the first one died with `prepared statement "_pg3_0"
already exists`, and was marked failed).
"""

from __future__ import annotations

import io
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import text

from app.db import make_engine
from tests.db_fixtures import temporary_pg_schema
from tests.faults.conftest import Stack, finished, job, report_recovery, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(600)]


@pytest.fixture
def database_url() -> Iterator[str]:
    with temporary_pg_schema() as url:
        yield url


@pytest.fixture
def env_overrides(tmp_path: Path) -> dict[str, str]:
    photos = tmp_path / "photos"
    photos.mkdir()
    return {
        # Neither backstop can help within the test: only the worker's report of the lost
        # process resumes the job.
        "POLAR_JOBS__DEAD_AFTER_S": "3600",
        "POLAR_JOBS__RESEND_AFTER_S": "3600",
        # The main process's reconciler uses its pooled connections twice a second, so
        # psycopg has prepared its statements before the pool process is replaced.
        "POLAR_JOBS__RECONCILE_INTERVAL_S": "0.5",
        "POLAR_LIBRARY__ROOTS": f'["{photos}"]',
    }


def png(i: int, size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (i * 41 % 256, i * 89 % 256, i * 17 % 256)).save(buf, "PNG")
    return buf.getvalue()


def upload(api: httpx.Client, first: int, n: int) -> str:
    files = [("files", (f"img{i}.png", png(i), "image/png")) for i in range(first, first + n)]
    r = api.post("/images", files=files)
    assert r.status_code == 202, r.text
    job_id: str = r.json()["job"]["id"]
    return job_id


def run_every_kind(stack: Stack, api: httpx.Client, first: int) -> None:
    """One job of each kind, each succeeding at its first attempt."""
    photos = Path(stack.env["POLAR_LIBRARY__ROOTS"][2:-2])
    for i in range(3):
        (photos / f"lib{first + i}.png").write_bytes(png(first + 200 + i))
    embed = upload(api, first, 40)  # the same UPDATE 40 times: psycopg prepares it
    rebuild = api.post("/index/rebuild")
    assert rebuild.status_code in (200, 202), rebuild.text
    concept = api.post(
        "/concepts",
        data={"name": f"Fido{first}", "category": "hat"},
        files=[("files", (f"f{i}.png", png(first + 300 + i), "image/png")) for i in range(3)],
    )
    assert concept.status_code == 202, concept.text
    library = api.post("/libraries", json={"path": str(photos)})
    assert library.status_code in (200, 202), library.text
    ids = {
        "embed_images": embed,
        "rebuild_index": rebuild.json()["job"]["id"],
        "train_concept": concept.json()["job"]["id"],
        "scan_library": (library.json().get("job") or {}).get("id"),
    }
    outcomes = {kind: finished(api, j) for kind, j in ids.items() if j is not None}
    summary = {k: (o["state"], o["attempts"], o["error"]) for k, o in outcomes.items()}
    assert summary == dict.fromkeys(outcomes, ("succeeded", 1, None)), stack.worker_log(0)[-5000:]
    assert api.get(f"/concepts/{concept.json()['concept']['id']}").json()["state"] == "ready"


def test_a_pool_process_killed_mid_statement(
    stack: Stack, api: httpx.Client, database_url: str
) -> None:
    worker = stack.start_worker(pool="prefork")
    warm = upload(api, 0, 4)
    assert finished(api, warm)["state"] == "succeeded", stack.worker_log(0)
    (pool_process,) = stack.pool_processes(worker)

    engine = make_engine(database_url)
    try:
        with engine.connect() as lock:
            # The job's last statement publishes the new embeddings on the user's row: hold
            # that row (as an UPDATE would; inserts that refer to it may go on), so the pool
            # process is killed while its UPDATE waits.
            lock.execute(text("SELECT id FROM users FOR NO KEY UPDATE"))  # alice, the only one
            job_id = upload(api, 10, 40)

            def waiting_update() -> bool:
                with engine.connect() as c:
                    return bool(c.execute(text(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND query LIKE 'UPDATE users%'"
                    )).scalar_one())  # fmt: skip

            wait_until(waiting_update, 90, "the job never reached its UPDATE", every=0.05)
            os.kill(pool_process, signal.SIGKILL)
            killed = time.monotonic()
            lock.rollback()
    finally:
        engine.dispose()

    def resumed() -> dict[str, Any] | None:
        j = job(api, job_id)
        return j if j["attempts"] >= 2 and j["state"] != "queued" else None

    try:  # checked at the end: the jobs below must run in the new process either way
        wait_until(resumed, 60, "the job was not resumed after its pool process died")
        report_recovery("pool process killed mid-job -> job running again",
                        time.monotonic() - killed)  # fmt: skip
        was_resumed = True
    except AssertionError:
        was_resumed = False
    replacement = stack.pool_processes(worker)
    assert replacement and pool_process not in replacement

    # Every kind of job, in the replacement process: none fails, none needs a retry.
    run_every_kind(stack, api, first=100)
    assert stack.pool_processes(worker) == replacement  # no other process was lost
    log = stack.worker_log(0)
    assert "already exists" not in log and "internal_error" not in log, log[-5000:]
    assert was_resumed, "the job was not resumed within 60 s of its pool process dying"
    done = finished(api, job_id)
    assert (done["state"], done["attempts"]) == ("succeeded", 2), log[-5000:]

    def all_embedded() -> bool:
        index = api.get("/index").json()
        return bool(index["images"] >= 4 + 40 + 40 and index["embedded"] == index["images"])

    wait_until(all_embedded, 120, "not every photo was embedded")


def test_a_pool_process_replaced_before_the_main_process_prepared_its_statements(
    stack: Stack, api: httpx.Client
) -> None:
    """The issue's trace: the main process's reconciler had opened a connection but not yet
    prepared its statements when the pool process was replaced; the new process's UPDATE of
    images then took the name the main process gave its own statement on the same connection."""
    stack.env["POLAR_JOBS__RECONCILE_INTERVAL_S"] = "1"  # prepared after 5 passes: ~5 s
    worker = stack.start_worker(pool="prefork")
    wait_until(lambda: "ready." in stack.worker_log(0), 120, "the worker never got ready")
    (first,) = wait_until(lambda: stack.pool_processes(worker), 30, "no pool process")
    time.sleep(1.5)  # one reconciler pass: the main process holds a pooled connection
    os.kill(first, signal.SIGKILL)
    replacement = wait_until(
        lambda: [p for p in stack.pool_processes(worker) if p != first], 30, "not replaced"
    )
    run_every_kind(stack, api, first=0)
    assert stack.pool_processes(worker) == replacement  # no other process was lost
    log = stack.worker_log(0)
    assert "already exists" not in log and "reconciler pass failed" not in log, log[-5000:]
