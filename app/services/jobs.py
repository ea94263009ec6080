"""Background jobs: create, track (state, throttled progress), run through a handler per kind.

Both job runners, the embedded thread pool (app/runner.py) and the Celery worker
(workers/tasks.py), call `run_job(job_id)`; it looks up the handler registered for the job's kind
in HANDLERS and records the outcome in the `jobs` row, which is the only source of truth.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings, get_settings
from app.db import get_session_factory, session_scope
from app.errors import DomainError, NotFound
from app.models import Job, JobKind, JobState, utcnow
from app.repositories import add_job

log = logging.getLogger(__name__)

# Errors worth another attempt later (database or broker briefly away); anything else is final.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (OperationalError, ConnectionError, TimeoutError)
# Progress writes at most this often per job (a 500-step training loop reports every step).
PROGRESS_MIN_INTERVAL_S = 0.5
# error_code of a job whose kind has no registered handler, or that crashed unexpectedly.
NO_HANDLER = "no_handler"
INTERNAL_ERROR = "internal_error"
RETRIES_EXHAUSTED = "job_retries_exhausted"

SessionFactory = sessionmaker[Session]
ProgressCallback = Callable[[float], None]


class JobInterrupted(Exception):
    """The runner is shutting down; the job goes back to 'queued' and runs again later."""


@dataclass(frozen=True)
class JobContext:
    """What a handler gets: the job, the settings and sessions of its process, progress."""

    job_id: str
    user_id: str
    kind: str
    payload: dict[str, Any]
    settings: Settings
    session_factory: SessionFactory
    progress: ProgressCallback = field(repr=False)  # fraction 0..1; cheap to call often


JobHandler = Callable[[JobContext], None]

# kind -> the one service function that does that job (filled at import time by the wiring).
HANDLERS: dict[str, JobHandler] = {}


def register_handler(kind: JobKind | str, handler: JobHandler) -> None:
    """Make `handler` run every job of `kind` (replaces any previous one)."""
    HANDLERS[JobKind(kind).value] = handler


def _factory(session_factory: SessionFactory | None) -> SessionFactory:
    return session_factory or get_session_factory(get_settings().database_url)


# --- create and read ----------------------------------------------------------------------------


def create_job(
    *, db_session: Session, user_id: str, kind: JobKind | str, payload: dict[str, Any]
) -> Job:
    """A new queued job (flushed, not committed: dispatch it only after the commit)."""
    return add_job(
        db_session=db_session, user_id=user_id, kind=JobKind(kind).value, payload=payload
    )


def get_job(*, db_session: Session, user_id: str, job_id: str) -> Job:
    """One of the user's jobs; a missing or foreign id is NotFound."""
    job = db_session.scalar(select(Job).where(Job.id == job_id, Job.user_id == user_id))
    if job is None:
        raise NotFound.of("job")
    return job


# --- state changes, each in its own short transaction -------------------------------------------

_progress_lock = threading.Lock()
_progress_last: dict[str, tuple[float, float]] = {}  # job id -> (monotonic time, fraction)


def set_progress(
    job_id: str, fraction: float, *, session_factory: SessionFactory | None = None
) -> bool:
    """Record progress of a running job, throttled; returns whether it was written."""
    fraction = min(max(float(fraction), 0.0), 1.0)
    now = time.monotonic()
    with _progress_lock:
        last = _progress_last.get(job_id)
        if last is not None and (fraction <= last[1] or now - last[0] < PROGRESS_MIN_INTERVAL_S):
            return False
        _progress_last[job_id] = (now, fraction)
    with session_scope(_factory(session_factory)) as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.RUNNING.value)
            .values(progress=fraction, updated_at=utcnow())
        )
    return True


def _forget_progress(job_id: str) -> None:
    with _progress_lock:
        _progress_last.pop(job_id, None)


def mark_running(job_id: str, *, session_factory: SessionFactory | None = None) -> None:
    """queued -> running: one more attempt, progress from 0."""
    _forget_progress(job_id)
    with session_scope(_factory(session_factory)) as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                state=JobState.RUNNING.value,
                progress=0.0,
                attempts=Job.attempts + 1,
                started_at=utcnow(),
                finished_at=None,
                error_code=None,
                error_message=None,
                updated_at=utcnow(),
            )
        )


def mark_queued(job_id: str, *, session_factory: SessionFactory | None = None) -> None:
    """Back to 'queued' (interrupted, or waiting for a retry)."""
    _forget_progress(job_id)
    with session_scope(_factory(session_factory)) as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id, Job.state != JobState.SUCCEEDED.value)
            .values(state=JobState.QUEUED.value, updated_at=utcnow())
        )


def mark_succeeded(job_id: str, *, session_factory: SessionFactory | None = None) -> None:
    """running -> succeeded, progress 1."""
    _forget_progress(job_id)
    with session_scope(_factory(session_factory)) as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                state=JobState.SUCCEEDED.value,
                progress=1.0,
                finished_at=utcnow(),
                updated_at=utcnow(),
            )
        )


