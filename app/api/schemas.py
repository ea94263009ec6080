"""HTTP request/response schemas (pydantic v2), with OpenAPI examples."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
)

from app.config import MAX_CONCEPT_IDS
from app.models import ConceptExample, ConceptVerdict, Image, Job, Library
from app.text import check_path_text, clean_text

_IMAGE_ID = "6f1c7a2e-3b7d-4a53-9a51-2f0c8f1b9d10"
_JOB_ID = "0b7e4a91-5c2d-4d8e-8a43-7d6b1e9f2c33"
_TS = "2025-06-01T12:00:00Z"


# -- input types: every string and date-time a request brings in passes through one of these --

CleanStr = Annotated[str, AfterValidator(clean_text)]
"""Valid UTF-8 without NUL (else 422), in NFKC (app/text.py)."""

ID_MAX_CHARS = 64
ObjectId = Annotated[CleanStr, Field(max_length=ID_MAX_CHARS, description="an id (a UUID)")]

CURSOR_PATTERN = r"^[A-Za-z0-9_=-]*$"
CURSOR_MAX_CHARS = 200
CURSOR_DOC = (
    "opaque: the `next_cursor` of the previous page, passed back unchanged (URL-safe base64, "
    f"at most {CURSOR_MAX_CHARS} characters); anything else is a 422 `invalid_cursor`"
)


def _as_utc(value: datetime) -> datetime:
    # A date-time without a zone is taken as UTC; a date alone is midnight UTC (pydantic
    # parses "2025-01-01" as that naive date-time).
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError as e:  # year 1 at UTC+1, year 9999 at UTC-1
        raise ValueError("the date-time is out of range once converted to UTC") from e


def _iso_text(value: object) -> object:
    """Only text is a date-time here: pydantic's lax mode also reads a number as Unix time, so
    `0` was 1970 rather than the documented 422."""
    if isinstance(value, str | datetime):
        return value
    raise ValueError("must be an ISO 8601 date or date-time, as text")


UtcDateTime = Annotated[datetime, BeforeValidator(_iso_text), AfterValidator(_as_utc)]
"""ISO 8601; without a zone it is UTC, a date alone is midnight UTC."""


class ErrorBody(BaseModel):
    """What went wrong: a stable `code`, a sentence for people, optional structured `detail`."""

    code: str = Field(description="stable, machine-readable (snake_case)")
    message: str = Field(description="for people; may change between versions")
    detail: Any = Field(None, description="optional structured data; absent when there is none")


class ErrorResponse(BaseModel):
    """The one shape of every error response."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"error": {"code": "not_found", "message": "image not found"}},
                {
                    "error": {
                        "code": "invalid_image",
                        "message": "1 of 2 file(s) rejected, nothing was stored. #1 a.jpg: ...",
                        "detail": {
                            "files": [
                                {
                                    "index": 1,
                                    "filename": "a.jpg",
                                    "code": "invalid_image",
                                    "message": "the file is empty (0 bytes)",
                                }
                            ]
                        },
                    }
                },
            ]
        }
    )

    error: ErrorBody


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting the error shape for these statuses."""
    return {status: {"model": ErrorResponse} for status in statuses}


class ImageOut(BaseModel):
    """A library image."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": _IMAGE_ID,
                    "filename": "beach.jpg",
                    "mime": "image/jpeg",
                    "size_bytes": 482113,
                    "width": 1600,
                    "height": 1200,
                    "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                    "embedded": False,
                    "taken_at": "2024-08-14T09:21:05Z",
                    "created_at": _TS,
                    "file_url": f"/images/{_IMAGE_ID}/file",
                    "thumbnail_url": f"/images/{_IMAGE_ID}/thumbnail",
                }
            ]
        }
    )

    id: str
    filename: str | None = Field(description="base name the client sent, for display only")
    mime: str
    size_bytes: int
    width: int = Field(description="pixels, after EXIF orientation")
    height: int
    sha256: str = Field(description="hex digest of the original bytes")
    embedded: bool = Field(description="true once the embed job has indexed it for search")
    taken_at: datetime = Field(
        description="when the photo was taken: EXIF DateTimeOriginal, else the file time sent "
        "with the upload (`modified_at`), else the upload time"
    )
    created_at: datetime = Field(description="when it was uploaded")
    file_url: str
    thumbnail_url: str
    library_id: str | None = Field(
        None, description="the library it is indexed from in place; null for an upload"
    )
    path: str | None = Field(None, description="the original file's path (library images)")
    embed_error: str | None = Field(
        None,
        description="why its file could not be read or decoded for embedding (swapped, "
        "damaged, gone since it was validated): not retried until the file changes (a rescan "
        "sees it; for an upload, the same bytes sent again) or POST /index/rebuild; null "
        "when nothing failed",
    )

    @classmethod
    def from_model(cls, image: Image) -> ImageOut:
        """Build from the ORM row."""
        return cls(
            id=image.id,
            filename=image.original_filename,
            mime=image.mime,
            size_bytes=image.size_bytes,
            width=image.width,
            height=image.height,
            sha256=image.sha256,
            # Set together with the embedding; reading it does not load the 2-4 KB vector.
            embedded=image.embedding_model is not None,
            taken_at=image.taken_at,
            created_at=image.created_at,
            file_url=f"/images/{image.id}/file",
            thumbnail_url=f"/images/{image.id}/thumbnail",
            library_id=image.library_id,
            path=image.source_path,
            embed_error=image.embed_error,
        )


