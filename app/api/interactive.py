"""Mark whole interactive requests as foreground work, from the first byte to the last.

A search is more than its model call: authentication, the database reads for the user's
concepts and images, and writing the response all need the GIL and a core. While a background
job of this process (embedded mode) holds them, each of those steps waits behind it. Marking only
the model call left searches during a training job at 1.76x their idle p50 (bench/contention.py);
this middleware marks the request as soon as it reaches the app, so the job pauses at its next
step (app/services/foreground.py) and stays paused until the response has been sent.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from app.services.foreground import Foreground

# Requests that run the model for a waiting user: searches, query embeddings, Immich's /predict.
INTERACTIVE_PATHS = frozenset({"/search", "/embed/text", "/predict"})


class InteractiveRequests:
    """ASGI middleware: requests to `paths` count as foreground work while they run."""

    def __init__(
        self, app: ASGIApp, foreground: Foreground, paths: frozenset[str] = INTERACTIVE_PATHS
    ) -> None:
        self.app = app
        self.foreground = foreground
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") not in self.paths:
            await self.app(scope, receive, send)
            return
        with self.foreground.active():
            await self.app(scope, receive, send)
