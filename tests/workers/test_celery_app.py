"""The Celery app and task; one test runs a real `celery worker` against the real Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from app.config import Settings
from app.db import make_engine, make_session_factory, migrate, session_scope
from app.errors import ValidationFailed
from app.models import Job, JobKind
from app.services import job_runs, jobs, users
from app.services.job_runs import JobContext
from workers import celery_app as celery_module
from workers.celery_app import create_celery
from workers.tasks import MAX_RETRIES, run_job_task

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("POLAR_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")


def test_celery_config_comes_from_settings(tmp_path: Path) -> None:
    app = create_celery(Settings(data_dir=tmp_path, broker_url="redis://cache:6379/3"))
    conf = app.conf
    assert conf.broker_url == "redis://cache:6379/3"
    assert conf.result_backend == "redis://cache:6379/3"
    assert conf.task_acks_late is True
    # A pool process lost mid-task: its job is re-queued and sent again by the main process
    # (task_failure with WorkerLostError), so the message is not put back as well.
    assert conf.task_reject_on_worker_lost is False
    assert conf.worker_prefetch_multiplier == 1
    assert (conf.task_serializer, conf.result_serializer) == ("json", "json")
    assert list(conf.accept_content) == ["json"]
    # Redis redelivers unacknowledged tasks after this: it must outlast a long job.
    assert conf.broker_transport_options["visibility_timeout"] >= 3600
    app.loader.import_default_modules()
    assert "polar.run_job" in app.tasks


def test_run_job_task_retries_only_infrastructure_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert run_job_task.name == "polar.run_job"
    assert run_job_task.max_retries == MAX_RETRIES == 5
    retried: list[tuple[BaseException, float]] = []

    class Retry(Exception):
        pass

    def retry(exc: BaseException, countdown: float) -> Retry:
        retried.append((exc, countdown))
        return Retry()

    monkeypatch.setattr(run_job_task, "retry", retry)
    db_down = OperationalError("SELECT 1", {}, ConnectionRefusedError("refused"))
    for error in (db_down, ConnectionError("reset"), OSError(28, "No space left on device")):

        def run(*_: Any, error: Exception = error, **__: Any) -> None:
            raise error

        monkeypatch.setattr(job_runs, "run_job", run)
        with pytest.raises(Retry):
            run_job_task.run("job-1")
    assert retried[0][0] is db_down and len(retried) == 3
    assert all(0 < delay <= 4 for _, delay in retried)  # the first retry: 2 s with jitter

    def bad(*_: Any, **__: Any) -> None:
        raise ValidationFailed("bad input")

    monkeypatch.setattr(job_runs, "run_job", bad)
    with pytest.raises(ValidationFailed):
        run_job_task.run("job-1")
    assert len(retried) == 3


def test_run_job_task_calls_the_service_and_marks_failed_when_retries_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ran: list[tuple[str, Any]] = []
    failed: list[tuple[str, str, str]] = []
    monkeypatch.setattr(
        job_runs, "run_job", lambda job_id, env, runner: ran.append((job_id, env, runner))
    )
    monkeypatch.setattr(
        job_runs,
        "mark_failed",
        lambda job_id, code, message, **_: failed.append((job_id, code, message)),
    )
    run_job_task.run("job-1")
    env = celery_module.celery_app.job_environment()
    # The worker's wiring, from the composition root; the run is named by its task.
    assert ran == [("job-1", env, f"celery:{run_job_task.request.id}")]
    assert set(env.handlers) == {k.value for k in JobKind}
    run_job_task.on_failure(ConnectionError("down"), "task-id", ["job-2"], {}, None)
    db_down = OperationalError("SELECT 1", {}, ConnectionRefusedError("refused"))
    run_job_task.on_failure(db_down, "task-id", ["job-3"], {}, None)
    # The client reads a message that says what was down; the exception goes to the log only.
    assert failed == [
        ("job-2", job_runs.RETRIES_EXHAUSTED, job_runs.RETRIES_EXHAUSTED_MESSAGE),
        ("job-3", "database_unavailable", job_runs.DATABASE_OUTAGE.message),
    ]


def test_worker_process_init_warms_the_model_in_the_background(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    called = threading.Event()
    monkeypatch.setattr(celery_module.celery_app, "warm_model", called.set)
    monkeypatch.setattr(celery_module.celery_app, "warm_model_at_start", True)
    from celery import signals

    signals.worker_process_init.send(sender="test")
    assert called.wait(10)


def test_warm_model_loads_the_wired_model_and_survives_a_failing_loader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_celery(Settings(data_dir=tmp_path, broker_url=""), warm_model=False)
    loaded = threading.Event()
    env = app.job_environment()
    monkeypatch.setattr(app, "job_environment", lambda: replace(env, serving=loaded.set))
    thread = app.warm_model()
    assert thread is not None
    thread.join(10)
    assert loaded.is_set()

    def broken() -> None:
        raise RuntimeError("no weights")

    monkeypatch.setattr(app, "job_environment", lambda: replace(env, serving=broken))
    thread = app.warm_model()
    assert thread is not None
    thread.join(10)  # the error is logged, not raised
    assert not thread.is_alive()
    env.session_factory.kw["bind"].dispose()


# --- a real worker ----------------------------------------------------------------------------

# Run inside the worker process: its jobs of KIND go to `worker_handler` below.
WORKER_MAIN = textwrap.dedent(
    """
    import sys
    import workers.celery_app as m
    from tests.workers.test_celery_app import KIND, worker_handler
    m.celery_app.warm_model_at_start = False  # these jobs need no model
    m.celery_app.use_handlers({KIND: worker_handler})
    m.celery_app.conf.task_default_queue = sys.argv[1]  # what its reconciler re-sends goes here
    m.celery_app.worker_main(["worker", "-P", "solo", "-Q", sys.argv[1], "-n", sys.argv[2],
        "--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"])
    """
)
# Run in a separate client process: the API's queue, wired as the API wires it.
CLIENT_MAIN = textwrap.dedent(
    """
    import sys
    from app.runtime.container import build
    from app.config import get_settings
    queue = build(get_settings()).queue
    queue.celery.conf.task_default_queue = sys.argv[1]  # this test's own queue
    for job_id in sys.argv[2:]:
        queue.enqueue(job_id)
    assert queue.join(30), "not published"
    """
)
KIND = JobKind.REBUILD_INDEX.value


def worker_handler(ctx: JobContext) -> None:
    """A dummy job: proves where it ran, fails or flakes on request."""
    out = Path(ctx.payload["out"])
    attempts = out.with_suffix(".attempts")
    n = int(attempts.read_text()) + 1 if attempts.exists() else 1
    attempts.write_text(str(n))
    if n <= ctx.payload.get("transient_failures", 0):
        raise ConnectionError("broker hiccup")
    if ctx.payload.get("fail"):
        raise ValidationFailed("the dummy job was told to fail", code="dummy_failure")
    ctx.progress(0.5)
    out.write_text(str(os.getpid()))


@pytest.fixture
def worker_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLAR_")}
    env.update(
        POLAR_DATA_DIR=str(tmp_path / "data"),
        POLAR_DATABASE_URL=f"sqlite:///{(tmp_path / 'job_runs.db').as_posix()}",
        POLAR_BROKER_URL=REDIS_URL,
        PYTHONPATH=str(ROOT),
    )
    return env


@pytest.fixture
def celery_worker(
    worker_env: dict[str, str], tmp_path: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    yield from start_worker(worker_env, tmp_path)


def start_worker(
    worker_env: dict[str, str], tmp_path: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    queue = f"polar-test-{uuid.uuid4().hex[:8]}"
    log = (tmp_path / "worker.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER_MAIN, queue, f"{queue}@%h"],
        cwd=ROOT,
        env=worker_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so cleanup reaches any child
    )
    try:
        yield queue, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # warm shutdown
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        log.close()
        import redis

        redis.Redis.from_url(REDIS_URL).delete(
            queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"
        )


@pytest.mark.redis
def test_real_celery_worker_runs_dispatched_jobs(
    celery_worker: tuple[str, subprocess.Popen[bytes]], worker_env: dict[str, str], tmp_path: Path
) -> None:
    queue, proc = celery_worker
    url = worker_env["POLAR_DATABASE_URL"]
    engine = make_engine(url)
    migrate(engine)
    factory = make_session_factory(engine)
    with session_scope(factory) as s:
        uid = users.create_user("alice", db_session=s).id
        payloads: dict[str, dict[str, Any]] = {
            "ok": {"out": str(tmp_path / "ok.txt")},
            "fail": {"out": str(tmp_path / "fail.txt"), "fail": True},
            "flaky": {"out": str(tmp_path / "flaky.txt"), "transient_failures": 1},
        }
        ids = {
            name: jobs.create_job(db_session=s, user_id=uid, kind=KIND, payload=p).id
            for name, p in payloads.items()
        }
    client = subprocess.run(
        [sys.executable, "-c", CLIENT_MAIN, queue, *ids.values()],
        cwd=ROOT,
        env=worker_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert client.returncode == 0, client.stderr

    deadline = time.monotonic() + 90
    states: dict[str, Job] = {}
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "worker.log").read_text()
        with factory() as s:
            states = {name: s.get_one(Job, job_id) for name, job_id in ids.items()}
        if all(j.state in ("succeeded", "failed") for j in states.values()):
            break
        time.sleep(0.2)
    engine.dispose()
    log = (tmp_path / "worker.log").read_text()
    summary = {name: (j.state, j.error_code, j.attempts) for name, j in states.items()}
    assert summary == {
        "ok": ("succeeded", None, 1),
        "fail": ("failed", "dummy_failure", 1),
        "flaky": ("succeeded", None, 2),  # retried by Celery after a ConnectionError
    }, log
    assert states["ok"].progress == 1.0
    # It ran in the worker process, not here.
    assert int((tmp_path / "ok.txt").read_text()) == proc.pid
    assert "polar.run_job" in log


@pytest.mark.redis
def test_a_new_worker_runs_jobs_that_were_never_published_or_lost_their_worker(
    worker_env: dict[str, str], tmp_path: Path
) -> None:
    """Redis was down when the job was committed (no message), and another job's worker died
    mid-run (no heartbeat since): a worker started afterwards runs both, each once."""
    url = worker_env["POLAR_DATABASE_URL"]
    engine = make_engine(url)
    migrate(engine)
    factory = make_session_factory(engine)
    with session_scope(factory) as s:
        uid = users.create_user("alice", db_session=s).id
        unsent = jobs.create_job(
            db_session=s, user_id=uid, kind=KIND, payload={"out": str(tmp_path / "unsent.txt")}
        ).id
        orphan = jobs.create_job(
            db_session=s, user_id=uid, kind=KIND, payload={"out": str(tmp_path / "orphan.txt")}
        ).id
    assert job_runs.mark_running(orphan, session_factory=factory)  # ... and then its host was lost
    env = {
        **worker_env,
        "POLAR_JOBS__RESEND_AFTER_S": "1",
        "POLAR_JOBS__DEAD_AFTER_S": "3",
        "POLAR_JOBS__RECONCILE_INTERVAL_S": "0.5",
    }
    worker = start_worker(env, tmp_path)
    _queue, proc = next(worker)
    try:
        deadline = time.monotonic() + 90
        states: dict[str, Job] = {}
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "worker.log").read_text()
            with factory() as s:
                states = {j: s.get_one(Job, j) for j in (unsent, orphan)}
            if all(j.state == "succeeded" for j in states.values()):
                break
            time.sleep(0.2)
        log = (tmp_path / "worker.log").read_text()
        assert [states[j].state for j in (unsent, orphan)] == ["succeeded"] * 2, log
        assert states[unsent].attempts == 1 and states[orphan].attempts == 2  # once each here
        assert (tmp_path / "unsent.attempts").read_text() == "1"
        assert (tmp_path / "orphan.attempts").read_text() == "1"
        assert "reconciler" in log
    finally:
        next(worker, None)  # stops the worker
        engine.dispose()


def test_a_lost_pool_process_resumes_its_job_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's main process reports WorkerLostError (task_failure): the job that task was
    running goes back to 'queued' and is sent again; another run of it is left alone."""
    from billiard.exceptions import WorkerLostError
    from celery import signals

    from tests.fakes import RecordingQueue

    settings = Settings(data_dir=tmp_path, broker_url="", database_url=f"sqlite:///{tmp_path}/j.db")
    app = create_celery(settings, warm_model=False)
    factory = app.job_environment().session_factory
    migrate(app.container().engine)
    with session_scope(factory) as s:
        uid = users.create_user("alice", db_session=s).id
        job_id = jobs.create_job(db_session=s, user_id=uid, kind=KIND, payload={}).id
    assert job_runs.mark_running(job_id, session_factory=factory, runner="celery:task-1")
    sent = RecordingQueue()
    monkeypatch.setattr(app, "publisher", lambda: sent)

    app.resume_lost_run(job_id, "task-0").join(10)  # an older run of it: nothing to do
    assert sent.job_ids == []
    app.resume_lost_run(job_id, "task-1").join(10)
    assert sent.job_ids == [job_id]
    with factory() as s:
        assert s.get_one(Job, job_id).state == "queued"

    # The signal handler: only a lost process counts, not a task's own exception.
    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(celery_module.celery_app, "resume_lost_run",
                        lambda j, t: seen.append((j, t)))  # fmt: skip
    signals.task_failure.send(sender=None, task_id="t1", exception=ValueError("x"), args=["j1"])
    signals.task_failure.send(
        sender=None, task_id="t2", exception=WorkerLostError("signal 9"), args=["j2"], kwargs={}
    )
    assert seen == [("j2", "t2")]
    app.container().engine.dispose()
