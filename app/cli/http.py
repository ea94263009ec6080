"""A small typed HTTP client for the service's API (what the `polar` CLI's client commands use).

It depends on httpx and the standard library only, so it can be copied into other tools. Every
non-2xx answer becomes a `PolarAPIError` carrying the server's error shape
`{"error": {"code", "message", "detail"}}`.
"""

from __future__ import annotations

import mimetypes
import os
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
# What the server accepts (app/storage.ALLOWED_FORMATS), by the names files usually carry.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
)
DONE_STATES = frozenset({"succeeded", "failed"})
DEMO_MODEL_NAME = "polar-demo"  # app.ml.model.DEMO_MODEL_NAME (this module imports no app code)


class PolarAPIError(Exception):
    """The service answered with an error (any non-2xx status)."""

    def __init__(self, status: int, code: str, message: str, detail: Any = None) -> None:
        super().__init__(f"{message} ({code})")
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail

    @classmethod
    def from_response(cls, response: httpx.Response) -> PolarAPIError:
        """Parse the error shape; a body without it (a proxy's HTML page) still gives an error."""
        try:
            error = response.json()["error"]
            return cls(
                response.status_code, str(error["code"]), str(error["message"]), error.get("detail")
            )
        except (ValueError, KeyError, TypeError):
            text = response.text.strip().splitlines()[0][:200] if response.text.strip() else ""
            message = text or response.reason_phrase or "unexpected response"
            return cls(response.status_code, f"http_{response.status_code}", message)


# -- what the API returns, as typed values --------------------------------------------------


@dataclass(frozen=True)
class Job:
    """A background job (GET /jobs/{id})."""

    id: str
    kind: str
    state: str  # queued | running | succeeded | failed
    progress: float  # 0..1
    error_code: str | None = None
    error_message: str | None = None

    @property
    def done(self) -> bool:
        return self.state in DONE_STATES

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Job:
        error = d.get("error") or {}
        return cls(
            d["id"],
            d["kind"],
            d["state"],
            float(d["progress"]),
            error.get("code"),
            error.get("message"),
        )


@dataclass(frozen=True)
class UploadedImage:
    """One uploaded file and the library image it became."""

    path: Path  # the local file it came from
    id: str
    sha256: str
    duplicate: bool  # the library already had these bytes; nothing new was stored
    embedded: bool


@dataclass(frozen=True)
class RejectedFile:
    """A local file the server refused (or the client could not read)."""

    path: Path
    code: str
    message: str


@dataclass(frozen=True)
class UploadBatch:
    """The outcome of one POST /images request."""

    number: int  # 1-based
    images: list[UploadedImage]
    job: Job | None  # embeds the new images; None when all were embedded already
    rejected: list[RejectedFile]  # dropped from this batch before it was accepted


@dataclass
class UploadResult:
    """All batches of an upload together."""

    batches: list[UploadBatch] = field(default_factory=list)

    @property
    def images(self) -> list[UploadedImage]:
        return [i for b in self.batches for i in b.images]

    @property
    def job_ids(self) -> list[str]:
        return [b.job.id for b in self.batches if b.job is not None]

    @property
    def rejected(self) -> list[RejectedFile]:
        return [r for b in self.batches for r in b.rejected]


@dataclass(frozen=True)
class Concept:
    """A personal concept and the state of its adapter (GET /concepts/{id})."""

    id: str
    name: str
    category: str | None
    state: str  # training | ready | failed
    version: int
    placeholder: str
    example_count: int
    metrics: dict[str, Any] | None
    retention_score: float | None
    retention_flagged: bool
    job_id: str | None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Concept:
        return cls(
            id=d["id"],
            name=d["name"],
            category=d.get("category"),
            state=d["state"],
            version=int(d["version"]),
            placeholder=d["placeholder"],
            example_count=int(d["example_count"]),
            metrics=d.get("metrics"),
            retention_score=d.get("retention_score"),
            retention_flagged=bool(d.get("retention_flagged")),
            job_id=d.get("job_id"),
        )


@dataclass(frozen=True)
class ConceptPhoto:
    """One photo a concept was taught from (GET /concepts/{id}/examples)."""

    id: str
    mime: str
    width: int
    height: int
    version_added: int
    file_url: str
    thumbnail_url: str

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ConceptPhoto:
        return cls(
            d["id"],
            d["mime"],
            int(d["width"]),
            int(d["height"]),
            int(d["version_added"]),
            d["file_url"],
            d["thumbnail_url"],
        )


