"""/libraries: folders indexed in place (logic in services/libraries)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.api.deps import CurrentUser, QueueDep, SessionDep, SettingsDep, StoreDep
from app.api.params import LibraryId
from app.api.schemas import JobOut, LibraryIn, LibraryList, LibraryOut
from app.api.schemas import error_responses as errors
from app.services import libraries as service
from app.services.library_paths import allowed_roots

router = APIRouter(prefix="/libraries", tags=["libraries"], responses=errors(401))


@router.post(
    "",
    status_code=202,
    response_model=LibraryOut,
    summary="Index a folder under an allowed root in place (a scan job starts)",
    responses=errors(409, 422),
)
def add_library(
    body: LibraryIn,
    user: CurrentUser,
    db_session: SessionDep,
    settings: SettingsDep,
    queue: QueueDep,
) -> LibraryOut:
    library, job = service.add_library(
        user.id, body.path, db_session=db_session, settings=settings, queue=queue
    )
    return LibraryOut.from_model(library, job)


@router.get("", response_model=LibraryList, summary="Your libraries")
def list_libraries(user: CurrentUser, db_session: SessionDep, settings: SettingsDep) -> LibraryList:
    items = service.list_libraries(user.id, db_session=db_session)
    return LibraryList(
        items=[LibraryOut.from_model(lib) for lib in items],
        roots=[str(r) for r in allowed_roots(settings)],
    )


@router.get("/{library_id}", response_model=LibraryOut, responses=errors(404))
def get_library(library_id: LibraryId, user: CurrentUser, db_session: SessionDep) -> LibraryOut:
    return LibraryOut.from_model(service.get_library(user.id, library_id, db_session=db_session))


@router.post(
    "/{library_id}/scan",
    status_code=202,
    response_model=JobOut,
    summary="Rescan: new files added, changed ones re-embedded, deleted ones leave the index",
    responses=errors(404),
)
def scan_library(
    library_id: LibraryId, user: CurrentUser, db_session: SessionDep, queue: QueueDep
) -> JobOut:
    job, _ = service.request_scan(user.id, library_id, db_session=db_session, queue=queue)
    return JobOut.from_model(job)


@router.delete(
    "/{library_id}",
    status_code=204,
    response_class=Response,
    summary="Forget a library: its images leave the index; its files are never touched",
    responses=errors(404),
)
def delete_library(
    library_id: LibraryId, user: CurrentUser, db_session: SessionDep, store: StoreDep
) -> Response:
    service.delete_library(user.id, library_id, db_session=db_session, store=store)
    return Response(status_code=204)
