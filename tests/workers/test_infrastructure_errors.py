"""Infrastructure errors are not job failures (issue 28): a job that meets the database, the
broker or the file system failing is retried (each attempt counted), and fails only when the
outage outlasts every retry, with a code that says what was down. No database connection
crosses a fork."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, ProgrammingError

from app.config import Settings
from app.db import database_disk_full, make_engine, session_scope
from app.errors import StorageFull, ValidationFailed
from app.models import Job, JobKind
from app.runtime.runner import JobRunner
from app.services import job_runs, jobs
from app.services.job_runs import JobContext, JobEnvironment, SessionFactory
from app.storage import ImageStore

KIND = JobKind.REBUILD_INDEX.value


def no_model() -> Any:
    raise AssertionError("these jobs need no model")


def new_job(factory: SessionFactory, user_id: str) -> str:
    with session_scope(factory) as s:
        return jobs.create_job(db_session=s, user_id=user_id, kind=KIND, payload={}).id


def load(factory: SessionFactory, job_id: str) -> Job:
    with factory() as s:
        return s.get_one(Job, job_id)


def db_error(cls: type[DBAPIError], *, invalidated: bool = False) -> DBAPIError:
    orig = Exception("driver error")
    return cls("UPDATE images SET ...", {}, orig, connection_invalidated=invalidated)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (db_error(OperationalError), "database_unavailable"),
        # A connection whose session state is broken (a statement prepared twice on a
        # connection two processes shared): dropped by the pool, the statement was fine.
        (db_error(ProgrammingError, invalidated=True), "database_unavailable"),
        (ConnectionError("reset by peer"), job_runs.RETRIES_EXHAUSTED),
        (OSError(errno.ENOSPC, "No space left on device"), "storage_full"),
        (OSError(errno.EROFS, "Read-only file system"), "storage_unavailable"),
        (StorageFull("the server's disk is full"), "storage_full"),
    ],
)
def test_infrastructure_errors_are_outages(error: BaseException, code: str) -> None:
    outage = job_runs.outage_of(error)
    assert outage is not None and outage.code == code


def test_a_wrapped_infrastructure_error_is_one_too() -> None:
    try:
        try:
            raise db_error(OperationalError)
        except OperationalError as e:
            raise RuntimeError("while saving the adapter") from e
    except RuntimeError as wrapped:
        assert job_runs.is_transient(wrapped)


def test_a_domain_error_raised_over_an_outage_is_the_outcome() -> None:
    try:
        try:
            raise db_error(OperationalError)
        except OperationalError as e:
            raise ValidationFailed("the concept was deleted meanwhile") from e
    except ValidationFailed as decided:
        assert not job_runs.is_transient(decided)


@pytest.mark.parametrize(
    "error",
    [
        ValidationFailed("bad input"),
        db_error(IntegrityError),
        db_error(ProgrammingError),  # a bug in a statement, connection fine
        FileNotFoundError(errno.ENOENT, "gone"),
        ValueError("no"),
    ],
)
def test_input_errors_and_bugs_are_not(error: BaseException) -> None:
    assert job_runs.outage_of(error) is None


def test_a_job_that_meets_a_broken_connection_is_retried_not_failed(
    factory: SessionFactory, user_id: str, db_url: str, tmp_path: Path
) -> None:
    """The incident of issue 28: an UPDATE failed with `prepared statement "_pg3_0" already
    exists` and the job was marked failed with internal_error; its photos stayed unembedded."""
    failures = {"left": 2}

    def handler(_ctx: JobContext) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise db_error(ProgrammingError, invalidated=True)

    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, broker_url="")
    env = JobEnvironment(settings, factory, ImageStore(settings.data_dir), {KIND: handler},
                         no_model)  # fmt: skip
    runner = JobRunner(env, retry_delays=(0.01, 0.01, 0.01))
    runner.start()
    try:
        job_id = new_job(factory, user_id)
        runner.submit(job_id).result(timeout=20)
    finally:
        runner.stop()
    job = load(factory, job_id)
    assert (job.state, job.attempts, job.error_code) == ("succeeded", 3, None)
    assert job.runner == f"embedded:{os.getpid()}"


def test_an_outage_that_outlasts_the_retries_fails_with_its_code(
    factory: SessionFactory, user_id: str, db_url: str, tmp_path: Path
) -> None:
    def handler(_ctx: JobContext) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, broker_url="")
    env = JobEnvironment(settings, factory, ImageStore(settings.data_dir), {KIND: handler},
                         no_model)  # fmt: skip
    runner = JobRunner(env, retry_delays=(0.01, 0.01))
    runner.start()
    try:
        job_id = new_job(factory, user_id)
        runner.submit(job_id).result(timeout=20)
    finally:
        runner.stop()
    job = load(factory, job_id)
    assert (job.state, job.attempts, job.error_code) == ("failed", 3, "storage_full")
    assert job.error_message == job_runs.STORAGE_FULL_OUTAGE.message


def test_a_lost_run_is_put_back_only_under_its_own_name(
    factory: SessionFactory, user_id: str
) -> None:
    job_id = new_job(factory, user_id)
    assert job_runs.mark_running(job_id, session_factory=factory, runner="celery:task-1")
    assert not job_runs.requeue_lost_run(job_id, "celery:task-0", session_factory=factory)
    assert load(factory, job_id).state == "running"  # another run's loss says nothing of it
    assert job_runs.requeue_lost_run(job_id, "celery:task-1", session_factory=factory)
    assert load(factory, job_id).state == "queued"
    assert not job_runs.requeue_lost_run(job_id, "celery:task-1", session_factory=factory)


# --- no connection crosses a fork (PostgreSQL) -------------------------------------------------


def _repeat(engine: Engine, times: int = 20) -> int:
    """The same statement often enough that psycopg prepares it server-side (after 5 runs);
    the backend's pid."""
    backend = 0
    for _ in range(times):
        with engine.connect() as c:
            c.execute(text("SELECT count(*) FROM jobs WHERE state = :s"), {"s": "queued"})
            backend = int(c.execute(text("SELECT pg_backend_pid()")).scalar_one())
    return backend