class UploadedImageOut(ImageOut):
    """An image in an upload's answer."""

    duplicate: bool = Field(description="the user already had this content; nothing new stored")


class JobError(BaseModel):
    """Why a job failed."""

    code: str
    message: str


class JobOut(BaseModel):
    """A background job a client can poll at GET /jobs/{id}."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": _JOB_ID,
                    "kind": "embed_images",
                    "state": "queued",
                    "progress": 0.0,
                    "error": None,
                    "created_at": _TS,
                    "started_at": None,
                    "finished_at": None,
                }
            ]
        }
    )

    id: str
    kind: str = Field(description="embed_images | train_concept | rebuild_index")
    state: str = Field(description="queued | running | succeeded | failed")
    progress: float = Field(ge=0, le=1)
    error: JobError | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @classmethod
    def from_model(cls, job: Job) -> JobOut:
        """Build from the ORM row."""
        error = None
        if job.error_code is not None:
            error = JobError(code=job.error_code, message=job.error_message or "")
        return cls(
            id=job.id,
            kind=job.kind,
            state=job.state,
            progress=job.progress,
            error=error,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )


class UploadResponse(BaseModel):
    """Answer to POST /images: the images in request order, and the job embedding the new ones."""

    images: list[UploadedImageOut]
    job: JobOut | None = Field(
        description="embeds the images not embedded yet; null when all were already embedded"
    )


class ImagePage(BaseModel):
    """One page of GET /images; pass `next_cursor` back as `cursor` for the next page."""

    items: list[ImageOut]
    next_cursor: str | None = Field(description="null on the last page")


class SearchFiltersIn(BaseModel):
    """Only images matching every given condition."""

    model_config = ConfigDict(extra="forbid")

    created_after: UtcDateTime | None = Field(
        None,
        description="uploaded at or after (ISO 8601; without a zone UTC, a date alone midnight)",
    )
    created_before: UtcDateTime | None = Field(None, description="uploaded before (as above)")
    taken_after: UtcDateTime | None = Field(
        None,
        description="taken at or after (the image's `taken_at`: EXIF DateTimeOriginal, else the "
        "file time sent with the upload, else the upload time; same format as above)",
    )
    taken_before: UtcDateTime | None = Field(None, description="taken before (as above)")
    mime: list[Annotated[CleanStr, Field(max_length=100)]] = Field(
        default_factory=list, max_length=20, description="e.g. ['image/jpeg']"
    )


Q_DOC = (
    "what to look for, at least one letter (limits.max_query_chars characters at most, and it "
    "must fit the model's 77-token context); your concepts' names personalise it"
)
# The maxima (the configured limits) are filled into the schema by app/api/openapi.py; the
# search service enforces them (422 invalid_k / invalid_offset / query_too_long).
K_DOC = "hits per page, 1 to limits.max_k"
OFFSET_DOC = "hits to skip (for the next page), 0 to limits.max_offset"


class SearchRequest(BaseModel):
    """POST /search: a query with explicit concepts and filters."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "q": "Fido at the beach",
                    "k": 20,
                    "offset": 0,
                    "personalize": True,
                    "concept_ids": [],
                    "filters": {"created_after": "2025-01-01T00:00:00Z", "mime": ["image/jpeg"]},
                }
            ]
        },
    )

    q: CleanStr = Field(description=Q_DOC)
    # Strict: in JSON 5.0, "5" and true are not integers, and 0 is not a boolean.
    k: StrictInt = Field(20, ge=1, description=K_DOC)
    offset: StrictInt = Field(0, ge=0, description=OFFSET_DOC)
    personalize: StrictBool = Field(True, description="false = plain CLIP, for comparison")
    concept_ids: list[ObjectId] = Field(
        default_factory=list,
        max_length=MAX_CONCEPT_IDS,
        description=f"concepts to apply even if the query does not name them (at most "
        f"{MAX_CONCEPT_IDS})",
    )
    filters: SearchFiltersIn | None = None


