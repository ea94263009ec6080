"""The one place where errors become HTTP responses.

Every error response, whatever raised it (a domain error, request validation, routing 404/405,
an unexpected exception), has this JSON body:

    {"error": {"code": "<stable snake_case>", "message": "<for people>", "detail": <any>}}

`detail` is present only when there is something structured to say: the bad files of an upload
(`{"files": [{"index", "filename", "code", "message"}]}`), the failing fields of a request
(`[{"loc": [...], "msg": "...", "type": "..."}]`), limits that were exceeded. Clients branch on
`code`, never on `message`. 401 responses carry `WWW-Authenticate: Bearer`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from http import HTTPStatus
from typing import Any, Final, Literal, TypeVar
from urllib.parse import unquote_to_bytes

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sqlalchemy_exc
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.forms import InvalidUtf8Form
from app.db import database_disk_full
from app.errors import (
    ClientNotAllowed,
    Conflict,
    DatabaseUnavailable,
    DomainError,
    LibraryUnavailable,
    Misconfigured,
    ModelUnavailable,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    StorageFull,
    StorageUnavailable,
    TooManyFiles,
    Unauthorized,
    UnsupportedMedia,
    UploadRejected,
    UpstreamUnavailable,
    ValidationFailed,
)

log = logging.getLogger(__name__)

# Domain error class -> HTTP status; subclasses inherit their base's status.
STATUS_BY_ERROR: dict[type[DomainError], int] = {
    NotFound: 404,
    ValidationFailed: 422,
    Conflict: 409,
    Unauthorized: 401,
    PayloadTooLarge: 413,
    UnsupportedMedia: 415,
    ModelUnavailable: 503,
    DatabaseUnavailable: 503,
    StorageFull: 507,
    StorageUnavailable: 503,
    LibraryUnavailable: 503,
    UpstreamUnavailable: 502,
    Misconfigured: 503,
    RateLimited: 429,
    ClientNotAllowed: 403,
}
# Every 503 is temporary by nature (a dependency away, a model loading): clients retry after.
RETRY_AFTER_S = 5
# Driver errors that mean "the database is not there right now", not "this request is wrong".
DATABASE_DOWN: tuple[type[Exception], ...] = (
    sqlalchemy_exc.OperationalError,
    sqlalchemy_exc.InterfaceError,
    sqlalchemy_exc.DisconnectionError,
    sqlalchemy_exc.TimeoutError,
)

# Codes for errors raised as plain HTTP exceptions (routing, the body-size limit, multipart).
_CODE_BY_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    416: "range_not_satisfiable",
    415: "unsupported_media",
    422: "validation_failed",
    429: "too_many_requests",
    503: "unavailable",
}


def status_for(error: DomainError) -> int:
    """HTTP status of a domain error (an upload rejection takes its first bad file's)."""
    if isinstance(error, UploadRejected):
        return status_for(error.failures[0].error)
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 400


def error_body(code: str, message: str, detail: Any = None) -> dict[str, Any]:
    """The JSON error shape."""
    body: dict[str, Any] = {"code": code, "message": message}
    if detail is not None:
        body["detail"] = detail
    return {"error": body}


class SafeJSONResponse(JSONResponse):
    """JSON that is always valid UTF-8: a message may quote what a client sent, and a lone
    surrogate in it (from a JSON `"\\ud800"` escape, or undecodable bytes) cannot be encoded;
    such a character becomes "?" instead of failing the response with a 500."""

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode("utf-8", "replace")


def _response(
    status: int, code: str, message: str, detail: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    if status == 503:
        headers = {"Retry-After": str(RETRY_AFTER_S), **(headers or {})}
    return SafeJSONResponse(error_body(code, message, detail), status_code=status, headers=headers)


def error_response(exc: DomainError) -> JSONResponse:
    """The response for a domain error (for code outside FastAPI's handlers: middleware)."""
    return _response(status_for(exc), exc.code, exc.message, exc.detail)


async def handle_domain_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError)
    return error_response(exc)


def _body_error(request: Request, exc: StarletteHTTPException) -> DomainError | None:
    """The domain error behind a 400 the body parsers raised, where there is a better one.

    FastAPI and Starlette answer every body they cannot parse with a bare 400; the cause says
    what it was: text that is not UTF-8 (a 422 like any other invalid string), more files than
    the limit (the documented `too_many_files`), an oversized form field (413).
    A multipart body that is cut off or malformed stays a 400 (app/api/forms.py says which).
    """
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, UnicodeDecodeError):
        return ValidationFailed("the request body is not valid UTF-8", code="invalid_utf8")
    if isinstance(cause, InvalidUtf8Form):  # a form's text or file name (app/api/forms.py)
        return ValidationFailed(cause.message, code="invalid_utf8")
    if isinstance(cause, MultiPartException):
        if cause.message.startswith("Too many files"):
            most = request.app.state.container.settings.limits.max_files_per_request
            return TooManyFiles(
                f"more than {most} files in one request; the limit is {most}",
                detail={"max_files": most},
            )
        if "exceeded maximum size" in cause.message:
            return PayloadTooLarge(f"a form field is too large: {cause.message}")
    return None


