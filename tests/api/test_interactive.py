"""Interactive requests count as foreground work for their whole duration, others do not."""

from __future__ import annotations

import asyncio

import anyio
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.interactive import InteractiveRequests, SearchTurns
from app.services.foreground import Foreground
from tests.api.test_search import library  # noqa: F401
from tests.model_fixtures import tiny_serving  # noqa: F401


def _call(middleware: InteractiveRequests, path: str) -> list[int]:
    """Run one request; the foreground counts seen while each message is sent."""
    seen: list[int] = []
    fg = middleware.turns.foreground
    scope: Scope = {"type": "http", "path": path, "method": "GET"}

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:  # noqa: ARG001
        seen.append(fg.active_count)

    asyncio.run(middleware(scope, receive, send))
    return seen


def _app(fg: Foreground, inside: list[int]) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:  # noqa: ARG001
        inside.append(fg.active_count)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    return app


@pytest.mark.parametrize("path", ["/search", "/search/", "/embed/text"])
def test_interactive_paths_are_foreground_until_the_response_is_sent(path: str) -> None:
    fg, inside = Foreground(), []
    seen = _call(InteractiveRequests(_app(fg, inside), SearchTurns(fg, 2)), path)
    assert inside == [1]
    assert seen == [1, 1]  # the response is written while the jobs still wait
    assert fg.active_count == 0


# Immich's /predict takes a turn in its route, and only for a textual request
# (tests/api/test_immich.py); its images and forwarded requests never do.
@pytest.mark.parametrize(
    "path", ["/images", "/concepts", "/jobs/x", "/searchx", "/healthz", "/predict"]
)
def test_other_requests_do_not_pause_jobs(path: str) -> None:
    fg, inside = Foreground(), []
    seen = _call(InteractiveRequests(_app(fg, inside), SearchTurns(fg, 2)), path)
    assert inside == [0]
    assert seen == [0, 0]


def test_a_failing_request_still_ends_its_mark() -> None:
    fg = Foreground()
    inside: list[int] = []

    async def broken(scope: Scope, receive: Receive, send: Send) -> None:  # noqa: ARG001
        inside.append(fg.active_count)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        _call(InteractiveRequests(broken, SearchTurns(fg, 2)), "/search")
    assert inside == [1]
    assert fg.active_count == 0


def test_searches_take_turns_in_arrival_order_a_few_at_a_time() -> None:
    fg = Foreground()
    running, started, most = [0], [], [0]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # the body was read ahead and is replayed
        running[0] += 1
        most[0] = max(most[0], running[0])
        started.append(scope["n"])
        await anyio.sleep(0.02)
        running[0] -= 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    middleware = InteractiveRequests(app, SearchTurns(fg, 2))

    async def one(n: int) -> None:
        async def receive() -> Message:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: Message) -> None:  # noqa: ARG001
            return None

        await middleware(
            {"type": "http", "path": "/search", "method": "POST", "n": n}, receive, send
        )

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for n in range(8):
                tg.start_soon(one, n)
                await anyio.sleep(0.001)  # arrivals in a known order

    anyio.run(main)
    assert most[0] == 2
    assert started == list(range(8))
    assert fg.active_count == 0


def test_a_slow_body_holds_no_turn_and_pauses_no_job() -> None:
    """While a request's body is still arriving it is neither running nor foreground work."""
    fg = Foreground()
    seen_while_sending: list[int] = []
    ran: list[bytes] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:  # noqa: ARG001
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        ran.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})

    middleware = InteractiveRequests(app, SearchTurns(fg, 1))
    chunks = [b'{"q":', b' "a dog"}']

    async def main() -> None:
        async def receive() -> Message:
            seen_while_sending.append(fg.active_count)
            await anyio.sleep(0.01)
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

        async def send(message: Message) -> None:  # noqa: ARG001
            return None

        await middleware({"type": "http", "path": "/search", "method": "POST"}, receive, send)

    anyio.run(main)
    assert seen_while_sending == [0, 0]
    assert ran == [b'{"q": "a dog"}']


def test_an_oversized_streamed_search_body_is_refused_with_413(api_client, library):  # noqa: F811
    user, _ = library
    limit = api_client.app.state.container.settings.limits.max_json_bytes

    def body():
        yield b'{"q": "'
        for _ in range(limit // 1024 + 2):
            yield b"x" * 1024
        yield b'"}'

    r = api_client.post(
        "/search", content=body(), headers={**user.headers, "content-type": "application/json"}
    )
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "payload_too_large"


def test_the_app_pauses_its_jobs_for_a_whole_search(api_client, library, monkeypatch):  # noqa: F811
    """In the real app the middleware is installed: the search service runs marked (the routes
    no longer mark themselves), and nothing stays marked afterwards."""
    from app.services import search as search_service

    user, _ = library
    fg = api_client.app.state.container.foreground
    seen: dict[str, int] = {}
    real_search = search_service.search_images

    def spy_search(*args, **kwargs):
        seen["search"] = fg.active_count
        return real_search(*args, **kwargs)

    monkeypatch.setattr(search_service, "search_images", spy_search)
    r = api_client.get("/search", params={"q": "a dog"}, headers=user.headers)
    assert r.status_code == 200, r.text
    assert seen == {"search": 1}
    assert fg.active_count == 0
    r = api_client.get("/images", headers=user.headers)
    assert r.status_code == 200 and fg.active_count == 0