class SearchConceptOut(BaseModel):
    """A concept the search recognised."""

    id: str
    name: str
    version: int | None = Field(description="adapter version applied; null if none could be")
    mentioned: bool = Field(description="named in the query text (vs. given in concept_ids)")
    applied: bool = Field(description="its adapter personalised the text encoder")


class SearchHitOut(BaseModel):
    """One ranked image."""

    rank: int = Field(description="1-based rank over the whole result")
    score: float = Field(description="cosine similarity of query and image embeddings")
    image: ImageOut


class SearchResponse(BaseModel):
    """Ranked hits and how the query was understood."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "query": "Fido at the beach",
                    "rewritten": "sks dog at the beach",
                    "personalized": True,
                    "model": "ViT-B-32/openai@3f1a9c0d2b7e",
                    "concepts": [
                        {
                            "id": "2d0f3c4e-1a9b-4c7d-8e6f-5a4b3c2d1e0f",
                            "name": "Fido",
                            "version": 1,
                            "mentioned": True,
                            "applied": True,
                        }
                    ],
                    "hits": [],
                    "k": 20,
                    "offset": 0,
                    "indexed": 1834,
                    "pending": 0,
                    "reranked": False,
                    "warnings": [],
                }
            ]
        }
    )

    query: str
    rewritten: str = Field(description="the text that was encoded, concept names replaced")
    personalized: bool = Field(description="at least one concept adapter was applied")
    model: str = Field(description="id of the model that served this search")
    concepts: list[SearchConceptOut]
    hits: list[SearchHitOut]
    k: int
    offset: int
    indexed: int = Field(description="images in your searchable index")
    pending: int = Field(
        description="images not yet embedded by the serving model (those whose file could not "
        "be read are not counted: GET /index `failed`)"
    )
    reranked: bool = Field(
        False,
        description="concepts named: the top hits were re-ranked by where each concept best "
        "matches a region of the image (its crops, the boxes pooled from its one pass, or both); "
        "scores are then cosine + weighted region match, not cosines",
    )
    warnings: list[str]


class EmbedTextRequest(BaseModel):
    """POST /embed/text: a query to encode the way search encodes it."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"q": "Fido at the beach", "personalize": True, "concept_ids": []}]
        },
    )

    q: CleanStr = Field(description=Q_DOC)
    personalize: StrictBool = Field(True, description="false = plain CLIP, for comparison")
    concept_ids: list[ObjectId] = Field(
        default_factory=list,
        max_length=MAX_CONCEPT_IDS,
        description=f"concepts to apply even if the query does not name them (at most "
        f"{MAX_CONCEPT_IDS})",
    )