async def handle_http_exception(
    request: Request, exc: Exception, api_routes: Sequence[BaseRoute] = ()
) -> JSONResponse:
    """An HTTPException as our error shape; a 405 names every method of the path (the
    `api_routes` with the app's own)."""
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    if status == 400 and (better := _body_error(request, exc)) is not None:
        return await handle_domain_error(request, better)
    code = _CODE_BY_STATUS.get(status, "internal_error" if status >= 500 else f"http_{status}")
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    if isinstance(exc.detail, str) and exc.detail:
        message, detail = exc.detail, None
    else:
        message, detail = phrase, exc.detail
    headers = dict(exc.headers or {})
    if status == 405 and (allowed := _allowed_methods(request, api_routes)):
        headers["Allow"] = ", ".join(allowed)
    return _response(status, code, message, detail, headers)


def _allowed_methods(request: Request, api_routes: Sequence[BaseRoute]) -> list[str]:
    """Every method the path answers to (the API's routes, which the app keeps inside its
    included routers, and the app's own: the docs, the web UI), HEAD wherever GET is (the app
    answers it: app/api/head.py). With one route per method, Starlette's 405 names only the
    first route's."""
    own = (route for route in request.app.routes if getattr(route, "methods", None))
    routes: Iterable[BaseRoute] = [*api_routes, *own]
    methods = {
        method
        for route in routes
        if route.matches(request.scope)[0] is not Match.NONE
        for method in getattr(route, "methods", None) or ()
    }
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


async def handle_validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # Drop `input`/`ctx`: they can hold uploaded bytes or objects that are not JSON.
    problems = [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type"))}
        for e in exc.errors()
    ]
    if any(p["type"] == "json_invalid" for p in problems):
        # A body that is not JSON at all (cut off, say) is a bad request, like any other body
        # the parsers cannot read; a JSON body with wrong fields is the 422 below.
        why = "; ".join(str(p["msg"]) for p in problems if p["type"] == "json_invalid")
        return _response(400, "bad_request", f"the request body is not valid JSON: {why}")
    where = "; ".join(f"{'.'.join(str(p) for p in pr['loc'])}: {pr['msg']}" for pr in problems)
    return _response(422, "validation_failed", f"invalid request: {where}", problems)


async def handle_database_down(request: Request, exc: Exception) -> JSONResponse:
    if database_disk_full(exc):  # the database lives on the disk that filled up
        log.warning("database disk full: %s", exc.__class__.__name__, exc_info=exc)
        return await handle_domain_error(
            request,
            StorageFull(
                "the server's disk is full; nothing was stored. Try again once space is freed"
            ),
        )
    log.warning("database unavailable: %s", exc.__class__.__name__, exc_info=exc)
    return await handle_domain_error(
        request,
        DatabaseUnavailable("the database is unavailable right now; retry in a few seconds"),
    )


