"""How a job runs: claim it, beat its heartbeat, call its handler, record how it ended.

Whatever runs a job (the embedded runner in app/runtime/runner.py, the Celery task in
workers/tasks.py) calls `run_job(job_id, env)`, which claims the job's row (`mark_running`: two
deliveries never run one job at once), looks the handler up in `env.handlers` (the table in
app/services/job_handlers.py) and runs it with a `JobContext`, touching the row every
HEARTBEAT_INTERVAL_S meanwhile (app/runtime/reconciler.py puts a job whose row went quiet back in
the queue). An infrastructure error (`outage_of`: the database, the broker, the file system) leaves
the job queued for a retry; any other error fails it with a stable code. Creating, reading and
handing a job to its queue is app/services/jobs.py.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from app import repositories
from app.config import Settings
from app.db import database_disk_full, session_scope
from app.errors import DomainError, StorageUnavailable
from app.models import Job, JobState
from app.storage import ImageStore

if TYPE_CHECKING:
    from app.services.foreground import Foreground
    from app.services.model import ServingModel

log = logging.getLogger(__name__)

# Progress writes at most this often per job (a 500-step training loop reports every step).
PROGRESS_MIN_INTERVAL_S = 0.5
# A running job's row is touched this often; one untouched for much longer lost its worker
# (app/runtime/reconciler.py puts it back in the queue).
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


# --- infrastructure errors: retried, never the job's fault -------------------------------------


@dataclass(frozen=True)
class Outage:
    """What was unavailable when a job met an infrastructure error: the code and message the
    job fails with if it is still unavailable after every retry."""

    code: str
    message: str


DATABASE_OUTAGE = Outage(
    "database_unavailable",
    "the job could not run: the database stayed unavailable through every retry. Its photos "
    "are picked up again by themselves once the database is back",
)
BROKER_OUTAGE = Outage(
    "broker_unavailable",
    "the job could not run: the broker (Redis) stayed unavailable through every retry",
)
STORAGE_FULL_OUTAGE = Outage(
    "storage_full", "the job could not run: the server's disk stayed full through every retry"
)
STORAGE_OUTAGE = Outage(
    "storage_unavailable",
    "the job could not run: the server's data folder stayed unreadable or read-only through "
    "every retry",
)
NETWORK_OUTAGE = Outage(RETRIES_EXHAUSTED, RETRIES_EXHAUSTED_MESSAGE)
INTERNAL_FAULT = Outage(INTERNAL_ERROR, INTERNAL_ERROR_MESSAGE)  # not an outage: a bug

# The file system failing, not a file being bad: worth another attempt.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_STORAGE_ERRNOS = frozenset(
    {errno.EROFS, errno.EIO, errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.ESTALE, errno.EAGAIN}
)


def _broker_errors() -> tuple[type[BaseException], ...]:
    """The broker client's connection errors (kombu's and redis-py's, where installed)."""
    found: list[type[BaseException]] = []
    with contextlib.suppress(ImportError):
        from kombu.exceptions import OperationalError as KombuOperationalError

        found.append(KombuOperationalError)
    with contextlib.suppress(ImportError):
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        found += [RedisConnectionError, RedisTimeoutError]
    return tuple(found)


_BROKER_ERRORS = _broker_errors()


def outage_of(error: BaseException) -> Outage | None:
    """The outage behind `error` when it is the machinery's (the database, the broker or the
    file system away, full or in a bad state), not the job's input or a bug: the job is retried
    with backoff, and fails only when the outage outlasts every retry. None otherwise."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:  # an error raised while handling another
        seen.add(id(e))
        found = _outage_of_one(e)
        if found is not None:
            return found
        if isinstance(e, DomainError):  # the handler decided the outcome, whatever came before
            return None
        e = e.__cause__ or e.__context__
    return None


def _outage_of_one(e: BaseException) -> Outage | None:
    if isinstance(e, sa_exc.DBAPIError):
        if database_disk_full(e):
            return STORAGE_FULL_OUTAGE
        # Connection gone, server restarting, pool state broken (a statement another process
        # prepared on a shared connection): the statement itself was fine.
        broken = isinstance(
            e, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.InternalError
        )
        return DATABASE_OUTAGE if broken or e.connection_invalidated else None
    if isinstance(e, sa_exc.TimeoutError | sa_exc.DisconnectionError):  # no pooled connection
        return DATABASE_OUTAGE
    if isinstance(e, _BROKER_ERRORS):
        return BROKER_OUTAGE
    if isinstance(e, StorageUnavailable):  # a write to the data folder refused (full, read-only)
        return STORAGE_FULL_OUTAGE if e.code == STORAGE_FULL_OUTAGE.code else STORAGE_OUTAGE
    if isinstance(e, ConnectionError | TimeoutError):
        return NETWORK_OUTAGE
    if isinstance(e, OSError):
        if e.errno in _FULL_ERRNOS:
            return STORAGE_FULL_OUTAGE
        if e.errno in _STORAGE_ERRNOS:
            return STORAGE_OUTAGE
    return None


def is_transient(error: BaseException) -> bool:
    """Whether a job that raised `error` is worth another attempt later (`outage_of`)."""
    return outage_of(error) is not None


SessionFactory = sessionmaker[Session]
ProgressCallback = Callable[[float], None]


class JobInterrupted(Exception):
    """The runner is shutting down; the job goes back to 'queued' and runs again later."""


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
            repositories.set_running_progress(db_session=s, job_id=self.job_id, fraction=fraction)
        return True


def set_progress(job_id: str, fraction: float, *, session_factory: SessionFactory) -> None:
    """Record progress of a running job now (unthrottled; runs use a ProgressThrottle)."""
    ProgressThrottle(job_id, session_factory)(fraction)


def embedded_runner_name() -> str:
    """The `runner` of jobs that this process's embedded runner claims."""
    return f"embedded:{os.getpid()}"


