"""/embed: vectors for applications that search their own index of the same CLIP model."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import CurrentUser, SearchContextDep, SessionDep
from app.api.schemas import EmbedTextRequest, EmbedTextResponse, SearchConceptOut
from app.api.schemas import error_responses as errors
from app.services import search as service

router = APIRouter(prefix="/embed", tags=["embed"], responses=errors(401, 404, 422, 503))


@router.post("/text", response_model=EmbedTextResponse, summary="Embed a query, concepts applied")
def embed_text(
    body: EmbedTextRequest, user: CurrentUser, db_session: SessionDep, ctx: SearchContextDep
) -> EmbedTextResponse:
    """The vector search would rank your library with: your concept names in `q` rewritten,
    their adapters stacked and fused with their photos. Compare it (dot product) with image
    embeddings of the same model (`model`)."""
    query = service.TextQuery(
        text=body.q, personalize=body.personalize, concept_ids=body.concept_ids
    )
    out = service.embed_text(user.id, query, ctx.query_env(db_session))
    vector = [float(v) for v in out.vector]
    return EmbedTextResponse(
        query=out.query,
        rewritten=out.text,
        personalized=out.personalized,
        model=out.model_id,
        dim=len(vector),
        embedding=vector,
        concepts=[SearchConceptOut(**vars(c)) for c in out.concepts],
        warnings=out.warnings,
    )
