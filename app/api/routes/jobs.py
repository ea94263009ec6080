"""/jobs: poll background work (embedding uploads, training concepts)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.api.deps import CurrentUser, SessionDep
from app.api.params import Cursor, JobId, PageLimit
from app.models import Job, JobKind, JobState
from app.schemas import JobDetail, JobPage
from app.schemas import error_responses as errors
from app.services import jobs as service
from app.services.concepts import cursor_for
from app.services.images import decode_cursor

router = APIRouter(prefix="/jobs", tags=["jobs"], responses=errors(401))


def _newest_first(
    db_session: Session,
    user_id: str,
    *,
    limit: int,
    cursor: str | None,
    state: JobState | None,
    kind: JobKind | None,
) -> tuple[Sequence[Job], str | None]:
    """A page of the user's jobs by (created_at, id) descending; the cursor is the last key."""
    # Read-only listing; it belongs with the job service once that module grows a list_jobs.
    query = select(Job).where(Job.user_id == user_id)
    if state is not None:
        query = query.where(Job.state == state.value)
    if kind is not None:
        query = query.where(Job.kind == kind.value)
    if cursor:
        created_at, job_id = decode_cursor(cursor)
        query = query.where(
            (Job.created_at < created_at) | ((Job.created_at == created_at) & (Job.id < job_id))
        )
    rows = db_session.scalars(
        query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    ).all()
    items = rows[:limit]
    last = items[-1] if len(rows) > limit else None
    return items, cursor_for(last.created_at, last.id) if last is not None else None


@router.get(
    "",
    response_model=JobPage,
    summary="List jobs, newest first, by cursor",
    responses=errors(422),
)
def list_jobs(
    user: CurrentUser,
    db_session: SessionDep,
    state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
    kind: Annotated[JobKind | None, Query(description="only jobs of this kind")] = None,
    limit: PageLimit = 50,
    cursor: Cursor = None,
) -> JobPage:
    items, next_cursor = _newest_first(
        db_session, user.id, limit=limit, cursor=cursor, state=state, kind=kind
    )
    return JobPage(items=[JobDetail.from_job(j) for j in items], next_cursor=next_cursor)


@router.get(
    "/{job_id}",
    response_model=JobDetail,
    summary="State, progress and outcome of one job",
    responses=errors(404),
)
def get_job(job_id: JobId, user: CurrentUser, db_session: SessionDep) -> JobDetail:
    return JobDetail.from_job(
        service.get_job(db_session=db_session, user_id=user.id, job_id=job_id)
    )