class EmbedTextResponse(BaseModel):
    """The query's embedding with your concepts applied: rank your own index of the same
    model's image embeddings by its dot product (cosine: both are unit vectors)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "query": "Fido at the beach",
                    "rewritten": "sks dog at the beach",
                    "personalized": True,
                    "model": "ViT-B-32/openai@3f1a9c0d2b7e",
                    "dim": 3,
                    "embedding": [0.6, 0.0, 0.8],
                    "concepts": [
                        {
                            "id": "2d0f3c4e-1a9b-4c7d-8e6f-5a4b3c2d1e0f",
                            "name": "Fido",
                            "version": 1,
                            "mentioned": True,
                            "applied": True,
                        }
                    ],
                    "warnings": [],
                }
            ]
        }
    )

    query: str
    rewritten: str = Field(description="the text that was encoded, concept names replaced")
    personalized: bool = Field(description="at least one concept adapter was applied")
    model: str = Field(
        description="id of the model that encoded it: only image embeddings of this model "
        "(name/pretrained) are comparable"
    )
    dim: int = Field(description="length of `embedding`")
    embedding: list[float] = Field(description="unit-length float32 vector, as search uses it")
    concepts: list[SearchConceptOut]
    warnings: list[str]


# -- concepts and jobs -----------------------------------------------------------------------

_CONCEPT_ID = "2d0f3c4e-1a9b-4c7d-8e6f-5a4b3c2d1e0f"


class ConceptOut(BaseModel):
    """A personal concept and the state of its POLAR adapter."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": _CONCEPT_ID,
                    "name": "Fido",
                    "category": "dog",
                    "state": "ready",
                    "version": 1,
                    "token": "sks",
                    "placeholder": "sks dog",
                    "example_count": 5,
                    "metrics": {
                        "final_loss": 0.0012,
                        "train_seconds": 0.41,
                        "steps": 500,
                        "lam": 0.1,
                        "n_photos": 5,
                        "model_id": "ViT-B-32/openai@3f1a9c0d2b7e",
                        "retention_method": "caption_r@10",
                        "retention_base": 0.91,
                        "retention_adapted": 0.9,
                    },
                    "retention_score": 0.989,
                    "retention_flagged": False,
                    "job_id": _JOB_ID,
                    "created_at": _TS,
                    "updated_at": _TS,
                }
            ]
        }
    )

    id: str
    name: str
    category: str | None = Field(description="coarse class; part of the placeholder phrase")
    state: str = Field(description="training | ready | failed")
    version: int = Field(description="bumped by every retraining (new photos, new category)")
    token: str = Field(description="placeholder token the query rewriter substitutes")
    placeholder: str = Field(description='what a query naming the concept encodes: "sks dog"')
    example_count: int = Field(description="training photos, all versions together")
    metrics: dict[str, Any] | None = Field(
        description="of the current version once trained: final_loss, train_seconds, steps, lam, "
        "n_photos, model_id, retention_method, retention_base, retention_adapted"
    )
    retention_score: float | None = Field(
        description="general retrieval kept with this concept's update (1.0 = all of it)"
    )
    retention_flagged: bool = Field(
        description="the update costs more general retrieval than training.retention_max_drop"
    )
    job_id: str | None = Field(description="the job training the current version (GET /jobs/{id})")
    created_at: datetime
    updated_at: datetime


class ConceptPage(BaseModel):
    """One page of GET /concepts; pass `next_cursor` back as `cursor` for the next page."""

    items: list[ConceptOut]
    next_cursor: str | None = Field(description="null on the last page")


class ConceptExampleOut(BaseModel):
    """One photo a concept was taught from."""

    id: str
    concept_id: str
    mime: str
    width: int = Field(description="pixels, after EXIF orientation")
    height: int
    sha256: str = Field(description="hex digest of the original bytes")
    version_added: int = Field(description="the concept version this photo came with")
    created_at: datetime
    file_url: str
    thumbnail_url: str

    @classmethod
    def from_model(cls, example: ConceptExample) -> ConceptExampleOut:
        """Build from the ORM row."""
        base = f"/concepts/{example.concept_id}/examples/{example.id}"
        return cls(
            id=example.id,
            concept_id=example.concept_id,
            mime=example.mime,
            width=example.width,
            height=example.height,
            sha256=example.sha256,
            version_added=example.version_added,
            created_at=example.created_at,
            file_url=f"{base}/file",
            thumbnail_url=f"{base}/thumbnail",
        )


class ConceptExampleList(BaseModel):
    """GET /concepts/{id}/examples: every photo of the concept (at most training.max_photos)."""

    items: list[ConceptExampleOut]


class ConceptJobResponse(BaseModel):
    """A concept after a change, and the job retraining it (null when nothing retrains)."""

    concept: ConceptOut
    job: JobOut | None = Field(description="trains the new version; null if no retraining")


