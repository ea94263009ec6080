"""/index: what the serving model can search in your library, and re-embedding it."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.api.deps import CurrentUser, QueueDep, SearchContextDep, SessionDep
from app.api.schemas import IndexOut, JobOut, RebuildOut
from app.api.schemas import error_responses as errors
from app.services import embedding as service

router = APIRouter(prefix="/index", tags=["index"], responses=errors(401))


@router.get(
    "",
    response_model=IndexOut,
    summary="How much of your library is searchable",
    responses=errors(503),
)
def get_index(user: CurrentUser, db_session: SessionDep, ctx: SearchContextDep) -> IndexOut:
    """After a model change or a new region layout, `pending` / `with_regions` say what a
    rebuild would do."""
    serving = ctx.serving()
    layout = service.region_key(ctx.settings.search, serving.bundle)
    status = service.index_status(db_session, user.id, serving.model_id, layout)
    return IndexOut(
        model=serving.model_id,
        images=status.images,
        embedded=status.embedded,
        pending=status.pending,
        failed=status.failed,
        region_layout=layout,
        with_regions=status.with_regions,
        rebuild_job=JobOut.from_model(status.rebuild_job) if status.rebuild_job else None,
    )


@router.post(
    "/rebuild",
    status_code=202,
    response_model=RebuildOut,
    summary="Embed every image the serving model (or the region layout) has not covered yet",
    responses={
        200: {"model": RebuildOut, "description": "a rebuild was already queued or running"},
        202: {"description": "a new rebuild job was queued"},
    },
)
def rebuild_index(
    user: CurrentUser, db_session: SessionDep, queue: QueueDep, response: Response
) -> RebuildOut:
    """Idempotent while one runs: a second call returns the open job with `created: false`."""
    job, created = service.request_rebuild(db_session, user.id, queue)
    if not created:
        response.status_code = 200
    return RebuildOut(job=JobOut.from_model(job), created=created)
