"""Background jobs: create, track (state, throttled progress), run through a handler table.

The `jobs` row is the only source of truth. Services create a job in their own transaction and,
after the commit, hand its id to a `JobQueue` they were given (the embedded runner in
app/runner.py or the Celery queue in workers/queue.py; wired in app/bootstrap.py). Whatever runs
the job calls `run_job(job_id, env)`, which looks the handler up in `env.handlers`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app import repositories
from app.config import Settings
from app.db import session_scope
from app.errors import DomainError, NotFound
from app.models import Job, JobKind, JobState, utcnow
from app.repositories import Page
from app.storage import ImageStore

if TYPE_CHECKING:
    from app.services.foreground import Foreground
    from app.services.model import ServingModel

log = logging.getLogger(__name__)

# Errors worth another attempt later (database or broker briefly away); anything else is final.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (OperationalError, ConnectionError, TimeoutError)
# Progress writes at most this often per job (a 500-step training loop reports every step).
PROGRESS_MIN_INTERVAL_S = 0.5
# A running job's row is touched this often; one untouched for much longer lost its worker
# (app/reconciler.py puts it back in the queue).
HEARTBEAT_INTERVAL_S = 15.0
# Stable error codes of jobs that failed for reasons of their own runner, not of their input.
NO_HANDLER = "no_handler"
INTERNAL_ERROR = "internal_error"
RETRIES_EXHAUSTED = "job_retries_exhausted"
# What a client reads for those: the exception itself goes to the log only.
INTERNAL_ERROR_MESSAGE = (
    "the job failed because of an internal error; it was logged. Try again later, and tell the "
    "operator if it keeps failing"
)
RETRIES_EXHAUSTED_MESSAGE = (
    "the job could not run: the database or the broker stayed unavailable through every retry. "
    "Try again once the service is healthy"
)

SessionFactory = sessionmaker[Session]
ProgressCallback = Callable[[float], None]


class JobInterrupted(Exception):
    """The runner is shutting down; the job goes back to 'queued' and runs again later."""


class JobQueue(Protocol):
    """Where a committed job's id goes to be run (the embedded runner, or Celery)."""

    def enqueue(self, job_id: str) -> None:
        """Have the job run eventually; may raise if the transport is down."""
        ...


@dataclass(frozen=True)
class JobEnvironment:
    """What every job of one process shares; built once by the composition root."""

    settings: Settings
    session_factory: SessionFactory
    store: ImageStore
    handlers: Mapping[str, JobHandler]
    serving: Callable[[], ServingModel] = field(repr=False)  # the model, loaded on first call
    # Searches of this process, which jobs step aside for at each progress report (embedded
    # mode); None in a worker process that serves no searches.
    foreground: Foreground | None = field(default=None, repr=False)


@dataclass(frozen=True)
class JobContext:
    """What a handler gets: its job, its process's environment, and a progress callback."""

    job_id: str
    user_id: str
    kind: str
    payload: dict[str, Any]
    env: JobEnvironment = field(repr=False)
    progress: ProgressCallback = field(repr=False)  # fraction 0..1; cheap to call often

    @property
    def settings(self) -> Settings:
        return self.env.settings

    @property
    def session_factory(self) -> SessionFactory:
        return self.env.session_factory

    @property
    def store(self) -> ImageStore:
        return self.env.store

    def serving(self) -> ServingModel:
        """The serving model (loaded on first use)."""
        return self.env.serving()


JobHandler = Callable[[JobContext], None]


# --- create, read, hand over --------------------------------------------------------------------


def create_job(
    *, db_session: Session, user_id: str, kind: JobKind | str, payload: dict[str, Any]
) -> Job:
    """A new queued job (flushed, not committed: enqueue it only after the commit)."""
    return repositories.add_job(
        db_session=db_session, user_id=user_id, kind=JobKind(kind).value, payload=payload
    )


def get_job(*, db_session: Session, user_id: str, job_id: str) -> Job:
    """One of the user's jobs; a missing or foreign id is NotFound."""
    job = repositories.get_job(db_session=db_session, user_id=user_id, job_id=job_id)
    if job is None:
        raise NotFound.of("job")
    return job


def list_jobs(
    *,
    db_session: Session,
    user_id: str,
    limit: int,
    cursor: str | None = None,
    state: str | None = None,
    kind: str | None = None,
) -> Page[Job]:
    """A page of the user's jobs, newest first, optionally of one state and kind."""
    return repositories.list_jobs_page(
        db_session=db_session, user_id=user_id, limit=limit, cursor=cursor, state=state, kind=kind
    )


def enqueue_committed(queue: JobQueue, job: Job | None) -> None:
    """Hand a committed job to the queue; a failure is logged, never raised.

    The rows are committed and the job is `queued` in the database, which is the queue of
    record: failing the request now would make the client retry a change that succeeded.
    """
    if job is None:
        return
    try:
        queue.enqueue(job.id)
    except Exception:
        log.exception("handing job %s to the queue failed; it stays queued", job.id)


# --- state changes, each in its own short transaction -------------------------------------------


class ProgressThrottle:
    """Writes a running job's progress at most every PROGRESS_MIN_INTERVAL_S, never backwards."""

    def __init__(self, job_id: str, session_factory: SessionFactory) -> None:
        self.job_id = job_id
        self.session_factory = session_factory
        self._lock = threading.Lock()
        self._last: tuple[float, float] | None = None  # (monotonic time, fraction)

    def __call__(self, fraction: float) -> bool:
        """Record progress; returns whether it was written."""
        fraction = min(max(float(fraction), 0.0), 1.0)
        now = time.monotonic()
        with self._lock:
            last = self._last
            if last is not None and (
                fraction <= last[1] or now - last[0] < PROGRESS_MIN_INTERVAL_S
            ):
                return False
            self._last = (now, fraction)
        with session_scope(self.session_factory) as s:
            s.execute(
                update(Job)
                .where(Job.id == self.job_id, Job.state == JobState.RUNNING.value)
                .values(progress=fraction, updated_at=utcnow())
            )
        return True


