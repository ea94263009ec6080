"""Domain errors: what went wrong, in words a client can act on. No HTTP in here.

Every error carries a stable machine-readable `code` (snake_case, part of the API), a human
`message`, and optional JSON-serialisable `detail`. `app/api/errors.py` is the one place that
maps these classes to HTTP statuses; services and workers raise them without knowing about HTTP.
A subclass may be raised with a more specific `code` (`ValidationFailed(..., code="too_few")`);
the status follows the class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class DomainError(Exception):
    """Base of every error a client may see."""

    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        if code is not None:
            self.code = code


class NotFound(DomainError):
    """Unknown id, or an id owned by someone else (indistinguishable on purpose)."""

    code = "not_found"

    @classmethod
    def of(cls, resource: str) -> NotFound:
        """The one message for a missing or foreign `resource` (it must not echo ownership)."""
        return cls(f"{resource} not found")


class ValidationFailed(DomainError):
    """The request is well-formed HTTP but its content is unacceptable."""

    code = "validation_failed"


class InvalidImage(ValidationFailed):
    """Empty, truncated, corrupt, or not an image at all."""

    code = "invalid_image"


class ImageTooLarge(ValidationFailed):
    """Too many pixels (decompression-bomb guard), whatever the file size."""

    code = "image_too_large"


class TooManyFiles(ValidationFailed):
    """More files in one request than `limits.max_files_per_request`."""

    code = "too_many_files"


class InvalidCursor(ValidationFailed):
    """A pagination cursor this service did not issue."""

    code = "invalid_cursor"


class QueryTooLong(ValidationFailed):
    """The query does not fit the text encoder's context (77 tokens for CLIP)."""

    code = "query_too_long"


class Conflict(DomainError):
    """The request clashes with the current state (duplicate name, concurrent change)."""

    code = "conflict"


class ConceptNotReady(Conflict):
    """The concept is still training, or its training failed."""

    code = "concept_not_ready"


class Unauthorized(DomainError):
    """Missing, malformed, unknown or revoked API key."""

    code = "unauthorized"


class PayloadTooLarge(DomainError):
    """A file (or the request) has more bytes than the configured limit."""

    code = "payload_too_large"


class UnsupportedMedia(DomainError):
    """An image format outside the allow-list (JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC/HEIF)."""

    code = "unsupported_media"


class ModelUnavailable(DomainError):
    """The CLIP model cannot be loaded; the message names the setting to change."""

    code = "model_unavailable"


class DatabaseUnavailable(DomainError):
    """The database cannot be reached or did not answer in time; retry shortly."""

    code = "database_unavailable"


class StorageUnavailable(DomainError):
    """The data folder cannot take writes (read-only, no permission); reads still work."""

    code = "storage_unavailable"


class LibraryUnavailable(DomainError):
    """A library folder's file cannot be read right now (its network share dropped or timed
    out, no permission): nothing says it is gone; retry when the folder is back."""

    code = "library_unavailable"


class StorageFull(StorageUnavailable):
    """The disk holding the data folder (or its quota) is full; nothing was stored."""

    code = "storage_full"


@dataclass(frozen=True)
class FileFailure:
    """Why one file of a multi-file request was refused."""

    index: int  # position in the request, from 0
    filename: str | None  # sanitised display name
    error: DomainError

    def as_dict(self) -> dict[str, Any]:
        """JSON form used in the error response's `detail.files`."""
        return {
            "index": self.index,
            "filename": self.filename,
            "code": self.error.code,
            "message": self.error.message,
        }


class UploadRejected(DomainError):
    """One or more files of an upload were bad, so nothing of the request was stored.

    `code` (and the HTTP status) are those of the first bad file; `detail.files` names them all.
    """

    def __init__(self, failures: list[FileFailure], *, total: int) -> None:
        assert failures, "an upload is rejected only for at least one bad file"
        first = failures[0]
        # People count files from 1 (the `index` in `detail` stays 0-based for programs).
        names = "; ".join(
            f"file {f.index + 1} ({f.filename or 'unnamed'}): {f.error.message}" for f in failures
        )
        super().__init__(
            f"{len(failures)} of {total} file(s) rejected, nothing was stored. {names}",
            code=first.error.code,
            detail={"files": [f.as_dict() for f in failures]},
        )
        self.failures = failures


# -- concepts --------------------------------------------------------------------------------


class InvalidConceptName(ValidationFailed):
    """Empty, too long, or without a letter or digit (names are matched as whole words)."""

    code = "invalid_concept_name"


class InvalidCategory(ValidationFailed):
    """A category that cannot be part of the placeholder phrase ("sks <category>")."""

    code = "invalid_category"


class PhotoCountOutOfRange(ValidationFailed):
    """Too few or too many distinct photos for a concept (settings.training min/max_photos)."""

    code = "photo_count_out_of_range"


class DuplicateConceptName(Conflict):
    """Another of the user's concepts already has this name (compared case-insensitively)."""

    code = "duplicate_concept_name"


class ConceptDeleted(NotFound):
    """The concept a training job was for no longer exists."""

    code = "concept_deleted"


class UpstreamUnavailable(DomainError):
    """A service this one forwards to (the real Immich machine learning) did not answer."""

    code = "upstream_unavailable"


class RateLimited(DomainError):
    """A client sent more requests than its rate limit allows; it may retry later."""

    code = "rate_limited"


class ClientNotAllowed(DomainError):
    """The client's address is outside the networks allowed to call this route."""

    code = "client_not_allowed"


class Misconfigured(DomainError):
    """A setting names something that does not work (e.g. a revoked bridge key)."""

    code = "misconfigured"
