"""Job services (app/services/jobs.py, app/services/job_runs.py) and the embedded runner
(app/runtime/runner.py) on a real database."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event
from sqlalchemy.exc import OperationalError

from app.config import Settings
from app.db import session_scope
from app.errors import NotFound, ValidationFailed
from app.main import create_app
from app.models import Job, JobKind
from app.runtime.container import build
from app.runtime.runner import JobRunner
from app.services import job_runs, jobs, users
from app.services.job_runs import JobContext, JobEnvironment, ProgressThrottle, SessionFactory
from app.storage import ImageStore
from workers.queue import RUN_JOB_TASK, CeleryQueue

KIND = JobKind.REBUILD_INDEX.value


@pytest.fixture
def handlers() -> dict[str, job_runs.JobHandler]:
    """The test's own handler table (tests fill it; environments hold it by reference)."""
    return {}


def no_model() -> Any:
    raise AssertionError("these jobs need no model")


def job_env(
    settings: Settings, factory: SessionFactory, handlers: dict[str, job_runs.JobHandler]
) -> JobEnvironment:
    return JobEnvironment(settings, factory, ImageStore(settings.data_dir), handlers, no_model)


@pytest.fixture
def env(
    settings: Settings, factory: SessionFactory, handlers: dict[str, job_runs.JobHandler]
) -> JobEnvironment:
    return job_env(settings, factory, handlers)


def new_job(factory: SessionFactory, user_id: str, payload: dict[str, Any] | None = None) -> str:
    with session_scope(factory) as s:
        return jobs.create_job(db_session=s, user_id=user_id, kind=KIND, payload=payload or {}).id


def load(factory: SessionFactory, job_id: str) -> Job:
    with factory() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def wait_for(factory: SessionFactory, job_id: str, states: set[str], timeout: float = 20) -> Job:
    deadline = time.monotonic() + timeout
    while True:
        job = load(factory, job_id)
        if job.state in states:
            return job
        assert time.monotonic() < deadline, f"job stuck in {job.state}"
        time.sleep(0.02)


# --- the service ----------------------------------------------------------------------------


def test_create_and_get_job_scoped_by_user(factory: SessionFactory, user_id: str) -> None:
    job_id = new_job(factory, user_id, {"image_ids": ["a"]})
    with session_scope(factory) as s:
        other = users.create_user("bob", db_session=s).id
    with factory() as s:
        job = jobs.get_job(db_session=s, user_id=user_id, job_id=job_id)
        assert (job.state, job.progress, job.kind, job.payload) == (
            "queued",
            0.0,
            KIND,
            {"image_ids": ["a"]},
        )
        with pytest.raises(NotFound):
            jobs.get_job(db_session=s, user_id=other, job_id=job_id)
        with pytest.raises(NotFound):
            jobs.get_job(db_session=s, user_id=user_id, job_id="no-such-job")
        with pytest.raises(ValueError):
            jobs.create_job(db_session=s, user_id=user_id, kind="make_coffee", payload={})


def test_run_job_succeeds_with_progress_and_context(
    factory: SessionFactory,
    user_id: str,
    handlers: dict[str, Any],
    settings: Settings,
    env: JobEnvironment,
) -> None:
    seen: dict[str, Any] = {}

    def handler(ctx: JobContext) -> None:
        ctx.progress(0.25)
        row = load(ctx.session_factory, ctx.job_id)  # another session sees it mid-run
        seen.update(state=row.state, progress=row.progress, payload=ctx.payload, user=ctx.user_id)
        assert ctx.settings is settings

    handlers[KIND] = handler
    job_id = new_job(factory, user_id, {"n": 3})
    job_runs.run_job(job_id, env)
    assert seen == {"state": "running", "progress": 0.25, "payload": {"n": 3}, "user": user_id}
    job = load(factory, job_id)
    assert (job.state, job.progress, job.attempts, job.error_code) == ("succeeded", 1.0, 1, None)
    assert job.started_at is not None and job.finished_at is not None
    assert job.finished_at >= job.started_at


