"""Jobs: creating and reading them, their state changes (app.services.job_runs), and what the
reconciler re-sends (app/runtime/reconciler.py)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import exists, or_, select, update
from sqlalchemy.orm import Session

from app.models import Image, Job, JobKind, JobState, utcnow
from app.repositories.common import Page, keyset_page


def add_job(*, db_session: Session, user_id: str, kind: str, payload: dict[str, Any]) -> Job:
    """A new queued job (flushed, so it has its id; the caller commits)."""
    job = Job(user_id=user_id, kind=kind, state=JobState.QUEUED.value, payload=payload)
    db_session.add(job)
    db_session.flush()
    return job


def get_job(*, db_session: Session, user_id: str, job_id: str) -> Job | None:
    """One of the user's jobs (None for a missing or foreign id)."""
    return db_session.scalar(select(Job).where(Job.id == job_id, Job.user_id == user_id))


# A job's state changes (app.services.job_runs), each a single statement on its row.


def set_running_progress(*, db_session: Session, job_id: str, fraction: float) -> None:
    """A running job's progress (a job no longer running keeps its own)."""
    db_session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.RUNNING.value)
        .values(progress=fraction, updated_at=utcnow())
    )


def claim_job(*, db_session: Session, job_id: str, runner: str | None) -> bool:
    """-> running (one more attempt, progress from 0, named `runner`) unless it is running or
    succeeded already; whether this caller got it."""
    result = db_session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.state.not_in([JobState.RUNNING.value, JobState.SUCCEEDED.value]),
        )
        .values(
            state=JobState.RUNNING.value,
            progress=0.0,
            attempts=Job.attempts + 1,
            runner=runner,
            started_at=utcnow(),
            finished_at=None,
            error_code=None,
            error_message=None,
            updated_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0))


def requeue_lost_run(*, db_session: Session, job_id: str, runner: str) -> bool:
    """-> queued, only if the job is still running under the name `runner`; whether it was."""
    result = db_session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.RUNNING.value, Job.runner == runner)
        .values(state=JobState.QUEUED.value, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0))


def touch_running_job(*, db_session: Session, job_id: str) -> None:
    """A running job's heartbeat: its row's updated_at is now."""
    db_session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.RUNNING.value)
        .values(updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def mark_job_queued(*, db_session: Session, job_id: str) -> None:
    """-> queued, unless it succeeded."""
    db_session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state != JobState.SUCCEEDED.value)
        .values(state=JobState.QUEUED.value, updated_at=utcnow())
    )


def mark_job_succeeded(*, db_session: Session, job_id: str) -> None:
    """-> succeeded, progress 1."""
    db_session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(
            state=JobState.SUCCEEDED.value,
            progress=1.0,
            finished_at=utcnow(),
            updated_at=utcnow(),
        )
    )


def mark_job_failed(*, db_session: Session, job_id: str, code: str, message: str) -> None:
    """-> failed with `code` (cut to the column's 64 characters) and `message`, unless it
    succeeded."""
    db_session.execute(
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


def requeue_running_jobs(*, db_session: Session) -> int:
    """Every 'running' job back to 'queued' (their process died); how many."""
    result = db_session.execute(
        update(Job)
        .where(Job.state == JobState.RUNNING.value)
        .values(state=JobState.QUEUED.value, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def requeue_stale_running_jobs(*, db_session: Session, before: datetime) -> list[str]:
    """'running' jobs whose row was last touched before `before` (their worker stopped
    heartbeating) back to 'queued'; their ids, oldest first."""
    ids = list(
        db_session.scalars(
            select(Job.id)
            .where(Job.state == JobState.RUNNING.value, Job.updated_at < before)
            .order_by(Job.created_at, Job.id)
        )
    )
    if ids:
        db_session.execute(
            update(Job)
            .where(Job.id.in_(ids), Job.state == JobState.RUNNING.value)
            .values(state=JobState.QUEUED.value, updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    return ids


def take_waiting_jobs(*, db_session: Session, before: datetime, limit: int) -> list[str]:
    """Up to `limit` 'queued' jobs untouched since `before`, oldest first; each is touched, so
    a job is handed out again at most once per waiting period."""
    ids = list(
        db_session.scalars(
            select(Job.id)
            .where(Job.state == JobState.QUEUED.value, Job.updated_at < before)
            .order_by(Job.created_at, Job.id)
            .limit(limit)
        )
    )
    if ids:
        db_session.execute(
            update(Job)
            .where(Job.id.in_(ids), Job.state == JobState.QUEUED.value)
            .values(updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    return ids


# Jobs that embed a user's images not embedded yet (a library scan queues an embed job).
EMBEDDING_JOB_KINDS = (
    JobKind.EMBED_IMAGES.value,
    JobKind.REBUILD_INDEX.value,
    JobKind.SCAN_LIBRARY.value,
)


def users_with_unclaimed_pending_images(
    *, db_session: Session, quiet_since: datetime, limit: int
) -> list[str]:
    """Users with images never embedded (no embedding and no recorded read failure) that no
    job will embed: none of an embedding kind is queued or running, and none was touched since
    `quiet_since` (a job that just ended, even failed, is not replaced at once)."""
    claimed = exists().where(
        Job.user_id == Image.user_id,
        Job.kind.in_(EMBEDDING_JOB_KINDS),
        or_(
            Job.state.in_([JobState.QUEUED.value, JobState.RUNNING.value]),
            Job.updated_at >= quiet_since,
        ),
    )
    return list(
        db_session.scalars(
            select(Image.user_id)
            .where(Image.embedding.is_(None), Image.embed_error.is_(None), ~claimed)
            .distinct()
            .order_by(Image.user_id)
            .limit(limit)
        )
    )


def pending_image_ids(*, db_session: Session, user_id: str, limit: int) -> list[str]:
    """Up to `limit` of the user's images never embedded and not failed, oldest first."""
    return list(
        db_session.scalars(
            select(Image.id)
            .where(
                Image.user_id == user_id,
                Image.embedding.is_(None),
                Image.embed_error.is_(None),
            )
            .order_by(Image.created_at, Image.id)
            .limit(limit)
        )
    )


def queued_among(*, db_session: Session, job_ids: Sequence[str]) -> list[str]:
    """Those of `job_ids` that are still 'queued'."""
    return list(
        db_session.scalars(
            select(Job.id).where(Job.id.in_(list(job_ids)), Job.state == JobState.QUEUED.value)
        )
    )


def queued_job_ids(*, db_session: Session) -> list[str]:
    """Ids of every queued job, oldest first."""
    return list(
        db_session.scalars(
            select(Job.id)
            .where(Job.state == JobState.QUEUED.value)
            .order_by(Job.created_at, Job.id)
        )
    )


def list_jobs_page(
    *,
    db_session: Session,
    user_id: str,
    limit: int,
    cursor: str | None = None,
    state: str | None = None,
    kind: str | None = None,
) -> Page[Job]:
    """A page of the user's jobs, newest first, optionally of one state and kind."""
    query = select(Job).where(Job.user_id == user_id)
    if state is not None:
        query = query.where(Job.state == state)
    if kind is not None:
        query = query.where(Job.kind == kind)
    return keyset_page(
        db_session,
        query,
        created_at=Job.created_at,
        row_id=Job.id,
        limit=limit,
        cursor=cursor,
        newest_first=True,
    )
