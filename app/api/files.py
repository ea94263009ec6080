"""Files the API serves (originals, thumbnails, concept photos): strong ETags, 304 Not Modified
for a matching If-None-Match, Range errors in the API's error shape, HEAD without reading.

An ETag names the bytes, not the file's stat as Starlette's does: the content hash the database
keeps (uploads and concept photos are stored by it, so the bytes behind it never change), with
the file's size and modification time added where the file may be rewritten in place (a
library's photo, which a scan re-reads when they change; a cached thumbnail, remade if it went
missing). Range and If-Range keep working: If-Range compares against this ETag.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable, Response
from starlette.types import Receive, Scope, Send

from app.api.head import HeadAwareFileResponse
from app.storage import THUMB_MIME

# Content-addressed, so a URL's bytes never change; `private`: it is behind a key.
IMMUTABLE = "private, max-age=31536000, immutable"
# A folder's file may be edited in place: revalidated (If-None-Match) before each use.
REVALIDATE = "private, no-cache"
# What the file routes answer besides 200 and errors, for the OpenAPI document.
FILE_RESPONSES: dict[int | str, dict[str, Any]] = {
    206: {"description": "the requested Range"},
    304: {"description": "Not Modified: If-None-Match names the current ETag (no body)"},
}

# An entity-tag, weak or strong (RFC 9110 8.8.3): its opaque part, quotes included.
_ENTITY_TAG = re.compile(r'(?:W/)?("[^"]*")')
# What a 304 carries of the 200 it stands for (RFC 9110 15.4.5), as far as these responses have it.
_NOT_MODIFIED_HEADERS = ("cache-control", "content-location", "etag", "expires", "vary")


def content_etag(sha256: str, *stat_parts: int) -> str:
    """A strong ETag from a content hash, and the stat numbers that must also change it."""
    return '"' + "-".join([sha256, *(format(n, "x") for n in stat_parts)]) + '"'


def none_match(field_values: Iterable[str], etag: str) -> bool:
    """Whether If-None-Match (all its field lines) matches `etag`: `*`, or any listed
    entity-tag equal to it by the weak comparison (RFC 9110 13.1.2, 8.8.3.2: `W/` ignored)."""
    opaque = _ENTITY_TAG.fullmatch(etag)
    if opaque is None:
        return False
    for value in field_values:
        if value.strip() == "*":
            return True
        if any(m.group(1) == opaque.group(1) for m in _ENTITY_TAG.finditer(value)):
            return True
    return False


def regular_file_stat(path: Path) -> os.stat_result | None:
    """The stat of `path` if it is a regular file (links followed); None if it is missing,
    unreadable or anything else (a folder, a FIFO)."""
    try:
        st = path.stat()
    except (OSError, ValueError):
        return None
    return st if stat.S_ISREG(st.st_mode) else None


class ApiFileResponse(HeadAwareFileResponse):
    """A file with a strong ETag: 304 (no body; ETag and Cache-Control) when If-None-Match
    matches, else the file, or the Range of it asked for. Bad Range headers get the API's JSON
    error shape: Starlette answers them itself in plain text (400 for a malformed range, 416
    with an empty body past the end)."""

    def __init__(
        self,
        path: Path,
        *,
        etag: str,
        cache_control: str,
        media_type: str,
        stat_result: os.stat_result | None = None,
        filename: str | None = None,
        content_disposition_type: str = "attachment",
    ) -> None:
        super().__init__(
            path,
            headers={"ETag": etag, "Cache-Control": cache_control},
            media_type=media_type,
            stat_result=stat_result,
            filename=filename,
            content_disposition_type=content_disposition_type,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # HEAD reaches here as a GET (app.api.head); If-None-Match is evaluated before Range.
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            asked = Headers(scope=scope).getlist("if-none-match")
            if asked and none_match(asked, self.headers["etag"]):
                kept = {k: self.headers[k] for k in _NOT_MODIFIED_HEADERS if k in self.headers}
                await Response(status_code=304, headers=kept)(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        try:
            return super()._parse_range_header(http_range, file_size)
        except MalformedRangeHeader as e:
            raise StarletteHTTPException(400, detail=f"bad Range header: {e.content}") from e
        except RangeNotSatisfiable as e:
            raise StarletteHTTPException(
                416,
                detail=f"the Range is past the end of the file ({file_size} bytes)",
                headers={"Content-Range": f"bytes */{file_size}"},
            ) from e


def thumbnail_response(path: Path, st: os.stat_result, sha256: str) -> ApiFileResponse:
    """A cached thumbnail (`st`: its stat): named by its image's hash, but remade if it went
    missing, so its stat is in the ETag too."""
    return ApiFileResponse(
        path,
        stat_result=st,
        etag=content_etag(sha256, st.st_size, st.st_mtime_ns),
        cache_control=IMMUTABLE,
        media_type=THUMB_MIME,
    )