def test_run_job_is_idempotent_once_succeeded(
    factory: SessionFactory,
    user_id: str,
    handlers: dict[str, Any],
    env: JobEnvironment,
) -> None:
    calls: list[str] = []
    handlers[KIND] = lambda ctx: calls.append(ctx.job_id)
    job_id = new_job(factory, user_id)
    job_runs.run_job(job_id, env)
    job_runs.run_job(job_id, env)  # a redelivered task
    assert calls == [job_id]
    assert load(factory, job_id).attempts == 1


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (ValidationFailed("too few photos", code="too_few"), "too_few", "too few photos"),
        # The client reads a message written for it; the exception is only in the log.
        (KeyError("boom"), job_runs.INTERNAL_ERROR, job_runs.INTERNAL_ERROR_MESSAGE),
    ],
)
def test_run_job_records_failures(
    factory: SessionFactory,
    user_id: str,
    handlers: dict[str, Any],
    env: JobEnvironment,
    error: Exception,
    code: str,
    message: str,
) -> None:
    def handler(_ctx: JobContext) -> None:
        raise error

    handlers[KIND] = handler
    job_id = new_job(factory, user_id)
    job_runs.run_job(job_id, env)
    job = load(factory, job_id)
    assert (job.state, job.error_code, job.error_message) == ("failed", code, message)
    assert job.finished_at is not None


def test_run_job_without_handler_fails_the_job(
    factory: SessionFactory, user_id: str, env: JobEnvironment
) -> None:
    job_id = new_job(factory, user_id)
    job_runs.run_job(job_id, env)
    job = load(factory, job_id)
    assert (job.state, job.error_code) == ("failed", job_runs.NO_HANDLER)


@pytest.mark.parametrize(
    "error", [OperationalError("SELECT 1", {}, Exception("db gone")), ConnectionError("reset")]
)
def test_run_job_reraises_transient_errors_and_requeues(
    factory: SessionFactory,
    user_id: str,
    handlers: dict[str, Any],
    env: JobEnvironment,
    error: Exception,
) -> None:
    def handler(_ctx: JobContext) -> None:
        raise error

    handlers[KIND] = handler
    job_id = new_job(factory, user_id)
    with pytest.raises(type(error)):
        job_runs.run_job(job_id, env)
    job = load(factory, job_id)
    assert (job.state, job.attempts, job.error_code) == ("queued", 1, None)


