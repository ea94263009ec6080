"""The web UI: static HTML, CSS and JS modules in `static/`, served by the API at /ui.

Only the files that exist in `static/` when the app starts are served, looked up by exact name
in a table built then: nothing else on disk (this module, the rest of the package, dot-files,
anything `..` could reach) can be named by a URL. Every UI response carries a strict
Content-Security-Policy (no inline scripts or styles, nothing from other origins) and the usual
hardening headers. The UI holds no secrets: it talks to the JSON API with the user's own key.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import Receive, Scope, Send

from app.api.errors import error_body
from app.api.files import none_match
from app.api.head import HeadAwareFileResponse

STATIC_DIR = Path(__file__).resolve().parent / "static"
PREFIX = "/ui"

# What may be served, with the exact media type (not the platform's mimetypes table).
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


@dataclass(frozen=True)
class StaticFile:
    path: Path
    media_type: str
    etag: str


def collect_files(root: Path = STATIC_DIR) -> dict[str, StaticFile]:
    """URL path below /ui/ (e.g. "js/api.js") -> the file; only regular, non-hidden files with
    an allowed extension, and no symlinks (they could point anywhere)."""
    files: dict[str, StaticFile] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "_"))]
        for name in filenames:
            path = Path(dirpath) / name
            media_type = MEDIA_TYPES.get(path.suffix)
            if name.startswith(".") or media_type is None or path.is_symlink():
                continue
            if not path.is_file():
                continue
            etag = hashlib.sha256(path.read_bytes()).hexdigest()[:20]
            files[path.relative_to(root).as_posix()] = StaticFile(path, media_type, f'"{etag}"')
    return files


def _headers(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**SECURITY_HEADERS, **(extra or {})}


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    """The API's error shape, with the UI's headers."""
    return JSONResponse(error_body(code, message), status_code=status, headers=_headers(headers))


class StaticUI:
    """ASGI app mounted at /ui: an exact-match table of files, never a filesystem lookup."""

    def __init__(self, root: Path = STATIC_DIR) -> None:
        self.files = collect_files(root)
        if "index.html" not in self.files:
            raise RuntimeError(f"the web UI is missing: no index.html in {root}")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await self.respond(scope)(scope, receive, send)

    def respond(self, scope: Scope) -> Response:
        """The response for a request below the mount point."""
        request = Request(scope)
        # The mount point is the end of root_path; the rest of the path is below it:
        # "" for /ui, "/" for /ui/, "/js/api.js" for /ui/js/api.js.
        root, path = scope.get("root_path", ""), scope["path"]
        rel = path[len(root) :] if path.startswith(root) else path
        if rel == "":
            return RedirectResponse(f"{root}/", status_code=307, headers=_headers())
        name = "index.html" if rel == "/" else rel[1:]
        file = self.files.get(name)
        if file is None:
            return _error(404, "not_found", "Not Found")
        if request.method not in ("GET", "HEAD"):
            return _error(405, "method_not_allowed", "Method Not Allowed", {"Allow": "GET, HEAD"})
        # Revalidate every time (cheap with the ETag), so a new version is never half-cached.
        headers = _headers({"Cache-Control": "no-cache", "ETag": file.etag})
        if none_match(Headers(scope=scope).getlist("if-none-match"), file.etag):
            return Response(status_code=304, headers=headers)
        return HeadAwareFileResponse(file.path, media_type=file.media_type, headers=headers)


def install(app: FastAPI) -> None:
    """Serve the UI at /ui/ and send / there. Both are outside the API's key check and schema."""

    async def to_ui(request: Request) -> Response:
        where = f"{request.scope.get('root_path', '')}{PREFIX}/"
        return RedirectResponse(where, status_code=307, headers=_headers())

    for path in ("/", PREFIX):
        app.add_route(path, to_ui, methods=["GET", "HEAD"], include_in_schema=False)
    app.mount(PREFIX, StaticUI(), name="ui")
