"""Background jobs: create, read, hand over to a queue.

The `jobs` row is the only source of truth. Services create a job in their own transaction and,
after the commit, hand its id to a `JobQueue` they were given (the embedded runner in
app/runtime/runner.py or the Celery queue in workers/queue.py; wired in
app/runtime/container.py). How a job then runs (claimed, heartbeats, its handler, how it ended)
is app/services/job_runs.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy.orm import Session

from app import repositories
from app.errors import NotFound
from app.models import Job, JobKind
from app.repositories import Page

log = logging.getLogger(__name__)


class JobQueue(Protocol):
    """Where a committed job's id goes to be run (the embedded runner, or Celery)."""

    def enqueue(self, job_id: str) -> None:
        """Have the job run eventually; may raise if the transport is down."""
        ...


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


@dataclass(frozen=True)
class JobFilter:
    """Which of a user's jobs a listing shows: of one state and/or one kind (None: any)."""

    state: str | None = None
    kind: str | None = None


def list_jobs(
    *,
    db_session: Session,
    user_id: str,
    limit: int,
    cursor: str | None = None,
    only: JobFilter = JobFilter(),
) -> Page[Job]:
    """A page of the user's jobs, newest first, optionally of one state and kind."""
    return repositories.list_jobs_page(
        db_session=db_session,
        user_id=user_id,
        limit=limit,
        cursor=cursor,
        state=only.state,
        kind=only.kind,
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
