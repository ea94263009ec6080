"""The database as the queue of record (app/runtime/reconciler.py) and the atomic claim in
run_job."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from app.config import Settings
from app.db import session_scope
from app.models import Image, Job, JobKind, utcnow
from app.runtime.container import Watchers
from app.runtime.reconciler import ReconcilePolicy, reconcile_once
from app.runtime.runner import JobRunner
from app.services import job_runs, jobs, users
from app.services.job_runs import JobContext, JobEnvironment, SessionFactory
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
    tmp_path: Path, factory: SessionFactory, handlers: dict[str, job_runs.JobHandler]
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
    first = threading.Thread(target=job_runs.run_job, args=(job_id, env))
    first.start()
    assert started.wait(20)
    job_runs.run_job(job_id, env)  # a duplicate message while the first runs: does nothing
    release.set()
    first.join(20)
    job_runs.run_job(job_id, env)  # and once it succeeded, nothing either
    assert calls == [job_id]
    with factory() as s:
        job = s.get_one(Job, job_id)
        assert (job.state, job.attempts) == ("succeeded", 1)


def test_running_jobs_heartbeat(
    factory: SessionFactory, user_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(job_runs, "HEARTBEAT_INTERVAL_S", 0.05)
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
    job_runs.run_job(job_id, env_with(tmp_path, factory, {KIND: quiet}))
    assert beats, "the row of a running job was never touched"


def test_the_embedded_runner_finds_jobs_it_was_never_given(
    factory: SessionFactory, user_id: str, tmp_path: Path
) -> None:
    ran = threading.Event()
    env = env_with(tmp_path, factory, {KIND: lambda _ctx: ran.set()})
    runner = JobRunner(env)
    # Wired as the container wires an embedded process (app/runtime/container.py).
    watchers = Watchers(
        factory,
        runner,
        env.settings,
        skip=runner.is_pending,
        policy=ReconcilePolicy(resend_after_s=0.2, interval_s=0.05),
    )
    assert runner.start() == []
    watchers.start()
    try:
        job_id = new_job(factory, user_id)  # committed, but its enqueue never happened
        assert ran.wait(20)
        deadline = time.monotonic() + 20
        while state(factory, job_id) != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        watchers.stop()
        runner.stop()


def add_images(factory: SessionFactory, user_id: str, n: int, **values: Any) -> list[str]:
    """`n` image rows of the user (no file: the reconciler reads none)."""
    ids = []
    with session_scope(factory) as s:
        for _ in range(n):
            image = Image(
                user_id=user_id,
                sha256=uuid.uuid4().hex * 2,
                mime="image/png",
                size_bytes=1,
                width=1,
                height=1,
                storage_path=f"originals/{uuid.uuid4().hex}.png",
                **values,
            )
            s.add(image)
            s.flush()
            ids.append(image.id)
    return ids


def test_pending_images_that_no_job_claims_get_an_embedding_job(
    factory: SessionFactory, user_id: str
) -> None:
    """A job that failed (or vanished) left accepted photos unembedded: the reconciler gives
    them a new embed_images job; photos some job will embed, or that failed to read, it leaves."""
    pending = add_images(factory, user_id, 3)
    add_images(factory, user_id, 1, embed_error="the file is gone")  # failed: not retried
    add_images(factory, user_id, 1, embedding=b"\0" * 8, embedding_model="m")  # embedded
    with session_scope(factory) as s:
        bob = users.create_user("bob", db_session=s).id
    add_images(factory, bob, 2)
    claimed = new_job(factory, bob, age_s=600)  # bob's photos wait for a queued rebuild
    crashed = new_job(factory, user_id, state="failed", age_s=600)  # alice's job failed long ago
    queue = RecordingQueue()

    report = reconcile_once(factory, queue, POLICY)

    assert len(report.embedding) == 1 and report.resent == [claimed]
    job_id = report.embedding[0]
    assert queue.job_ids == [claimed, job_id]
    with factory() as s:
        job = s.get_one(Job, job_id)
        assert (job.user_id, job.kind, job.state) == (user_id, "embed_images", "queued")
        assert sorted(job.payload["image_ids"]) == sorted(pending)
        assert s.get_one(Job, crashed).state == "failed"  # the failed job is left as it was
    # Claimed now: the next pass creates no other.
    assert reconcile_once(factory, queue, POLICY).embedding == []


def test_a_job_that_just_ended_is_not_replaced_at_once(
    factory: SessionFactory, user_id: str
) -> None:
    add_images(factory, user_id, 2)
    failed = new_job(factory, user_id, state="failed", age_s=5)  # failed 5 s ago
    with session_scope(factory) as s:
        s.execute(
            update(Job)
            .where(Job.id == failed)
            .values(kind=JobKind.EMBED_IMAGES.value, updated_at=utcnow() - timedelta(seconds=5))
        )
    assert reconcile_once(factory, RecordingQueue(), POLICY).embedding == []
    # Once the quiet period is over it is.
    later = ReconcilePolicy(dead_after_s=120, resend_after_s=1, interval_s=0.05)
    assert len(reconcile_once(factory, RecordingQueue(), later).embedding) == 1


def test_refused_resends_are_tried_again_at_the_next_pass(
    factory: SessionFactory, user_id: str
) -> None:
    """The broker was away when a lost job was re-sent: the next pass sends it again, not only
    after another `resend_after_s`."""
    waiting = new_job(factory, user_id, age_s=600)
    refused = reconcile_once(factory, RecordingQueue(fail=True), POLICY)
    assert refused.failed == [waiting]
    queue = RecordingQueue()
    again = reconcile_once(factory, queue, POLICY, unsent=refused.failed)
    assert queue.job_ids == [waiting] and again.resent == [waiting]
    # A job that left 'queued' meanwhile is not sent again.
    with session_scope(factory) as s:
        s.execute(update(Job).where(Job.id == waiting).values(state="succeeded"))
    queue = RecordingQueue()
    reconcile_once(factory, queue, POLICY, unsent=[waiting])
    assert queue.job_ids == []