@pytest.mark.postgres
def test_a_forked_child_never_uses_the_parents_connections(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    try:
        parent_backend = _repeat(engine)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: the engine it inherited, used as a pool process would
            code = 1
            try:
                os.write(write, str(_repeat(engine)).encode())
                code = 0
            except BaseException as e:
                os.write(write, repr(e).encode())
            finally:
                os._exit(code)
        os.close(write)
        again = _repeat(engine)  # the parent goes on meanwhile
        _, status = os.waitpid(pid, 0)
        out = os.read(read, 65536).decode()
        os.close(read)
        assert os.waitstatus_to_exitcode(status) == 0, out
        assert int(out) != parent_backend  # a connection of its own
        assert again == parent_backend == _repeat(engine)  # the parent's is untouched
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_pooled_connection_of_another_process_is_never_handed_out(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    try:
        with engine.connect() as c:
            first = c.execute(text("SELECT pg_backend_pid()")).scalar_one()
            c.connection._connection_record.info["pid"] = -1  # as if opened before a fork
        with engine.connect() as c:
            assert c.execute(text("SELECT pg_backend_pid()")).scalar_one() != first
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_statement_prepared_twice_drops_the_connection(postgres_url: str) -> None:
    """What two processes on one connection produce: the connection is invalidated (the pool
    opens a new one) and the error counts as an outage, so the job is retried."""
    engine = make_engine(postgres_url)
    try:
        with engine.connect() as c:
            c.exec_driver_sql("PREPARE polar_twice AS SELECT 1")
            with pytest.raises(DBAPIError) as caught:
                c.exec_driver_sql("PREPARE polar_twice AS SELECT 1")
        assert caught.value.connection_invalidated
        assert job_runs.is_transient(caught.value)
        with engine.connect() as c:
            assert c.execute(text("SELECT 1")).scalar_one() == 1
    finally:
        engine.dispose()


def test_a_database_on_a_full_disk_is_a_full_disk_not_an_outage_of_the_database(
    tmp_path: Path,
) -> None:
    """SQLite in the data folder when its disk fills: uploads answer 507 storage_full and jobs
    wait for space, as when the files themselves do not fit."""
    engine = make_engine(f"sqlite:///{tmp_path / 'full.db'}")
    try:
        with engine.begin() as c:
            c.exec_driver_sql("CREATE TABLE t (b BLOB)")
            c.exec_driver_sql("PRAGMA max_page_count = 8")  # a disk this small
        with pytest.raises(OperationalError) as caught, engine.begin() as c:
            c.exec_driver_sql("INSERT INTO t VALUES (zeroblob(1000000))")
        assert database_disk_full(caught.value)
        outage = job_runs.outage_of(caught.value)
        assert outage is not None and outage.code == "storage_full"
        assert not database_disk_full(db_error(OperationalError))
    finally:
        engine.dispose()