def confidence_words(confidence: float | None, cutoff: float) -> str:
    """An album photo's confidence in words (the web UI says the same: static/js/albums.js)."""
    if confidence is None:
        return "not scored yet"
    if confidence >= 1.0:
        return "as sure as its own photos"
    if confidence >= cutoff + (1.0 - cutoff) / 2:
        return "likely"
    if confidence >= cutoff:
        return "possibly"
    return "unlikely by its look"


@dataclass(frozen=True)
class AlbumPhoto:
    """A photo in a concept's album."""

    image_id: str
    filename: str | None
    path: str | None
    file_url: str
    score: float | None
    confidence: float | None
    reason: str  # confirmed, taught, matched
    verdict: str | None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AlbumPhoto:
        image = d["image"]
        return cls(
            image_id=image["id"],
            filename=image.get("filename"),
            path=image.get("path"),
            file_url=image["file_url"],
            score=d.get("score"),
            confidence=d.get("confidence"),
            reason=d["reason"],
            verdict=d.get("verdict"),
        )


@dataclass(frozen=True)
class Library:
    """A folder indexed in place, and its last scan's report (None before the first ends)."""

    id: str
    path: str
    scanned_at: str | None
    report: dict[str, Any] | None
    job: Job | None  # the scan the request that returned it queued
    watch_error: str | None = None  # why the folder watcher does not watch it now

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Library:
        job = d.get("job")
        return cls(
            id=d["id"],
            path=d["path"],
            scanned_at=d.get("scanned_at"),
            report=d.get("report"),
            job=Job.from_json(job) if job else None,
            watch_error=d.get("watch_error"),
        )


@dataclass(frozen=True)
class IndexStatus:
    """GET /index: how much of the library the serving model can search."""

    model: str
    images: int
    embedded: int
    pending: int
    region_layout: str
    with_regions: int
    rebuild_job: Job | None
    failed: int = 0  # files that could not be read when embedded (a server before 0006: 0)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> IndexStatus:
        job = d.get("rebuild_job")
        return cls(
            model=d["model"],
            images=int(d["images"]),
            embedded=int(d["embedded"]),
            pending=int(d["pending"]),
            region_layout=d["region_layout"],
            with_regions=int(d["with_regions"]),
            rebuild_job=Job.from_json(job) if job else None,
            failed=int(d.get("failed", 0)),
        )


@dataclass(frozen=True)
class SearchConcept:
    """A concept the search recognised in the query."""

    id: str
    name: str
    version: int | None
    mentioned: bool
    applied: bool


@dataclass(frozen=True)
class SearchHit:
    """One ranked image."""

    rank: int
    score: float
    image_id: str
    filename: str | None
    thumbnail_url: str
    file_url: str
    path: str | None = None  # a folder library's photo: where its file is on the server


@dataclass(frozen=True)
class SearchResult:
    """Ranked hits and how the server understood the query."""

    query: str
    rewritten: str
    personalized: bool
    model: str
    concepts: list[SearchConcept]
    hits: list[SearchHit]
    indexed: int
    pending: int
    warnings: list[str]

    @property
    def demo_model(self) -> bool:
        """Whether the bundled synthetic demo model answered (it knows nothing of real photos)."""
        return self.model.split("/", 1)[0] == DEMO_MODEL_NAME

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SearchResult:
        hits = [
            SearchHit(
                h["rank"],
                float(h["score"]),
                h["image"]["id"],
                h["image"].get("filename"),
                h["image"]["thumbnail_url"],
                h["image"]["file_url"],
                h["image"].get("path"),
            )
            for h in d["hits"]
        ]
        concepts = [
            SearchConcept(c["id"], c["name"], c.get("version"), c["mentioned"], c["applied"])
            for c in d["concepts"]
        ]
        return cls(
            d["query"],
            d["rewritten"],
            d["personalized"],
            d["model"],
            concepts,
            hits,
            d["indexed"],
            d["pending"],
            list(d.get("warnings", [])),
        )


# -- local files ----------------------------------------------------------------------------


