"""/concepts: teach the service a personal object from photos (logic in services/concepts)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile
from fastapi.responses import FileResponse

from app.api.deps import CurrentUser, PhotoEnvDep, SessionDep, StoreDep
from app.api.errors import takes_body
from app.api.files import (
    FILE_RESPONSES,
    IMMUTABLE,
    ApiFileResponse,
    content_etag,
    regular_file_stat,
    thumbnail_response,
)
from app.api.forms import FormRoute
from app.api.params import ConceptId, Cursor, ExampleId, LibraryImageIds, PageLimit
from app.api.schemas import (
    CleanStr,
    ConceptExampleList,
    ConceptExampleOut,
    ConceptJobResponse,
    ConceptOut,
    ConceptPage,
    ConceptPatch,
    JobOut,
)
from app.api.schemas import error_responses as errors
from app.errors import NotFound
from app.services import concepts as service
from app.services.images import IncomingFile
from app.storage import THUMB_MIME

router = APIRouter(
    prefix="/concepts", tags=["concepts"], responses=errors(401), route_class=FormRoute
)

_PHOTOS_DOC = (
    "photos of the concept to upload; with `image_ids`, 3-13 in all "
    "(training.min_photos..max_photos)"
)


def concept_out(view: service.ConceptView) -> ConceptOut:
    """The API form of a concept."""
    c = view.concept
    return ConceptOut(
        id=c.id,
        name=c.name,
        category=c.category,
        state=c.state,
        version=c.version,
        token=c.token,
        placeholder=view.placeholder,
        example_count=view.example_count,
        metrics=c.metrics,
        retention_score=c.retention_score,
        retention_flagged=c.retention_flagged,
        job_id=view.job_id,
        created_at=c.created_at,
        updated_at=c.updated_at,
    )


def change_out(change: service.ConceptChange) -> ConceptJobResponse:
    job = JobOut.from_model(change.job) if change.job is not None else None
    return ConceptJobResponse(concept=concept_out(change.view), job=job)


def _incoming(files: list[UploadFile] | None) -> list[IncomingFile]:
    return [IncomingFile(f.filename, f.file) for f in files or []]


@router.post(
    "",
    status_code=202,
    response_model=ConceptJobResponse,
    summary="Create a concept from photos; it trains in the background",
    responses=errors(404, 409, 413, 415, 422),
)
@takes_body("upload")
def create_concept(
    name: Annotated[
        CleanStr, Form(description="what queries call it, e.g. Fido (1-64 characters)")
    ],
    user: CurrentUser,
    env: PhotoEnvDep,
    files: Annotated[list[UploadFile] | None, File(description=_PHOTOS_DOC)] = None,
    image_ids: LibraryImageIds = None,
    category: Annotated[
        CleanStr | None, Form(description='coarse class, e.g. "dog": placeholder "sks dog"')
    ] = None,
) -> ConceptJobResponse:
    """All or nothing: a bad photo, an unknown image id, a taken name or a wrong photo count
    stores nothing. Photos are uploaded `files`, library `image_ids`, or both."""
    photos = service.NewPhotos(_incoming(files), image_ids or [])
    change = service.create_concept(user.id, name, category, photos, env)
    return change_out(change)


@router.get(
    "",
    response_model=ConceptPage,
    summary="List concepts, oldest first, by cursor",
    responses=errors(422),
)
def list_concepts(
    user: CurrentUser,
    db_session: SessionDep,
    limit: PageLimit = 50,
    cursor: Cursor = None,
) -> ConceptPage:
    page = service.list_concepts(user.id, db_session=db_session, limit=limit, cursor=cursor)
    return ConceptPage(items=[concept_out(v) for v in page.items], next_cursor=page.next_cursor)


@router.get("/{concept_id}", response_model=ConceptOut, responses=errors(404))
def get_concept(concept_id: ConceptId, user: CurrentUser, db_session: SessionDep) -> ConceptOut:
    return concept_out(service.get_concept(user.id, concept_id, db_session=db_session))


@router.patch(
    "/{concept_id}",
    response_model=ConceptJobResponse,
    summary="Rename a concept and/or change its category",
    description=(
        "Renaming changes only which word queries match; nothing retrains. A new category (or "
        "`null` to drop it) changes the placeholder phrase the adapter is trained on, so it "
        "starts a new version and returns its training job."
    ),
    responses=errors(404, 409, 422),
)
def update_concept(
    concept_id: ConceptId,
    body: ConceptPatch,
    user: CurrentUser,
    env: PhotoEnvDep,
) -> ConceptJobResponse:
    category = body.category if "category" in body.model_fields_set else service.KEEP
    change = service.update_concept(user.id, concept_id, env, name=body.name, category=category)
    return change_out(change)


@router.post(
    "/{concept_id}/examples",
    status_code=202,
    response_model=ConceptJobResponse,
    summary="Add photos to a concept; a new version trains on all of them",
    responses=errors(404, 413, 415, 422),
)
@takes_body("upload")
def add_examples(
    concept_id: ConceptId,
    user: CurrentUser,
    env: PhotoEnvDep,
    files: Annotated[list[UploadFile] | None, File(description=_PHOTOS_DOC)] = None,
    image_ids: LibraryImageIds = None,
) -> ConceptJobResponse:
    """All or nothing; the concept's photos stay within training.max_photos in total. Photos are
    uploaded `files`, library `image_ids`, or both."""
    photos = service.NewPhotos(_incoming(files), image_ids or [])
    change = service.add_examples(user.id, concept_id, photos, env)
    return change_out(change)


@router.get(
    "/{concept_id}/examples",
    response_model=ConceptExampleList,
    summary="The photos a concept was taught from, oldest first",
    responses=errors(404),
)
def list_examples(
    concept_id: ConceptId, user: CurrentUser, db_session: SessionDep
) -> ConceptExampleList:
    examples = service.list_examples(user.id, concept_id, db_session=db_session)
    return ConceptExampleList(items=[ConceptExampleOut.from_model(e) for e in examples])


@router.get(
    "/{concept_id}/examples/{example_id}/file",
    response_class=FileResponse,
    summary="A concept photo's original bytes",
    responses={**errors(400, 404, 416), **FILE_RESPONSES},
)
def get_example_file(
    concept_id: ConceptId,
    example_id: ExampleId,
    user: CurrentUser,
    db_session: SessionDep,
    store: StoreDep,
) -> FileResponse:
    example = service.get_example(user.id, concept_id, example_id, db_session=db_session)
    path = store.path(example.storage_path)
    st = regular_file_stat(path)
    if st is None:
        raise NotFound("the stored file is missing", code="file_missing")
    return ApiFileResponse(  # content-addressed: its bytes are its hash's
        path,
        stat_result=st,
        etag=content_etag(example.sha256),
        cache_control=IMMUTABLE,
        media_type=example.mime,
        content_disposition_type="inline",
    )


@router.get(
    "/{concept_id}/examples/{example_id}/thumbnail",
    response_class=FileResponse,
    summary=f"A concept photo's {THUMB_MIME} thumbnail, 256 px on its longest side",
    responses={**errors(400, 404, 416), **FILE_RESPONSES},
)
def get_example_thumbnail(
    concept_id: ConceptId,
    example_id: ExampleId,
    user: CurrentUser,
    db_session: SessionDep,
    store: StoreDep,
) -> FileResponse:
    example = service.get_example(user.id, concept_id, example_id, db_session=db_session)
    path = store.path(store.thumbnail_relpath(example.storage_path))
    st = regular_file_stat(path)
    if st is None:
        raise NotFound("the thumbnail is missing", code="file_missing")
    return thumbnail_response(path, st, example.sha256)


@router.delete(
    "/{concept_id}",
    status_code=204,
    response_class=Response,
    summary="Delete a concept and the copies uploaded to teach it (library photos stay)",
    responses=errors(404),
)
def delete_concept(
    concept_id: ConceptId, user: CurrentUser, db_session: SessionDep, store: StoreDep
) -> Response:
    service.delete_concept(user.id, concept_id, db_session=db_session, store=store)
    return Response(status_code=204)