def mark_running(
    job_id: str, *, session_factory: SessionFactory, runner: str | None = None
) -> bool:
    """Claim the job: -> running (one more attempt, progress from 0) unless it is running or
    succeeded already; whether this caller got it. Two deliveries never run one job at once.
    `runner` names this run (a Celery task id), so a lost run can be put back by its name."""
    with session_scope(session_factory) as s:
        return repositories.claim_job(db_session=s, job_id=job_id, runner=runner)


def requeue_lost_run(job_id: str, runner: str, *, session_factory: SessionFactory) -> bool:
    """A run whose process was lost (its worker says so) -> 'queued', only if the job is still
    running under that run's name (another delivery may hold it by now); whether it was."""
    with session_scope(session_factory) as s:
        return repositories.requeue_lost_run(db_session=s, job_id=job_id, runner=runner)


def touch_running(job_id: str, *, session_factory: SessionFactory) -> None:
    """The heartbeat of a running job (its worker is alive)."""
    with session_scope(session_factory) as s:
        repositories.touch_running_job(db_session=s, job_id=job_id)


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
        repositories.mark_job_queued(db_session=s, job_id=job_id)


def mark_succeeded(job_id: str, *, session_factory: SessionFactory) -> None:
    """running -> succeeded, progress 1."""
    with session_scope(session_factory) as s:
        repositories.mark_job_succeeded(db_session=s, job_id=job_id)


def mark_failed(job_id: str, code: str, message: str, *, session_factory: SessionFactory) -> None:
    """-> failed with a stable error code and a message written for the client."""
    with session_scope(session_factory) as s:
        repositories.mark_job_failed(db_session=s, job_id=job_id, code=code, message=message)


# --- running ------------------------------------------------------------------------------------


def run_job(
    job_id: str,
    env: JobEnvironment,
    *,
    should_stop: Callable[[], bool] | None = None,
    runner: str | None = None,
) -> None:
    """Run one job to 'succeeded' or 'failed'; infrastructure errors (`is_transient`) leave it
    'queued' and propagate (the caller retries with backoff).

    Idempotent: a job that already succeeded (a redelivered task) is left alone.
    `should_stop` lets the embedded runner interrupt a job at its next progress report;
    `runner` names this run in the row (`mark_running`).
    """
    factory = env.session_factory
    loaded = _load(job_id, factory)
    if loaded is None:
        return
    user_id, kind, payload = loaded
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
    if not mark_running(job_id, session_factory=factory, runner=runner):
        # Another delivery holds it (running) or finished it: a duplicate message, dropped.
        log.info("job %s is running or done elsewhere; this delivery does nothing", job_id,
                 extra=fields)  # fmt: skip
        return
    progress = _progress_callback(job_id, env, should_stop)
    _run_handler(handler, JobContext(job_id, user_id, kind, payload, env, progress), fields)


def _load(job_id: str, factory: SessionFactory) -> tuple[str, str, dict[str, Any]] | None:
    """(user_id, kind, payload) of a job to run; None when it is gone (deleted with its user)
    or succeeded already (a redelivered task)."""
    with session_scope(factory) as s:
        job = s.get(Job, job_id)
        if job is None:  # deleted with its user
            log.warning("job %s no longer exists", job_id)
            return None
        if job.state == JobState.SUCCEEDED.value:
            log.info("job %s already succeeded; not running it again", job_id)
            return None
        return job.user_id, job.kind, dict(job.payload or {})


def _progress_callback(
    job_id: str, env: JobEnvironment, should_stop: Callable[[], bool] | None
) -> ProgressCallback:
    """A handler's progress callback: interrupts the job when the runner stops, writes the
    progress (throttled), and steps aside while this process serves searches."""
    throttle = ProgressThrottle(job_id, env.session_factory)

    def progress(fraction: float) -> None:
        if should_stop is not None and should_stop():
            raise JobInterrupted(job_id)
        throttle(fraction)
        if env.foreground is not None:
            env.foreground.wait_idle()

    return progress


def _run_handler(handler: JobHandler, ctx: JobContext, fields: dict[str, Any]) -> None:
    """Run a claimed job's handler with its heartbeat beating, and record how it ended."""
    job_id, factory = ctx.job_id, ctx.session_factory
    started = time.perf_counter()
    log.info("job %s started (%s)", job_id, ctx.kind, extra=fields)

    def took() -> dict[str, Any]:
        return {**fields, "duration_s": round(time.perf_counter() - started, 3)}

    try:
        with Heartbeat(job_id, factory, HEARTBEAT_INTERVAL_S):
            handler(ctx)
    except JobInterrupted:
        log.info("job %s interrupted by shutdown; back to queued", job_id, extra=took())
        mark_queued(job_id, session_factory=factory)
        raise
    except Exception as e:
        if is_transient(e):
            log.warning("job %s hit an infrastructure error; it will be retried", job_id,
                        exc_info=True, extra=took())  # fmt: skip
            # If the database itself is away, the retry sets the state instead.
            with contextlib.suppress(Exception):
                mark_queued(job_id, session_factory=factory)
            raise
        if isinstance(e, DomainError):
            log.info("job %s failed: %s (%s)", job_id, e.message, e.code, extra=took())
            mark_failed(job_id, e.code, e.message, session_factory=factory)
            return
        log.exception("job %s crashed", job_id, extra=took())
        mark_failed(job_id, INTERNAL_ERROR, INTERNAL_ERROR_MESSAGE, session_factory=factory)
        return
    mark_succeeded(job_id, session_factory=factory)
    log.info("job %s succeeded", job_id, extra=took())