def mark_failed(
    job_id: str, code: str, message: str, *, session_factory: SessionFactory | None = None
) -> None:
    """-> failed with a stable error code and a message for the client."""
    _forget_progress(job_id)
    with session_scope(_factory(session_factory)) as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id, Job.state != JobState.SUCCEEDED.value)
            .values(
                state=JobState.FAILED.value,
                error_code=code[:64],
                error_message=message,
                finished_at=utcnow(),
                updated_at=utcnow(),
            )
        )


# --- running ------------------------------------------------------------------------------------


def run_job(
    job_id: str,
    *,
    settings: Settings | None = None,
    session_factory: SessionFactory | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> None:
    """Run one job to 'succeeded' or 'failed'; transient errors propagate (the caller retries).

    Idempotent: a job that already succeeded (a redelivered task) is left alone.
    `should_stop` lets the embedded runner interrupt a job at its next progress report.
    """
    settings = settings or get_settings()
    factory = session_factory or get_session_factory(settings.database_url)
    with session_scope(factory) as s:
        job = s.get(Job, job_id)
        if job is None:  # deleted with its user
            log.warning("job %s no longer exists", job_id)
            return
        if job.state == JobState.SUCCEEDED.value:
            log.info("job %s already succeeded; not running it again", job_id)
            return
        user_id, kind, payload = job.user_id, job.kind, dict(job.payload or {})
    handler = HANDLERS.get(kind)
    if handler is None:
        mark_failed(
            job_id, NO_HANDLER, f"no handler for jobs of kind {kind!r}", session_factory=factory
        )
        return
    mark_running(job_id, session_factory=factory)

    def progress(fraction: float) -> None:
        if should_stop is not None and should_stop():
            raise JobInterrupted(job_id)
        set_progress(job_id, fraction, session_factory=factory)

    ctx = JobContext(job_id, user_id, kind, payload, settings, factory, progress)
    try:
        handler(ctx)
    except JobInterrupted:
        mark_queued(job_id, session_factory=factory)
        raise
    except TRANSIENT_ERRORS:
        log.warning("job %s hit a transient error; it will be retried", job_id, exc_info=True)
        # If the database itself is away, the retry sets the state instead.
        with contextlib.suppress(*TRANSIENT_ERRORS):
            mark_queued(job_id, session_factory=factory)
        raise
    except DomainError as e:
        log.info("job %s failed: %s (%s)", job_id, e.message, e.code)
        mark_failed(job_id, e.code, e.message, session_factory=factory)
        return
    except Exception as e:
        log.exception("job %s crashed", job_id)
        mark_failed(job_id, INTERNAL_ERROR, f"{type(e).__name__}: {e}", session_factory=factory)
        return
    mark_succeeded(job_id, session_factory=factory)


# --- dispatching --------------------------------------------------------------------------------


class JobSubmitter(Protocol):
    """The embedded runner as the dispatcher sees it (app/runner.py)."""

    def submit(self, job_id: str) -> object: ...


class JobDispatcher:
    """Sends job ids to the in-process runner (no broker configured) or to Celery."""

    def __init__(self, settings: Settings, runner: JobSubmitter | None = None) -> None:
        self.settings = settings
        self.runner = runner

    def dispatch(self, job_id: str) -> None:
        """Queue the (committed) job for running."""
        if self.settings.embedded_jobs:
            if self.runner is None:
                # Nothing runs jobs in this process; the next runner start picks it up.
                log.warning("job %s stays queued: no embedded runner is running", job_id)
                return
            self.runner.submit(job_id)
            return
        from workers.tasks import run_job_task  # only Celery deployments need Celery loaded

        run_job_task.delay(job_id)

    def __call__(self, job: Job) -> None:
        """Dispatch a job row (the shape of the services' `on_job_created` hooks)."""
        self.dispatch(job.id)


_dispatcher: JobDispatcher | None = None


def install_dispatcher(dispatcher: JobDispatcher | None) -> None:
    """Make `dispatch()` use this dispatcher (the app's lifespan installs its own)."""
    global _dispatcher
    _dispatcher = dispatcher


def dispatch(job: Job | str) -> None:
    """Queue a committed job with the installed dispatcher (else per the process settings)."""
    job_id = job if isinstance(job, str) else job.id
    (_dispatcher or JobDispatcher(get_settings())).dispatch(job_id)


def dispatch_committed(job: Job | None) -> None:
    """`dispatch` for a job already committed by a request: a failure is logged, not raised."""
    if job is None:
        return
    try:
        dispatch(job)
    except Exception:
        # The rows are committed and the job is queued in the database; failing the request
        # now would make the client retry a change that succeeded.
        log.exception("dispatching job %s failed; it stays queued", job.id)
