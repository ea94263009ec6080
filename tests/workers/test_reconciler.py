"""The database as the queue of record (app/reconciler.py) and the atomic claim in run_job."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from app.config import Settings
from app.db import session_scope
from app.models import Job, JobKind, utcnow
from app.reconciler import ReconcilePolicy, reconcile_once
from app.runner import JobRunner
from app.services import jobs
from app.services.jobs import JobContext, JobEnvironment, SessionFactory
from app.storage import ImageStore
from tests.fakes import RecordingQueue

KIND = JobKind.REBUILD_INDEX.value
POLICY = ReconcilePolicy(dead_after_s=120, resend_after_s=300, interval_s=0.05)


def new_job(
    factory: SessionFactory, user_id: str, *, state: str = "queued", age_s: float = 0
) -> str:
    with session_scope(factory) as s:
        job_id = jobs.create_job(db_session=s, user_id=user_id, kind=KIND, payload={}).id
    with session_scope(factory) as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(state=state, updated_at=utcnow() - timedelta(seconds=age_s))
        )
    return job_id


def state(factory: SessionFactory, job_id: str) -> str:
    with factory() as s:
        return s.get_one(Job, job_id).state


def env_with(
    tmp_path: Path, factory: SessionFactory, handlers: dict[str, jobs.JobHandler]
) -> JobEnvironment:
    settings = Settings(data_dir=tmp_path / "data", broker_url="")
    return JobEnvironment(settings, factory, ImageStore(settings.data_dir), handlers, lambda: None)  # type: ignore[arg-type,return-value]


def test_lost_jobs_are_sent_again_and_the_rest_left_alone(
    factory: SessionFactory, user_id: str
) -> None:
    waiting = new_job(factory, user_id, age_s=600)  # its message never reached a broker
    fresh = new_job(factory, user_id, age_s=5)  # just enqueued: not lost
    dead = new_job(factory, user_id, state="running", age_s=600)  # worker stopped heartbeating
    alive = new_job(factory, user_id, state="running", age_s=5)
    done = new_job(factory, user_id, state="succeeded", age_s=600)
    queue = RecordingQueue()

    report = reconcile_once(factory, queue, POLICY)

    assert (report.revived, report.resent, report.failed) == ([dead], [waiting], [])
    assert queue.job_ids == [dead, waiting]
    assert [state(factory, j) for j in (waiting, fresh, dead, alive, done)] == [
        "queued", "queued", "queued", "running", "succeeded",
    ]  # fmt: skip
    # Touched when re-sent: the next pass does not send them again.
    again = reconcile_once(factory, queue, POLICY)
    assert (again.revived, again.resent) == ([], []) and len(queue.job_ids) == 2


def test_a_refusing_queue_leaves_jobs_queued_for_the_next_pass(
    factory: SessionFactory, user_id: str
) -> None:
    waiting = new_job(factory, user_id, age_s=600)
    report = reconcile_once(factory, RecordingQueue(fail=True), POLICY)
    assert report.failed == [waiting] and report.resent == []
    assert state(factory, waiting) == "queued"
    skipped = reconcile_once(
        factory, RecordingQueue(), ReconcilePolicy(resend_after_s=0.0), skip=lambda _j: True
    )
    assert skipped.resent == []  # the embedded runner already holds it


def test_two_deliveries_never_run_one_job_at_once(
    factory: SessionFactory, user_id: str, tmp_path: Path
) -> None:
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def slow(ctx: JobContext) -> None:
        calls.append(ctx.job_id)
        started.set()
        assert release.wait(20)

    env = env_with(tmp_path, factory, {KIND: slow})
    job_id = new_job(factory, user_id)
    first = threading.Thread(target=jobs.run_job, args=(job_id, env))
    first.start()
    assert started.wait(20)
    jobs.run_job(job_id, env)  # a duplicate message while the first runs: does nothing
    release.set()
    first.join(20)
    jobs.run_job(job_id, env)  # and once it succeeded, nothing either
    assert calls == [job_id]
    with factory() as s:
        job = s.get_one(Job, job_id)
        assert (job.state, job.attempts) == ("succeeded", 1)


def test_running_jobs_heartbeat(
    factory: SessionFactory, user_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs, "HEARTBEAT_INTERVAL_S", 0.05)
    beats: list[Any] = []

    def quiet(ctx: JobContext) -> None:  # reports no progress for a while
        with ctx.session_factory() as s:
            first = s.get_one(Job, ctx.job_id).updated_at
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.05)
            with ctx.session_factory() as s:
                now = s.get_one(Job, ctx.job_id).updated_at
            if now > first:
                beats.append(now)
                return

    job_id = new_job(factory, user_id)
    jobs.run_job(job_id, env_with(tmp_path, factory, {KIND: quiet}))
    assert beats, "the row of a running job was never touched"


def test_the_embedded_runner_finds_jobs_it_was_never_given(
    factory: SessionFactory, user_id: str, tmp_path: Path
) -> None:
    ran = threading.Event()
    env = env_with(tmp_path, factory, {KIND: lambda _ctx: ran.set()})
    runner = JobRunner(env, reconcile=ReconcilePolicy(resend_after_s=0.2, interval_s=0.05))
    assert runner.start() == []
    try:
        job_id = new_job(factory, user_id)  # committed, but its enqueue never happened
        assert ran.wait(20)
        deadline = time.monotonic() + 20
        while state(factory, job_id) != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        runner.stop()
