"""HEAD for every GET route: the same status and headers as GET, and no body (RFC 9110 9.3.2).

FastAPI registers a route for exactly the methods it is declared with, so a HEAD on a GET route
was a 405. Rather than declaring HEAD on every route (which would also put a duplicate `head`
operation for each into the OpenAPI document, and could make HEAD part of operation ids),
`HeadAsGet` is the app's outermost middleware (app/main.py): a HEAD request goes through the
body limits, the key check and routing as the GET it stands for, and whatever body the answer
has is dropped on the way out. The request's scope says it is a HEAD (`is_head`), so a file
response sends its headers without reading the file (`HeadAwareFileResponse`) and the metrics
count it as a HEAD.
"""

from __future__ import annotations

from starlette.responses import FileResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# In the scope of a HEAD request turned into a GET by HeadAsGet.
HEAD_SCOPE_KEY = "polar.head"


def is_head(scope: Scope) -> bool:
    """Whether the request is a HEAD (answered as a GET without the body)."""
    return bool(scope.get(HEAD_SCOPE_KEY)) or scope.get("method") == "HEAD"


class HeadAsGet:
    """ASGI middleware: a HEAD request is run as a GET, and its answer sent without the body.

    The status and every header (Content-Length, Content-Type, ETag, Allow, ...) are the GET's;
    a path that answers no GET answers HEAD with the GET's 405 (or 404), bodiless too. The
    server's own scope is left as it is (a new one goes down the app), so servers that drop
    the body of a HEAD answer themselves (uvicorn) still do.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.body":
                if message.get("more_body", False):
                    return  # only the last (empty) body message goes out
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            elif kind == "http.response.pathsend":
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET", HEAD_SCOPE_KEY: True}, receive, headers_only)


class HeadAwareFileResponse(FileResponse):
    """A file response that, for a HEAD turned into a GET, sends its headers (computed from the
    file's stat, as for GET) without opening the file."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get(HEAD_SCOPE_KEY):
            scope = {**scope, "method": "HEAD"}
        await super().__call__(scope, receive, send)