def is_image_path(path: Path) -> bool:
    """By name only: the server decides by content, this just keeps other files at home."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def collect_images(paths: Iterable[Path], *, recursive: bool) -> tuple[list[Path], list[Path]]:
    """(image files, skipped paths) from files and folders, each file once, in a stable order.

    Skipped: files without an image extension, and sub-folders when not `recursive`. Hidden
    files and folders (".name") inside a folder are passed over silently, as `ls` does.
    Raises FileNotFoundError for a path that does not exist.
    """
    images: list[Path] = []
    skipped: list[Path] = []
    seen: set[Path] = set()

    def take(p: Path) -> None:
        key = p.resolve()
        if key in seen:
            return
        seen.add(key)
        (images if is_image_path(p) else skipped).append(p)

    for path in paths:
        if path.is_file():
            take(path)
        elif path.is_dir():
            entries = path.rglob("*") if recursive else path.iterdir()
            for entry in sorted(entries):
                if any(part.startswith(".") for part in entry.relative_to(path).parts):
                    continue
                if entry.is_file():
                    take(entry)
                elif entry.is_dir() and not recursive:
                    skipped.append(entry)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return images, skipped


def _mime(path: Path) -> str:
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def wire_name(path: Path) -> str:
    """The file name sent for `path`: its name, with bytes that are not UTF-8 (a Latin-1 name
    from an old share, which Python holds as surrogates) replaced by U+FFFD (`caf\ufffd.jpg`).
    The server takes only UTF-8 names (and reads a backslash as a Windows path's separator, so
    `\\xe9` escapes would lose the name's start); the name is for display only."""
    return os.fsencode(path.name).decode("utf-8", "replace")


def _file_parts(stack: ExitStack, paths: Sequence[Path]) -> list[tuple[str, Any]]:
    """The multipart `files` parts for `paths`, each opened on `stack`."""
    return [("files", (wire_name(p), stack.enter_context(p.open("rb")), _mime(p))) for p in paths]


# -- the client -----------------------------------------------------------------------------


class PolarClient:
    """The service's API over httpx: `PolarClient("http://host:8000", "polar_...")`.

    `transport` swaps httpx's network layer (httpx.MockTransport in tests). `http` uses an
    existing httpx.Client as is (e.g. FastAPI's TestClient, which also runs the app's lifespan);
    the client then neither owns nor closes it and `base_url` is only used in messages.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str = "",
        transport: httpx.BaseTransport | None = None,
        *,
        http: httpx.Client | None = None,
        timeout: float = 120.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._owns_http = http is None
        self._http = http or httpx.Client(
            base_url=self.base_url, transport=transport, timeout=timeout
        )

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> PolarClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON answer; raises PolarAPIError on any non-2xx status."""
        response = self._http.request(method, path, headers=self._headers, **kwargs)
        if not response.is_success:
            raise PolarAPIError.from_response(response)
        return response.json() if response.content else None

    # -- images --

    def upload_images(
        self,
        paths: Sequence[Path],
        batch_size: int = 50,
        *,
        skip_rejected: bool = False,
        on_batch: Callable[[UploadBatch], None] | None = None,
    ) -> UploadResult:
        """POST /images in batches of at most `batch_size` files (fewer if the server says so).

        The server takes or refuses a request whole. With `skip_rejected`, the files it names
        (and files that cannot be read here) are set aside and the rest of the batch is sent
        again; without it, the first refusal raises PolarAPIError.
        """
        assert batch_size >= 1, "batch_size must be at least 1"
        result = UploadResult()
        pending = list(paths)
        size = batch_size
        rejected: list[RejectedFile] = []
        while pending:
            batch = pending[:size]
            try:
                body = self._post_files(batch)
            except PolarAPIError as e:
                limit = _max_files(e)
                if limit is not None and 1 <= limit < len(batch):
                    size = limit  # the server's per-request limit is below ours
                    continue
                bad = _rejected_files(e, batch) if skip_rejected else {}
                if not bad:
                    raise
                rejected.extend(bad.values())
                pending = [p for i, p in enumerate(batch) if i not in bad] + pending[len(batch) :]
                continue
            except OSError as e:
                if not skip_rejected or e.filename is None:
                    raise
                bad_path = Path(e.filename)
                rejected.append(RejectedFile(bad_path, "unreadable_file", e.strerror or str(e)))
                pending = [p for p in pending if p != bad_path]
                continue
            images = [
                UploadedImage(path, d["id"], d["sha256"], bool(d["duplicate"]), d["embedded"])
                for path, d in zip(batch, body["images"], strict=True)
            ]
            job = Job.from_json(body["job"]) if body.get("job") else None
            done = UploadBatch(len(result.batches) + 1, images, job, rejected)
            result.batches.append(done)
            rejected = []
            pending = pending[len(batch) :]
            if on_batch is not None:
                on_batch(done)
        if rejected:  # every file of the last batch was refused
            result.batches.append(UploadBatch(len(result.batches) + 1, [], None, rejected))
            if on_batch is not None:
                on_batch(result.batches[-1])
        return result

    def _post_files(self, batch: Sequence[Path]) -> Any:
        with ExitStack() as stack:
            files = _file_parts(stack, batch)
            # When each photo was taken, if its EXIF does not say: the file's time here.
            times = [str(int(p.stat().st_mtime * 1000)) for p in batch]
            return self._request("POST", "/images", files=files, data={"modified_at": times})

    # -- jobs --

    def get_job(self, job_id: str) -> Job:
        return Job.from_json(self._request("GET", f"/jobs/{job_id}"))

    def wait_job(
        self,
        job_id: str,
        on_progress: Callable[[Job], None] | None = None,
        *,
        poll_interval: float = 0.25,
        timeout: float | None = None,
    ) -> Job:
        """Poll until the job succeeded or failed (it does not raise for a failed job)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job.done:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job.state} after {timeout:g} s")
            time.sleep(poll_interval)

    # -- concepts --

    def create_concept(
        self, name: str, category: str | None, photos: Sequence[Path]
    ) -> tuple[Concept, Job | None]:
        """POST /concepts: the concept (state `training`) and the job that trains it."""
        data = {"name": name} if category is None else {"name": name, "category": category}
        with ExitStack() as stack:
            files = _file_parts(stack, photos)
            body = self._request("POST", "/concepts", data=data, files=files)
        job = Job.from_json(body["job"]) if body.get("job") else None
        return Concept.from_json(body["concept"]), job

    def get_concept(self, concept_id: str) -> Concept:
        return Concept.from_json(self._request("GET", f"/concepts/{_seg(concept_id)}"))

    def list_concepts(self, page_size: int = 200) -> list[Concept]:
        """Every concept, oldest first (all pages)."""
        out: list[Concept] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": page_size}
            if cursor:
                params["cursor"] = cursor
            body = self._request("GET", "/concepts", params=params)
            out.extend(Concept.from_json(c) for c in body["items"])
            cursor = body.get("next_cursor")
            if not cursor:
                return out

    def concept_photos(self, concept_id: str) -> list[ConceptPhoto]:
        """GET /concepts/{id}/examples: the photos it was taught from."""
        body = self._request("GET", f"/concepts/{_seg(concept_id)}/examples")
        return [ConceptPhoto.from_json(p) for p in body["items"]]

    def update_concept(
        self, concept_id: str, *, name: str | None = None, category: str | bool | None = False
    ) -> tuple[Concept, Job | None]:
        """PATCH /concepts/{id}: a new `name` (no retraining) and/or a new `category` (a string,
        or None to drop it; retrains). `category=False` leaves it as it is. The job is None when
        nothing retrains."""
        body: dict[str, Any] = {} if name is None else {"name": name}
        if category is not False:
            body["category"] = category
        answer = self._request("PATCH", f"/concepts/{_seg(concept_id)}", json=body)
        job = Job.from_json(answer["job"]) if answer.get("job") else None
        return Concept.from_json(answer["concept"]), job

    def add_concept_photos(
        self, concept_id: str, photos: Sequence[Path] = (), image_ids: Sequence[str] = ()
    ) -> tuple[Concept, Job]:
        """POST /concepts/{id}/examples: local photos and/or library images; a new version."""
        with ExitStack() as stack:
            files = _file_parts(stack, photos)
            body = self._request(
                "POST",
                f"/concepts/{_seg(concept_id)}/examples",
                data={"image_ids": list(image_ids)} if image_ids else None,
                files=files or None,
            )
        return Concept.from_json(body["concept"]), Job.from_json(body["job"])

    def delete_concept(self, concept_id: str) -> None:
        self._request("DELETE", f"/concepts/{_seg(concept_id)}")

    # -- albums and feedback (docs/ALBUMS.md) --

    def concept_album(
        self, concept_id: str, *, order: str = "newest", limit: int | None = None
    ) -> tuple[dict[str, Any], list[AlbumPhoto]]:
        """GET /concepts/{id}/photos, every page (or the first `limit` photos): (the first
        page's body without its items, the photos)."""
        photos: list[AlbumPhoto] = []
        cursor: str | None = None
        head: dict[str, Any] = {}
        while True:
            params: dict[str, Any] = {"order": order, "limit": 200}
            if cursor:
                params["cursor"] = cursor
            body = self._request("GET", f"/concepts/{_seg(concept_id)}/photos", params=params)
            head = head or {k: v for k, v in body.items() if k != "items"}
            photos.extend(AlbumPhoto.from_json(p) for p in body["items"])
            cursor = body.get("next_cursor")
            if not cursor or (limit is not None and len(photos) >= limit):
                return head, photos[:limit] if limit is not None else photos

    def set_verdict(
        self, concept_id: str, image_id: str, verdict: str
    ) -> tuple[Concept, Job | None]:
        """PUT /concepts/{id}/photos/{image_id}/verdict: "confirmed" or "rejected"; the job
        training the next version (None when nothing retrains)."""
        body = self._request(
            "PUT",
            f"/concepts/{_seg(concept_id)}/photos/{_seg(image_id)}/verdict",
            json={"verdict": verdict},
        )
        job = Job.from_json(body["job"]) if body.get("job") else None
        return Concept.from_json(body["concept"]), job

    def undo_verdict(self, concept_id: str, image_id: str) -> tuple[Concept, Job | None]:
        """DELETE /concepts/{id}/photos/{image_id}/verdict; the job retraining the concept
        (None when the mark taught it nothing)."""
        body = self._request(
            "DELETE", f"/concepts/{_seg(concept_id)}/photos/{_seg(image_id)}/verdict"
        )
        job = Job.from_json(body["job"]) if body.get("job") else None
        return Concept.from_json(body["concept"]), job

    # -- libraries (folders indexed in place) --

    def add_library(self, path: str) -> Library:
        """POST /libraries: the folder (on the server) and its first scan job."""
        return Library.from_json(self._request("POST", "/libraries", json={"path": path}))

    def list_libraries(self) -> list[Library]:
        body = self._request("GET", "/libraries")
        return [Library.from_json(d) for d in body["items"]]

    def get_library(self, library_id: str) -> Library:
        return Library.from_json(self._request("GET", f"/libraries/{_seg(library_id)}"))

    def scan_library(self, library_id: str) -> Job:
        """POST /libraries/{id}/scan: the scan job (or the one already queued or running)."""
        return Job.from_json(self._request("POST", f"/libraries/{_seg(library_id)}/scan"))

    def remove_library(self, library_id: str) -> None:
        self._request("DELETE", f"/libraries/{_seg(library_id)}")

    # -- index --

    def index_status(self) -> IndexStatus:
        return IndexStatus.from_json(self._request("GET", "/index"))

    def rebuild_index(self) -> tuple[Job, bool]:
        """POST /index/rebuild: (the job, whether it was created rather than already open)."""
        body = self._request("POST", "/index/rebuild")
        return Job.from_json(body["job"]), bool(body["created"])

    # -- search --

    def search(
        self, q: str, k: int = 20, personalize: bool = True, *, offset: int = 0
    ) -> SearchResult:
        """GET /search: your concepts' names in `q` personalise it unless `personalize=False`."""
        params = {"q": q, "k": k, "offset": offset, "personalize": str(personalize).lower()}
        return SearchResult.from_json(self._request("GET", "/search", params=params))


def _seg(value: str) -> str:
    """An id as one URL path segment."""
    return quote(value, safe="")


def _max_files(error: PolarAPIError) -> int | None:
    """The server's per-request file limit, when that is what it refused."""
    if error.code != "too_many_files" or not isinstance(error.detail, dict):
        return None
    limit = error.detail.get("max_files")
    return limit if isinstance(limit, int) else None


def _rejected_files(error: PolarAPIError, batch: Sequence[Path]) -> dict[int, RejectedFile]:
    """Position in `batch` -> why, from an upload refusal's `detail.files`; {} if it has none."""
    files = error.detail.get("files") if isinstance(error.detail, dict) else None
    if not isinstance(files, list):
        return {}
    bad: dict[int, RejectedFile] = {}
    for f in files:
        index = f.get("index") if isinstance(f, dict) else None
        if not isinstance(index, int) or not 0 <= index < len(batch):
            return {}  # not a refusal we can map back to our files: let the caller raise
        bad[index] = RejectedFile(batch[index], str(f.get("code")), str(f.get("message")))
    return bad
