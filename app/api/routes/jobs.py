"""/jobs: poll background work (embedding uploads, training concepts)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.api.deps import CurrentUser, SessionDep
from app.api.params import Cursor, JobId, PageLimit
from app.api.schemas import JobDetail, JobPage
from app.api.schemas import error_responses as errors
from app.models import JobKind, JobState
from app.services import jobs as service

router = APIRouter(prefix="/jobs", tags=["jobs"], responses=errors(401))


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
    page = service.list_jobs(
        db_session=db_session,
        user_id=user.id,
        limit=limit,
        cursor=cursor,
        only=service.JobFilter(
            state=state.value if state is not None else None,
            kind=kind.value if kind is not None else None,
        ),
    )
    return JobPage(items=[JobDetail.from_job(j) for j in page.items], next_cursor=page.next_cursor)


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