async def handle_unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return _response(500, "internal_error", "internal server error")


BodyKind = Literal["json", "upload", "image"]
BODY_ATTR: Final = "polar_body"
_Endpoint = TypeVar("_Endpoint", bound=Callable[..., Any])


def takes_body(kind: BodyKind) -> Callable[[_Endpoint], _Endpoint]:
    """Mark a route's endpoint with the body it takes, for BodySizeLimit: "upload" (files, up to
    the per-request file limit), "image" (one image and a few form fields). Unmarked routes
    take at most a JSON document's size, whatever Content-Type the client claims."""

    def mark(endpoint: _Endpoint) -> _Endpoint:
        setattr(endpoint, BODY_ATTR, kind)
        return endpoint

    return mark


def body_kinds(routes: Iterable[BaseRoute]) -> list[tuple[BaseRoute, BodyKind]]:
    """The routes among `routes` whose endpoint is marked by `takes_body`, with their kind."""
    return [
        (route, kind)
        for route in routes
        if (kind := getattr(getattr(route, "endpoint", None), BODY_ATTR, None)) is not None
    ]


class BodySizeLimit:
    """ASGI middleware: refuse request bodies over the limit, in the JSON error shape.

    The limit is the route's, not the client's to choose: routes marked with `takes_body`
    (among `routes`, the app's routers' routes) may have `limits[kind]` bytes, every other
    one (JSON, or none) only `max_other_bytes`, even when the client labels its body
    multipart, so no request to a search route can make the server buffer megabytes. A
    declared Content-Length over the limit is answered before any byte is read; a body that
    turns out longer (chunked, or lying) is cut off once it passes the limit. Starlette's own
    limiter answers in plain text, hence this one.
    """

    def __init__(
        self,
        app: ASGIApp,
        routes: Iterable[BaseRoute],
        limits: dict[BodyKind, int],
        max_other_bytes: int,
    ) -> None:
        self.app = app
        self.marked = body_kinds(routes)
        self.limits = limits
        self.max_other_bytes = max_other_bytes

    def limit_for(self, scope: Scope) -> int:
        """The body limit of the marked route the request matches (path and method), else
        the JSON one."""
        for route, kind in self.marked:
            if route.matches(scope)[0] is Match.FULL:
                return self.limits.get(kind, self.max_other_bytes)
        return self.max_other_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        limit = self.limit_for(scope)
        message = f"the request is larger than this route's limit of {limit} bytes"
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            detail = {"max_bytes": limit}
            await _response(413, "payload_too_large", message, detail)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > limit:
                    raise StarletteHTTPException(413, detail=message)
            return event

        await self.app(scope, limited_receive, send)


class Utf8Url:
    """ASGI middleware: a URL whose path or query string, percent-decoded, is not UTF-8 is a
    422 `invalid_utf8`, like such a body. Starlette decodes both with replacement characters,
    so `?q=%FF` used to be searched for as "\ufffd" and a lone surrogate (`%ED%A0%80`) never
    reached the checks that refuse it elsewhere."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw_path = scope.get("raw_path") or scope.get("path", "").encode("utf-8", "replace")
            parts = (("path", raw_path), ("query string", scope.get("query_string", b"")))
            for what, raw in parts:
                try:
                    unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8")
                except UnicodeDecodeError:
                    message = f"the URL's {what} is not valid UTF-8 (percent-decoded)"
                    await _response(422, "invalid_utf8", message)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def install_error_handlers(app: FastAPI, *, api_routes: Sequence[BaseRoute] = ()) -> None:
    """Register every handler on the app; `api_routes`: the routes of its routers."""

    async def http_exception(request: Request, exc: Exception) -> JSONResponse:
        return await handle_http_exception(request, exc, api_routes)

    app.add_exception_handler(DomainError, handle_domain_error)
    app.add_exception_handler(StarletteHTTPException, http_exception)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    for error in DATABASE_DOWN:
        app.add_exception_handler(error, handle_database_down)
    app.add_exception_handler(Exception, handle_unexpected)
