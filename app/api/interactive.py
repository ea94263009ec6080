"""Interactive requests: foreground work from first byte to last, run a few at a time in order.

A search is more than its model call: authentication, the database reads for the user's
concepts and images, and writing the response all need the GIL and a core.

- **Jobs step aside.** While a background job of this process (embedded mode) holds the GIL,
  each of those steps waits behind it. Marking only the model call left searches during a
  training job at 1.76x their idle p50 (bench/contention.py); the whole request is marked now,
  so the job pauses at its next step (app/services/foreground.py) until the response is sent.
- **A few at a time, first come first served.** Sixteen searches side by side in one process
  share two cores and one GIL: each takes sixteen times as long, and the costly ones (two
  concepts, re-ranked) take the longest, so at 8 clients p99 was 3x p50. Run in arrival order,
  at most `POLAR_THREADS__CONCURRENT_SEARCHES` at once (default one per core), a search's wait
  is the sum of the few ahead of it, which varies much less (bench/load.py). Waiting searches
  hold no request thread, and a request takes its turn only once its body has arrived, so a
  client that sends slowly holds back nobody, jobs included.
- **Only searches take turns.** Immich's `/predict` is not in these paths: its textual requests
  (Immich's smart search) take a turn in the route, around their work; its images (Immich's
  indexing job) and the face/OCR requests it forwards never do (app/api/routes/immich.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import httpx
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.services.foreground import Foreground
from app.services.immich import ClientRateLimit

# Requests that run the model for a waiting user: searches and query embeddings.
INTERACTIVE_PATHS = frozenset({"/search", "/embed/text"})


class SearchTurns:
    """The turns searches take: `concurrency` at once, in arrival order, as foreground work
    (this process's jobs pause while one runs)."""

    def __init__(self, foreground: Foreground, concurrency: int) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self.foreground = foreground
        self.concurrency = concurrency
        self._turns: anyio.CapacityLimiter | None = None  # made in the event loop, on first use

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Wait for a turn (holding no thread) and hold it for the block."""
        if self._turns is None:
            self._turns = anyio.CapacityLimiter(self.concurrency)  # waiters are served in order
        with self.foreground.active():
            async with self._turns:
                yield


class InteractiveRequests:
    """ASGI middleware: requests to `paths` are foreground work, a search turn each."""

    def __init__(
        self, app: ASGIApp, turns: SearchTurns, paths: frozenset[str] = INTERACTIVE_PATHS
    ) -> None:
        self.app = app
        self.turns = turns
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") not in self.paths:
            await self.app(scope, receive, send)
            return
        try:
            arrived = await _read_request(receive)
        except Exception as refused:  # BodySizeLimit cut it off: the app answers, in its shape
            await self.app(scope, _raising(refused), send)
            return
        async with self.turns.turn():
            await self.app(scope, _replay(arrived, receive), send)


async def _read_request(receive: Receive) -> list[Message]:
    """Every message of the request body (or the client's disconnect), as they came."""
    messages: list[Message] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request" or not message.get("more_body", False):
            return messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A `receive` that gives `messages` first, then whatever the client sends next."""
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


def _raising(error: Exception) -> Receive:
    """A `receive` that raises `error`, where the app's error handlers will see it."""

    async def refused() -> Message:
        raise error

    return refused


class ImageTurns:
    """Immich's images encoded `concurrency` at a time, apart from the searches' turns."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self._limiter: anyio.CapacityLimiter | None = None  # made in the event loop

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.concurrency)
        async with self._limiter:
            yield


@dataclass
class ImmichBridge:
    """What the Immich bridge keeps between requests (app/api/routes/immich.py)."""

    client: httpx.AsyncClient  # forwards the requests that are not CLIP's to Immich's own ML
    images: ImageTurns  # Immich's images encoded a few at a time
    rate: ClientRateLimit  # text queries per client and minute