def test_progress_is_throttled_monotonic_and_clamped(
    factory: SessionFactory, engine: Engine, user_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = new_job(factory, user_id)
    job_runs.mark_running(job_id, session_factory=factory)
    updates: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE JOBS"):
            updates.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        throttle = ProgressThrottle(job_id, factory)
        written = [throttle(i / 500) for i in range(1, 501)]
        assert written[0] and sum(written) <= 2  # 500 steps in well under a second
        assert len(updates) == sum(written)
        monkeypatch.setattr(job_runs, "PROGRESS_MIN_INTERVAL_S", 0.0)
        assert not throttle(0.0001)  # never backwards
        assert throttle(7.0)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert load(factory, job_id).progress == 1.0


def test_progress_is_not_written_to_finished_jobs(factory: SessionFactory, user_id: str) -> None:
    job_id = new_job(factory, user_id)
    job_runs.mark_failed(job_id, "x", "y", session_factory=factory)
    job_runs.set_progress(job_id, 0.5, session_factory=factory)
    assert load(factory, job_id).progress == 0.0


def test_the_composition_root_picks_the_queue(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    embedded_root = build(Settings(data_dir=tmp_path, broker_url=""))
    queue = embedded_root.queue
    assert isinstance(queue, JobRunner) and not queue.running  # container.start() starts it
    assert embedded_root.runner is queue
    # The embedded process watches (reconciler, library monitor), through its own runner.
    assert embedded_root.watchers is not None
    assert embedded_root.watchers.reconciler.queue is queue
    with pytest.raises(RuntimeError):
        queue.enqueue("j1")  # not started: the job stays queued in the database
    assert set(embedded_root.jobs.handlers) == {k.value for k in JobKind}
    embedded_root.engine.dispose()

    brokered = build(Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/9"))
    celery_queue = brokered.queue
    assert isinstance(celery_queue, CeleryQueue)
    assert brokered.runner is None and brokered.watchers is None  # the Celery worker watches
    sent: list[tuple[str, Any]] = []
    monkeypatch.setattr(
        celery_queue.celery,
        "send_task",
        lambda name, args, retry: sent.append((name, args, retry)),
    )
    celery_queue.enqueue("j2")  # returns at once: a background thread publishes
    assert celery_queue.join(10)
    assert sent == [(RUN_JOB_TASK, ["j2"], False)]  # no Celery retries: bounded, then reconciled
    brokered.engine.dispose()


def test_enqueue_committed_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    class Down:
        def enqueue(self, _job_id: str) -> None:
            raise ConnectionError("broker down")

    job = Job(id="j3", user_id="u", kind=KIND, state="queued", payload={})
    jobs.enqueue_committed(Down(), job)  # logged: the job stays queued in the database
    jobs.enqueue_committed(Down(), None)  # nothing to hand over
    assert "j3" in caplog.text and "stays queued" in caplog.text


# --- the embedded runner --------------------------------------------------------------------


def embedded(db_url: str, tmp_path: Any) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=db_url, broker_url="")


def test_runner_runs_enqueued_jobs_and_records_outcomes(
    factory: SessionFactory, user_id: str, handlers: dict[str, Any], db_url: str, tmp_path: Any
) -> None:
    progress_seen: list[float] = []

    def handler(ctx: JobContext) -> None:
        if ctx.payload.get("fail"):
            raise ValidationFailed("no such images", code="no_images")
        ctx.progress(0.5)
        progress_seen.append(load(ctx.session_factory, ctx.job_id).progress)
        assert threading.current_thread().name.startswith("polar-job")

    handlers[KIND] = handler
    runner = JobRunner(job_env(embedded(db_url, tmp_path), factory, handlers))
    runner.start()
    try:
        ok, bad = new_job(factory, user_id), new_job(factory, user_id, {"fail": True})
        runner.enqueue(ok)  # the JobQueue protocol, as the services call it
        runner.enqueue(bad)
        good_job = wait_for(factory, ok, {"succeeded", "failed"})
        bad_job = wait_for(factory, bad, {"succeeded", "failed"})
    finally:
        runner.stop()
    assert (good_job.state, good_job.progress) == ("succeeded", 1.0)
    assert progress_seen == [0.5]
    assert (bad_job.state, bad_job.error_code) == ("failed", "no_images")


def test_runner_requeues_jobs_left_by_a_crash(
    factory: SessionFactory, user_id: str, handlers: dict[str, Any], db_url: str, tmp_path: Any
) -> None:
    ran: list[str] = []
    handlers[KIND] = lambda ctx: ran.append(ctx.job_id)
    queued, running, done = (new_job(factory, user_id) for _ in range(3))
    job_runs.mark_running(running, session_factory=factory)  # the process died mid-job
    job_runs.mark_succeeded(done, session_factory=factory)
    runner = JobRunner(job_env(embedded(db_url, tmp_path), factory, handlers))
    try:
        assert sorted(runner.start()) == sorted([queued, running])
        for job_id in (queued, running):
            assert wait_for(factory, job_id, {"succeeded"}).state == "succeeded"
    finally:
        runner.stop()
    assert sorted(ran) == sorted([queued, running])
    assert load(factory, running).attempts == 2
    assert load(factory, done).attempts == 0  # untouched


def test_runner_retries_transient_errors_then_gives_up(
    factory: SessionFactory, user_id: str, handlers: dict[str, Any], db_url: str, tmp_path: Any
) -> None:
    failures = {"flaky": 2, "dead": 99}

    def handler(ctx: JobContext) -> None:
        name = ctx.payload["name"]
        if failures[name] > 0:
            failures[name] -= 1
            raise ConnectionError(f"{name}: connection reset")

    handlers[KIND] = handler
    runner = JobRunner(
        job_env(embedded(db_url, tmp_path), factory, handlers), retry_delays=(0.01, 0.01, 0.01)
    )
    runner.start()
    try:
        flaky = new_job(factory, user_id, {"name": "flaky"})
        dead = new_job(factory, user_id, {"name": "dead"})
        runner.submit(flaky).result(timeout=20)
        runner.submit(dead).result(timeout=20)
    finally:
        runner.stop()
    job = load(factory, flaky)
    assert (job.state, job.attempts) == ("succeeded", 3)
    job = load(factory, dead)
    assert (job.state, job.attempts, job.error_code) == ("failed", 4, job_runs.RETRIES_EXHAUSTED)
    assert job.error_message == job_runs.RETRIES_EXHAUSTED_MESSAGE


def test_runner_stop_interrupts_and_the_next_start_finishes(
    factory: SessionFactory, user_id: str, handlers: dict[str, Any], db_url: str, tmp_path: Any
) -> None:
    started = threading.Event()

    def endless(ctx: JobContext) -> None:
        started.set()
        while True:  # a long job reporting progress
            ctx.progress(0.1)
            time.sleep(0.01)

    handlers[KIND] = endless
    runner = JobRunner(job_env(embedded(db_url, tmp_path), factory, handlers))
    runner.start()
    job_id = new_job(factory, user_id)
    waiting = new_job(factory, user_id)
    runner.submit(job_id)
    runner.submit(waiting)  # never started: cancelled by stop
    assert started.wait(20)
    t0 = time.monotonic()
    runner.stop(timeout=10)
    assert time.monotonic() - t0 < 5 and not runner.running
    assert load(factory, job_id).state == "queued"
    assert load(factory, waiting).state == "queued"
    with pytest.raises(RuntimeError):
        runner.submit(job_id)

    handlers[KIND] = lambda _ctx: None
    again = JobRunner(job_env(embedded(db_url, tmp_path), factory, handlers))
    try:
        assert set(again.start()) == {job_id, waiting}
        wait_for(factory, job_id, {"succeeded"})
        wait_for(factory, waiting, {"succeeded"})
    finally:
        again.stop()


def test_runner_pool_is_bounded(
    factory: SessionFactory, handlers: dict[str, Any], db_url: str, tmp_path: Any
) -> None:
    with pytest.raises(AssertionError):
        JobRunner(job_env(embedded(db_url, tmp_path), factory, handlers), max_workers=8)


def test_app_lifespan_runs_jobs_in_process(db_settings: Settings, handlers: dict[str, Any]) -> None:
    done = threading.Event()
    handlers[KIND] = lambda _ctx: done.set()
    with TestClient(create_app(db_settings, handlers=handlers)) as client:
        app: Any = client.app
        runner = app.state.container.queue
        assert isinstance(runner, JobRunner) and runner.running
        factory = app.state.container.session_factory
        with session_scope(factory) as s:
            uid = users.create_user("carol", db_session=s).id
        job_id = new_job(factory, uid)
        runner.enqueue(job_id)
        assert wait_for(factory, job_id, {"succeeded"}).state == "succeeded"
    assert done.is_set() and not runner.running


# --- priorities: jobs yield the CPU to requests ----------------------------------------------


def _nice_of_this_thread() -> int:
    import os

    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_job_threads_run_niced_and_request_threads_do_not(
    settings: Settings, factory: SessionFactory, user_id: str, handlers: dict[str, Any]
) -> None:
    seen: list[int] = []
    handlers[KIND] = lambda _ctx: seen.append(_nice_of_this_thread())
    base = _nice_of_this_thread()
    niced = settings.model_copy(update={"jobs": settings.jobs.model_copy(update={"nice": 7})})
    runner = JobRunner(job_env(niced, factory, handlers))
    runner.start()
    try:
        job_id = new_job(factory, user_id)
        runner.enqueue(job_id)
        wait_for(factory, job_id, {"succeeded"})
    finally:
        runner.stop()
    assert seen == [min(19, base + 7)]
    assert _nice_of_this_thread() == base  # the caller's (a request thread's) priority is kept


def test_a_worker_process_lowers_itself_once_and_zero_means_unchanged() -> None:
    import subprocess

    code = (
        "import os; from app.runtime.priority import lower_this_process as low; "
        "b = os.nice(0); n = low(4); z = low(0); print(b, n, z, os.nice(0))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    base = int(out[0])
    assert out[1:] == [str(min(19, base + 4)), "None", str(min(19, base + 4))]


def _alive(name: str) -> bool:
    return any(t.name == name and t.is_alive() for t in threading.enumerate())


def test_the_container_starts_and_stops_what_it_owns(db_url: str, tmp_path: Any) -> None:
    """One container per process builds every long-lived object once: start() loads the model,
    starts the runner, then the watchers that feed it; stop() ends them all."""
    settings = embedded(db_url, tmp_path)
    settings = settings.model_copy(
        update={"model": settings.model.model_copy(update={"preload": False})}
    )
    container = build(settings)
    runner, watchers = container.runner, container.watchers
    assert runner is not None and watchers is not None
    assert watchers.reconciler.queue is runner and watchers.monitor.queue is runner
    assert not runner.running and not _alive("polar-reconciler")
    container.start()
    try:
        assert runner.running and _alive("polar-reconciler")
    finally:
        container.stop()
    assert not runner.running
    deadline = time.monotonic() + 10
    while _alive("polar-reconciler"):
        assert time.monotonic() < deadline, "the reconciler outlived its container"
        time.sleep(0.02)


def test_the_apps_state_holds_only_the_container(db_settings: Settings) -> None:
    with TestClient(create_app(db_settings)) as client:
        app: Any = client.app
        assert set(vars(app.state)["_state"]) == {"container"}
