"""Concept albums and feedback: /concepts/{id}/photos, its verdicts, /images/{id}/concepts
(logic in services/albums; docs/ALBUMS.md)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from app.api.deps import CurrentUser, PhotoEnvDep, QueueDep, SearchContextDep, SessionDep
from app.api.params import ConceptId, Cursor, ImageId, PageLimit
from app.api.routes.concepts import concept_out
from app.api.schemas import (
    AlbumCalibrationOut,
    AlbumPage,
    AlbumPhotoOut,
    ImageConceptList,
    ImageConceptOut,
    ImageOut,
    JobOut,
    VerdictIn,
    VerdictOut,
    VerdictPage,
    VerdictResponse,
)
from app.api.schemas import error_responses as errors
from app.services import albums as service

router = APIRouter(tags=["albums"], responses=errors(401))


def _change_out(change: service.VerdictChange) -> VerdictResponse:
    return VerdictResponse(
        concept=concept_out(change.view),
        mark=VerdictOut.from_model(change.mark) if change.mark is not None else None,
        job=JobOut.from_model(change.job) if change.job is not None else None,
    )


@router.get(
    "/concepts/{concept_id}/photos",
    response_model=AlbumPage,
    summary="A concept's album: the library photos that show it, with a calibrated confidence",
    responses=errors(404, 422, 503),
)
def concept_album(
    concept_id: ConceptId,
    user: CurrentUser,
    db_session: SessionDep,
    ctx: SearchContextDep,
    limit: PageLimit = 50,
    cursor: Cursor = None,
    order: Annotated[
        Literal["newest", "confidence"],
        Query(description="newest added first, or most confident first; a cursor keeps it"),
    ] = "newest",
) -> AlbumPage:
    """Current without asking: photos indexed after the concept was trained are in it. The
    photos it was taught from and those you confirmed always are; those you rejected never."""
    page = service.AlbumRequest(order=order, limit=limit, cursor=cursor)
    album = service.concept_album(user.id, concept_id, page, ctx.search_env(db_session))
    scale = album.calibration
    return AlbumPage(
        concept_id=album.concept.id,
        version=album.version,
        cutoff=album.cutoff,
        calibration=AlbumCalibrationOut(own=scale.own, library=scale.library) if scale else None,
        total=album.total,
        items=[
            AlbumPhotoOut(
                image=ImageOut.from_model(p.image),
                score=p.score,
                confidence=p.confidence,
                reason=p.reason,
                verdict=p.verdict,
            )
            for p in album.items
        ],
        next_cursor=album.next_cursor,
        warnings=album.warnings,
    )


@router.put(
    "/concepts/{concept_id}/photos/{image_id}/verdict",
    response_model=VerdictResponse,
    summary='Mark a library photo "this is it" (confirmed) or "not it" (rejected)',
    responses=errors(404, 422),
)
def set_verdict(
    concept_id: ConceptId,
    image_id: ImageId,
    body: VerdictIn,
    user: CurrentUser,
    env: PhotoEnvDep,
) -> VerdictResponse:
    """A new mark replaces the photo's previous one (kept in the history). A rejection (or the
    end of one) starts the concept's next version, with the rejected photos as negatives;
    confirmed photos are always in the album (docs/ALBUMS.md says why they do not retrain it).
    The same mark again changes nothing (`job` is null)."""
    change = service.set_verdict(user.id, concept_id, image_id, body.verdict, env)
    return _change_out(change)


@router.delete(
    "/concepts/{concept_id}/photos/{image_id}/verdict",
    response_model=VerdictResponse,
    summary="Undo a photo's mark; a concept it taught retrains without it",
    responses=errors(404),
)
def undo_verdict(
    concept_id: ConceptId,
    image_id: ImageId,
    user: CurrentUser,
    db_session: SessionDep,
    queue: QueueDep,
) -> VerdictResponse:
    """404 `no_verdict` when the photo has no mark for the concept."""
    change = service.undo_verdict(user.id, concept_id, image_id, db_session=db_session, queue=queue)
    return _change_out(change)


@router.get(
    "/concepts/{concept_id}/verdicts",
    response_model=VerdictPage,
    summary="A concept's marks, undone and replaced ones too, newest first",
    responses=errors(404, 422),
)
def verdict_history(
    concept_id: ConceptId,
    user: CurrentUser,
    db_session: SessionDep,
    limit: PageLimit = 50,
    cursor: Cursor = None,
) -> VerdictPage:
    page = service.verdict_history(
        user.id, concept_id, limit=limit, cursor=cursor, db_session=db_session
    )
    return VerdictPage(
        items=[VerdictOut.from_model(v) for v in page.items], next_cursor=page.next_cursor
    )


@router.get(
    "/images/{image_id}/concepts",
    response_model=ImageConceptList,
    summary="Which of your concepts a photo shows",
    responses=errors(404, 503),
)
def image_concepts(
    image_id: ImageId, user: CurrentUser, db_session: SessionDep, ctx: SearchContextDep
) -> ImageConceptList:
    """Your concepts whose album holds the photo, most confident first."""
    found = service.image_concepts(user.id, image_id, ctx.search_env(db_session))
    return ImageConceptList(
        items=[
            ImageConceptOut(
                concept_id=c.concept.id,
                name=c.concept.name,
                score=c.score,
                confidence=c.confidence,
                reason=c.reason,
                verdict=c.verdict,
            )
            for c in found
        ]
    )