class ConceptPatch(BaseModel):
    """PATCH /concepts/{id}: rename, and/or change the category (which retrains)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"name": "Rex"}, {"category": "puppy"}]}
    )

    name: CleanStr | None = Field(None, description="new name (1-64 characters, a letter or digit)")
    category: CleanStr | None = Field(
        None, description="new category, or null to drop it; a change retrains the concept"
    )


class JobLinks(BaseModel):
    """Where the objects a job works on can be fetched."""

    concept: str | None = Field(None, description="/concepts/{id} of a train_concept job")
    images: list[str] | None = Field(None, description="/images/{id} of an embed_images job")


class JobDetail(JobOut):
    """A job with its attempts and links to what it works on (GET /jobs, GET /jobs/{id})."""

    attempts: int = Field(description="runs started so far (retries after transient errors)")
    updated_at: datetime
    links: JobLinks

    @classmethod
    def from_job(cls, job: Job) -> JobDetail:
        """Build from the ORM row; links come from the job's payload."""
        payload = job.payload or {}
        links = JobLinks()
        concept_id = payload.get("concept_id")
        if isinstance(concept_id, str):
            links.concept = f"/concepts/{concept_id}"
        image_ids = payload.get("image_ids")
        if isinstance(image_ids, list):
            links.images = [f"/images/{i}" for i in image_ids if isinstance(i, str)]
        return cls(
            **JobOut.from_model(job).model_dump(),
            attempts=job.attempts,
            updated_at=job.updated_at,
            links=links,
        )


class JobPage(BaseModel):
    """One page of GET /jobs, newest first; pass `next_cursor` back as `cursor`."""

    items: list[JobDetail]
    next_cursor: str | None = Field(description="null on the last page")


class IndexOut(BaseModel):
    """How much of your library the serving model can search (GET /index)."""

    model: str = Field(description="the serving model's id")
    images: int = Field(description="images in your library")
    embedded: int = Field(description="embedded by the serving model: searchable")
    pending: int = Field(
        description="not (yet) searchable: being embedded, or from another model (a rebuild "
        "embeds them)"
    )
    failed: int = Field(
        0,
        description="not searchable because their file could not be read or decoded when it "
        "was embedded (each image says why: `embed_error`); not retried until the file changes "
        "or POST /index/rebuild",
    )
    region_layout: str = Field(
        description="regions embedded per image for queries naming concepts, and how: five = "
        "five crops, five-pooled = five boxes pooled from the image's one pass, five-both = "
        "the two (none = off)"
    )
    with_regions: int = Field(description="searchable images that also have those regions")
    rebuild_job: JobOut | None = Field(
        description="a queued or running rebuild (POST /index/rebuild); poll /jobs/{id}"
    )


class RebuildOut(BaseModel):
    """The rebuild job POST /index/rebuild queued, or the one already queued or running."""

    job: JobOut
    created: bool = Field(description="false when an open rebuild job was returned instead")


class LibraryIn(BaseModel):
    """A folder to index in place."""

    # Taken exactly as given (checked, never normalised: file names are bytes; app/text.py).
    path: Annotated[str, AfterValidator(check_path_text)] = Field(
        min_length=1, max_length=4096, description="absolute path under an allowed root"
    )


class LibraryOut(BaseModel):
    """A folder indexed in place, with its last scan's report."""

    id: str
    path: str
    created_at: datetime
    scanned_at: datetime | None = None
    report: dict[str, Any] | None = Field(
        None,
        description="the last finished scan: added, changed, moved, unchanged, removed, "
        "skipped_count and skipped ([{path, reason}]); failed_count and failed ([{path, "
        "reason}]): files of the library that passed the scan but could not be read or decoded "
        "when they were embedded (not searchable; read again once they change); kept_count: "
        "files and folders the scan could not look at (an I/O error, no permission) whose "
        "indexed images were kept; not_pruned: why images the scan did not see were not "
        "removed (the folder was empty, as an unmounted share's mount point is, or went away), "
        "null when they were; refused_count: folders inside it not entered because they are, "
        "under another name (a bind mount, another case on a case-insensitive share), another "
        "user's library or the service's data folder (what was indexed there is removed)",
    )
    watch_error: str | None = Field(
        None,
        description="why the folder watcher does not watch this library now (its folder is a "
        "link now, missing, or cannot be listed; periodic rescans still run); null while it is "
        "watched, or when watching is off",
    )
    job: JobOut | None = Field(None, description="the scan this request queued, if any")

    @classmethod
    def from_model(cls, library: Library, job: Job | None = None) -> LibraryOut:
        return cls(
            id=library.id,
            path=library.path,
            created_at=library.created_at,
            scanned_at=library.scanned_at,
            report=library.report,
            watch_error=library.watch_error,
            job=JobOut.from_model(job) if job is not None else None,
        )


