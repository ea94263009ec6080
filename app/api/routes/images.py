"""/images: upload, list, fetch, delete a user's library images (logic in services/images)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from fastapi.responses import FileResponse
from pydantic import Field

from app.api.deps import CurrentUser, PhotoEnvDep, SessionDep, SettingsDep, StoreDep
from app.api.errors import takes_body
from app.api.files import (
    FILE_RESPONSES,
    IMMUTABLE,
    REVALIDATE,
    ApiFileResponse,
    content_etag,
    regular_file_stat,
    thumbnail_response,
)
from app.api.forms import FormRoute
from app.api.params import Cursor, ImageId, PageLimit
from app.api.schemas import ImageOut, ImagePage, JobOut, UploadedImageOut, UploadResponse
from app.api.schemas import error_responses as errors
from app.errors import NotFound, ValidationFailed
from app.services import images as service
from app.storage import THUMB_MIME

router = APIRouter(prefix="/images", tags=["images"], responses=errors(401), route_class=FormRoute)

MAX_EPOCH_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
MAX_FORM_TIMES = 10_000  # the files-per-request limit is checked by the service


@router.post(
    "",
    status_code=202,
    response_model=UploadResponse,
    summary="Upload images (one or many); they are embedded in the background",
    responses=errors(409, 413, 415, 422),
)
@takes_body("upload")
def upload_images(
    files: Annotated[
        list[UploadFile],
        File(description="image files: JPEG, PNG, WebP, GIF (first frame), BMP, TIFF, HEIC/HEIF"),
    ],
    user: CurrentUser,
    env: PhotoEnvDep,
    modified_at: Annotated[
        list[Annotated[int, Field(ge=0, le=MAX_EPOCH_MS)]] | None,
        Form(
            max_length=MAX_FORM_TIMES,
            description=(
                "each file's modification time on your disk, in milliseconds since 1970 (a "
                "browser's File.lastModified), one per file in the same order: when the photo "
                "was taken if its EXIF does not say"
            ),
        ),
    ] = None,
) -> UploadResponse:
    """All or nothing: one bad file rejects the request (naming it) and stores nothing."""
    if modified_at and len(modified_at) != len(files):
        raise ValidationFailed(
            f"{len(modified_at)} modified_at values for {len(files)} files: send one per file, "
            "in the same order, or none"
        )
    times = [datetime.fromtimestamp(ms / 1000, UTC) for ms in modified_at or []]
    incoming = [
        service.IncomingFile(f.filename, f.file, times[i] if times else None)
        for i, f in enumerate(files)
    ]
    outcome = service.upload_images(user.id, incoming, env)
    return UploadResponse(
        images=[
            UploadedImageOut(**ImageOut.from_model(u.image).model_dump(), duplicate=u.duplicate)
            for u in outcome.images
        ],
        job=JobOut.from_model(outcome.job) if outcome.job is not None else None,
    )


@router.get(
    "",
    response_model=ImagePage,
    summary="List images by cursor, oldest first (or newest first: order=newest)",
    responses=errors(422),
)
def list_images(
    user: CurrentUser,
    db_session: SessionDep,
    limit: PageLimit = 50,
    cursor: Cursor = None,
    order: Annotated[
        Literal["oldest", "newest"],
        Query(description="by when each image was added; a cursor continues the same order"),
    ] = "oldest",
) -> ImagePage:
    page = service.list_images(
        user.id, db_session=db_session, limit=limit, cursor=cursor, newest_first=order == "newest"
    )
    return ImagePage(
        items=[ImageOut.from_model(i) for i in page.items], next_cursor=page.next_cursor
    )


@router.get("/{image_id}", response_model=ImageOut, responses=errors(404))
def get_image(image_id: ImageId, user: CurrentUser, db_session: SessionDep) -> ImageOut:
    return ImageOut.from_model(service.get_image(user.id, image_id, db_session=db_session))


@router.get(
    "/{image_id}/file",
    response_class=FileResponse,
    summary="The original bytes, as uploaded",
    responses={**errors(400, 404, 409, 416, 503), **FILE_RESPONSES},
)
def get_image_file(
    image_id: ImageId,
    user: CurrentUser,
    db_session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
) -> FileResponse:
    """Uploads come from the store; photos of a folder library from their folder, while the
    file is the one the last scan indexed (else a 409 `file_changed`)."""
    image, path = service.original_file(
        user.id, image_id, db_session=db_session, store=store, library_roots=settings.library.roots
    )
    st = regular_file_stat(path)
    if st is None:
        raise NotFound("the image's file is gone", code="file_missing")
    if image.source_path is None:  # content-addressed: its bytes are its hash's
        etag, cache = content_etag(image.sha256), IMMUTABLE
    else:
        # Not served once changed since its scan, until a scan reads it again. Its stat is in
        # the ETag, so a cached copy is revalidated.
        service.ensure_unchanged(image, st)
        etag, cache = content_etag(image.sha256, st.st_size, st.st_mtime_ns), REVALIDATE
    return ApiFileResponse(
        path,
        stat_result=st,
        etag=etag,
        cache_control=cache,
        media_type=image.mime,
        filename=image.original_filename,
        content_disposition_type="inline",
    )


@router.get(
    "/{image_id}/thumbnail",
    response_class=FileResponse,
    summary=f"A {THUMB_MIME} thumbnail, 256 px on its longest side",
    responses={**errors(400, 404, 416), **FILE_RESPONSES},
)
def get_image_thumbnail(
    image_id: ImageId, user: CurrentUser, db_session: SessionDep, store: StoreDep
) -> FileResponse:
    image = service.get_image(user.id, image_id, db_session=db_session)
    path = store.path(store.thumbnail_relpath(image.storage_path))
    st = regular_file_stat(path)
    if st is None:
        raise NotFound("the thumbnail is missing; upload the image again", code="file_missing")
    return thumbnail_response(path, st, image.sha256)


@router.delete(
    "/{image_id}",
    status_code=204,
    response_class=Response,
    summary="Delete an image (it also leaves the search index)",
    responses=errors(404),
)
def delete_image(
    image_id: ImageId, user: CurrentUser, db_session: SessionDep, store: StoreDep
) -> Response:
    service.delete_image(user.id, image_id, db_session=db_session, store=store)
    return Response(status_code=204)
