"""/search: ranked images for a query; a user's concept names personalise it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.api.deps import CurrentUser, SearchContextDep, SessionDep
from app.api.params import IntParam
from app.api.schemas import (
    K_DOC,
    OFFSET_DOC,
    Q_DOC,
    CleanStr,
    ImageOut,
    SearchConceptOut,
    SearchHitOut,
    SearchRequest,
    SearchResponse,
)
from app.api.schemas import error_responses as errors
from app.services import search as service

router = APIRouter(prefix="/search", tags=["search"], responses=errors(401, 404, 422, 503))


def _respond(outcome: service.SearchOutcome, k: int, offset: int, pending: int) -> SearchResponse:
    return SearchResponse(
        query=outcome.query,
        rewritten=outcome.text,
        personalized=outcome.personalized,
        model=outcome.model_id,
        concepts=[SearchConceptOut(**vars(c)) for c in outcome.concepts],
        hits=[
            SearchHitOut(rank=h.rank, score=h.score, image=ImageOut.from_model(h.image))
            for h in outcome.hits
        ],
        k=k,
        offset=offset,
        indexed=outcome.indexed,
        pending=pending,
        reranked=outcome.reranked,
        warnings=outcome.warnings,
    )


def _run(
    body: SearchRequest, user: CurrentUser, db_session: SessionDep, ctx: SearchContextDep
) -> SearchResponse:
    filters = None
    if body.filters is not None:
        filters = service.SearchFilters(
            created_after=body.filters.created_after,
            created_before=body.filters.created_before,
            taken_after=body.filters.taken_after,
            taken_before=body.filters.taken_before,
            mime=tuple(body.filters.mime),
        )
    env = ctx.search_env(db_session)
    query = service.SearchQuery(
        text=body.q,
        k=body.k,
        offset=body.offset,
        personalize=body.personalize,
        concept_ids=body.concept_ids,
        filters=filters,
    )
    outcome = service.search_images(user.id, query, env)
    ctx.metrics.searches.labels(str(outcome.personalized).lower()).inc()
    pending = service.unembedded_count(db_session, user.id, env.serving.model_id)
    return _respond(outcome, body.k, body.offset, pending)


@router.get("", response_model=SearchResponse, summary="Search your images")
def search_get(
    user: CurrentUser,
    db_session: SessionDep,
    ctx: SearchContextDep,
    q: Annotated[CleanStr, Query(description=Q_DOC, examples=["Fido at the beach"])],
    k: Annotated[IntParam, Query(ge=1, description=K_DOC)] = 20,
    offset: Annotated[IntParam, Query(ge=0, description=OFFSET_DOC)] = 0,
    personalize: Annotated[bool, Query(description="false = plain CLIP")] = True,
) -> SearchResponse:
    """Names of your concepts in `q` (any case, whole words, "Fido's") personalise the search."""
    body = SearchRequest(q=q, k=k, offset=offset, personalize=personalize)
    return _run(body, user, db_session, ctx)


@router.post("", response_model=SearchResponse, summary="Search with explicit concepts, filters")
def search_post(
    body: SearchRequest, user: CurrentUser, db_session: SessionDep, ctx: SearchContextDep
) -> SearchResponse:
    """Like GET, plus `concept_ids` to apply and `filters` on the images."""
    return _run(body, user, db_session, ctx)