class LibraryList(BaseModel):
    items: list[LibraryOut]
    roots: list[str] = Field(
        default_factory=list,
        description="folders under which libraries may be added (POLAR_LIBRARY__ROOTS); "
        "empty = this server allows no folders",
    )


# -- albums and feedback (docs/ALBUMS.md) ----------------------------------------------------

CONFIDENCE_DOC = (
    "the score on the concept's own scale: 0 = as a typical photo of your library scores, 1 = "
    "as a typical photo of the concept scores (its own photos, each left out in turn); photos "
    "from `cutoff` up are in the album. null: the photo is not embedded yet, or the concept "
    "has no trained version"
)
REASON_DOC = (
    "why it is in the album: confirmed (you said it is), taught (one of the concept's photos), "
    "matched (its confidence reached the cut-off)"
)


class AlbumCalibrationOut(BaseModel):
    """The concept's score scale under the library as indexed now."""

    own: float = Field(description="mean leave-one-out score of the concept's own photos")
    library: float = Field(
        description="the median score of your library (the photos known to show the concept "
        "left out)"
    )


class AlbumPhotoOut(BaseModel):
    """A photo in a concept's album."""

    image: ImageOut
    score: float | None = Field(
        description="the best cosine between the concept's photos (their mean) and the photo "
        "or one of its regions"
    )
    confidence: float | None = Field(description=CONFIDENCE_DOC)
    reason: str = Field(description=REASON_DOC)
    verdict: str | None = Field(description="your current mark on it: confirmed, or null")


class AlbumPage(BaseModel):
    """One page of GET /concepts/{id}/photos; pass `next_cursor` back as `cursor` (same order)."""

    concept_id: str
    version: int | None = Field(description="the trained version that scored it; null: none yet")
    cutoff: float = Field(
        description="the confidence from which a photo is in this concept's album: the "
        "concept's own, higher when many of your library's photos score close to its own "
        'photos (its look-alikes), and learned from its "not it" marks within '
        "MAX_LEARNED_SHIFT (docs/ALBUMS.md)"
    )
    calibration: AlbumCalibrationOut | None
    total: int = Field(description="photos in the whole album")
    items: list[AlbumPhotoOut]
    next_cursor: str | None = Field(description="null on the last page")
    warnings: list[str] = Field(default_factory=list)


class VerdictIn(BaseModel):
    """PUT /concepts/{id}/photos/{image_id}/verdict."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"verdict": "rejected"}]}
    )

    verdict: Literal["confirmed", "rejected"] = Field(
        description='confirmed = "this is it" (an example for the next version, always in the '
        'album); rejected = "not it" (a negative for the next version, never in the album)'
    )


class VerdictOut(BaseModel):
    """One mark of a photo for a concept."""

    id: str
    concept_id: str
    image_id: str
    verdict: str
    concept_version: int = Field(description="the concept's version when it was marked")
    created_at: datetime
    ended_at: datetime | None = Field(description="when it was replaced or undone; null: active")

    @classmethod
    def from_model(cls, row: ConceptVerdict) -> VerdictOut:
        """Build from the ORM row."""
        return cls(
            id=row.id,
            concept_id=row.concept_id,
            image_id=row.image_id,
            verdict=row.verdict,
            concept_version=row.concept_version,
            created_at=row.created_at,
            ended_at=row.ended_at,
        )


class VerdictResponse(BaseModel):
    """A concept after a mark or its undo, and the job training its next version."""

    concept: ConceptOut
    mark: VerdictOut | None = Field(description="the photo's active mark; null after an undo")
    job: JobOut | None = Field(description="trains the next version; null when nothing changed")


class VerdictPage(BaseModel):
    """GET /concepts/{id}/verdicts: every mark, ended ones too, newest first."""

    items: list[VerdictOut]
    next_cursor: str | None = Field(description="null on the last page")


class ImageConceptOut(BaseModel):
    """A concept a photo shows."""

    concept_id: str
    name: str
    score: float | None
    confidence: float | None = Field(description=CONFIDENCE_DOC)
    reason: str = Field(description=REASON_DOC)
    verdict: str | None


class ImageConceptList(BaseModel):
    """GET /images/{id}/concepts: your concepts whose album holds the photo, most confident
    first."""

    items: list[ImageConceptOut]