def set_progress(job_id: str, fraction: float, *, session_factory: SessionFactory) -> None:
    """Record progress of a running job now (unthrottled; runs use a ProgressThrottle)."""
    ProgressThrottle(job_id, session_factory)(fraction)


def mark_running(job_id: str, *, session_factory: SessionFactory) -> bool:
    """Claim the job: -> running (one more attempt, progress from 0) unless it is running or
    succeeded already; whether this caller got it. Two deliveries never run one job at once."""
    with session_scope(session_factory) as s:
        result = s.execute(
            update(Job)
            .where(
                Job.id == job_id,
                Job.state.not_in([JobState.RUNNING.value, JobState.SUCCEEDED.value]),
            )
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
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(result, "rowcount", 0))


def touch_running(job_id: str, *, session_factory: SessionFactory) -> None:
    """The heartbeat of a running job (its worker is alive)."""
    with session_scope(session_factory) as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.RUNNING.value)
            .values(updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )


class Heartbeat:
    """A daemon thread that touches a running job's row until stopped (a context manager)."""

    def __init__(self, job_id: str, session_factory: SessionFactory, interval_s: float) -> None:
        self.job_id = job_id
        self.session_factory = session_factory
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"polar-heartbeat-{job_id[:8]}",
                                        daemon=True)  # fmt: skip

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                touch_running(self.job_id, session_factory=self.session_factory)
            except Exception:  # the database may be briefly away; the next beat tries again
                log.warning("heartbeat of job %s failed", self.job_id, exc_info=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def mark_queued(job_id: str, *, session_factory: SessionFactory) -> None:
    """Back to 'queued' (interrupted, or waiting for a retry)."""
    with session_scope(session_factory) as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id, Job.state != JobState.SUCCEEDED.value)
            .values(state=JobState.QUEUED.value, updated_at=utcnow())
        )


def mark_succeeded(job_id: str, *, session_factory: SessionFactory) -> None:
    """running -> succeeded, progress 1."""
    with session_scope(session_factory) as s:
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


def mark_failed(job_id: str, code: str, message: str, *, session_factory: SessionFactory) -> None:
    """-> failed with a stable error code and a message written for the client."""
    with session_scope(session_factory) as s:
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
    job_id: str, env: JobEnvironment, *, should_stop: Callable[[], bool] | None = None
) -> None:
    """Run one job to 'succeeded' or 'failed'; transient errors propagate (the caller retries).

    Idempotent: a job that already succeeded (a redelivered task) is left alone.
    `should_stop` lets the embedded runner interrupt a job at its next progress report.
    """
    factory = env.session_factory
    with session_scope(factory) as s:
        job = s.get(Job, job_id)
        if job is None:  # deleted with its user
            log.warning("job %s no longer exists", job_id)
            return
        if job.state == JobState.SUCCEEDED.value:
            log.info("job %s already succeeded; not running it again", job_id)
            return
        user_id, kind, payload = job.user_id, job.kind, dict(job.payload or {})
    fields = {"job_id": job_id, "user_id": user_id, "kind": kind}
    handler = env.handlers.get(kind)
    if handler is None:
        log.error("job %s: no handler for kind %r", job_id, kind, extra=fields)
        mark_failed(
            job_id,
            NO_HANDLER,
            f"this service cannot run jobs of kind {kind!r}",
            session_factory=factory,
        )
        return
    if not mark_running(job_id, session_factory=factory):
        # Another delivery holds it (running) or finished it: a duplicate message, dropped.
        log.info("job %s is running or done elsewhere; this delivery does nothing", job_id,
                 extra=fields)  # fmt: skip
        return
    throttle = ProgressThrottle(job_id, factory)

    def progress(fraction: float) -> None:
        if should_stop is not None and should_stop():
            raise JobInterrupted(job_id)
        throttle(fraction)
        if env.foreground is not None:
            env.foreground.wait_idle()

    ctx = JobContext(job_id, user_id, kind, payload, env, progress)
    started = time.perf_counter()
    log.info("job %s started (%s)", job_id, kind, extra=fields)

    def took() -> dict[str, Any]:
        return {**fields, "duration_s": round(time.perf_counter() - started, 3)}

    try:
        with Heartbeat(job_id, factory, HEARTBEAT_INTERVAL_S):
            handler(ctx)
    except JobInterrupted:
        log.info("job %s interrupted by shutdown; back to queued", job_id, extra=took())
        mark_queued(job_id, session_factory=factory)
        raise
    except TRANSIENT_ERRORS:
        log.warning("job %s hit a transient error; it will be retried", job_id, exc_info=True,
                    extra=took())  # fmt: skip
        # If the database itself is away, the retry sets the state instead.
        with contextlib.suppress(*TRANSIENT_ERRORS):
            mark_queued(job_id, session_factory=factory)
        raise
    except DomainError as e:
        log.info("job %s failed: %s (%s)", job_id, e.message, e.code, extra=took())
        mark_failed(job_id, e.code, e.message, session_factory=factory)
        return
    except Exception:
        log.exception("job %s crashed", job_id, extra=took())
        mark_failed(job_id, INTERNAL_ERROR, INTERNAL_ERROR_MESSAGE, session_factory=factory)
        return
    mark_succeeded(job_id, session_factory=factory)
    log.info("job %s succeeded", job_id, extra=took())
