"""HEAD on every GET route: the GET's status and headers, no body (RFC 9110 9.3.2).

FastAPI registers routes for the declared methods only, so every HEAD used to be a 405 whose
Allow did not list HEAD either (app/api/head.py has the fix: one middleware, no per-route edit).
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.main import api_routes
from tests.api.test_auth import assert_error
from tests.api.test_search import upload, wait_jobs
from tests.db_fixtures import noisy_jpeg
from tests.model_fixtures import tiny_serving  # noqa: F401

UNKNOWN = "00000000-0000-0000-0000-000000000000"
# Counts the request itself: the GET and the HEAD differ by their own count.
VOLATILE = {"/metrics"}
# Outside the routers: the docs, the web UI and its redirect.
OTHER_GETS = [
    "/docs",
    "/redoc",
    "/docs/oauth2-redirect",
    "/openapi.json",
    "/",
    "/ui/",
    "/ui/app.css",
]


@pytest.fixture
def resources(api_client, make_user, tiny_serving) -> tuple[Any, dict[str, str]]:  # noqa: F811, ARG001 (installs the model)
    """A user with an image and a trained concept: a real id for every path parameter."""
    user = make_user(api_client)
    image_id = upload(api_client, user, range(1))[0]
    files = [("files", (f"c{i}.jpg", noisy_jpeg(seed=30 + i), "image/jpeg")) for i in range(3)]
    r = api_client.post("/concepts", data={"name": "Fido"}, files=files, headers=user.headers)
    assert r.status_code == 202, r.text
    concept_id, job_id = r.json()["concept"]["id"], r.json()["job"]["id"]
    wait_jobs(api_client)
    examples = api_client.get(f"/concepts/{concept_id}/examples", headers=user.headers).json()
    ids = {
        "image_id": image_id,
        "concept_id": concept_id,
        "example_id": examples["items"][0]["id"],
        "job_id": job_id,
        "library_id": UNKNOWN,  # no library roots here: a 404, answered alike
    }
    return user, ids


class SentBody:
    """The app, recording the body bytes it sends (a test client drops a HEAD's body itself,
    so only this shows whether the app sent one)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.body = b""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.body = b""

        async def record(message: Message) -> None:
            if message["type"] == "http.response.body":
                self.body += message.get("body", b"")
            await send(message)

        await self.app(scope, receive, record)


@pytest.fixture
def head_client(api_client) -> tuple[TestClient, SentBody]:
    """A client of `api_client`'s app (started already: no lifespan run again), and what the
    app sent last."""
    sent = SentBody(api_client.app)
    return TestClient(sent), sent


def _get_paths(app: Any, ids: dict[str, str]) -> list[str]:
    routes = [
        r
        for r in api_routes(app.state.container.settings)
        if isinstance(r, APIRoute) and "GET" in r.methods
    ]
    return [r.path.format(**ids) for r in routes]


def test_every_get_route_answers_head_like_get(api_client, resources, head_client):
    user, ids = resources
    client, sent = head_client
    paths = _get_paths(api_client.app, ids)
    assert len(paths) >= 15  # every router's GET routes, the file routes among them
    query = {"/search": {"q": "a hat"}}
    for path in [*paths, *OTHER_GETS]:
        params = query.get(path, {})
        got = api_client.get(path, params=params, headers=user.headers, follow_redirects=False)
        head = client.head(path, params=params, headers=user.headers, follow_redirects=False)
        assert head.status_code == got.status_code, path
        assert got.status_code in (200, 307, 404), (path, got.text)
        assert sent.body == b"", path
        if path in VOLATILE:
            assert head.headers["content-type"] == got.headers["content-type"]
            continue
        assert dict(head.headers) == dict(got.headers), path
        assert int(head.headers.get("content-length", len(got.content))) == len(got.content)


def test_head_of_a_file_has_its_length_type_and_etag(api_client, resources, head_client):
    user, ids = resources
    client, sent = head_client
    url = f"/images/{ids['image_id']}/file"
    got = api_client.get(url, headers=user.headers)
    head = client.head(url, headers=user.headers)
    assert head.status_code == 200 and sent.body == b""
    assert head.headers["content-length"] == str(len(got.content))
    assert head.headers["content-type"] == "image/jpeg"
    assert head.headers["etag"] == got.headers["etag"]
    ranged = client.head(url, headers={**user.headers, "Range": "bytes=0-9"})
    assert ranged.status_code == 206 and sent.body == b""
    assert ranged.headers["content-range"] == f"bytes 0-9/{len(got.content)}"
    assert ranged.headers["content-length"] == "10"


def test_head_needs_a_key_like_get(api_client, make_user, head_client):
    make_user(api_client)
    client, sent = head_client
    for url in ("/images", f"/images/{UNKNOWN}/file"):
        r = client.head(url)
        assert r.status_code == 401 and sent.body == b""
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.headers == api_client.get(url).headers


@pytest.mark.parametrize(
    ("url", "allowed"), [("/embed/text", {"POST"}), ("/index/rebuild", {"POST"})]
)
def test_head_where_no_get_is_a_bodiless_405(api_client, make_user, head_client, url, allowed):
    user = make_user(api_client)
    client, sent = head_client
    r = client.head(url, headers=user.headers)
    assert r.status_code == 405 and sent.body == b""
    assert set(r.headers["allow"].split(", ")) == allowed


def test_a_405_allows_head_wherever_get_is(api_client, make_user):
    user = make_user(api_client)
    r = api_client.put("/images", headers=user.headers)
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "GET, HEAD, POST"


@pytest.mark.parametrize("url", ["/docs", "/redoc", "/openapi.json"])
def test_a_405_on_the_docs_allows_head_too(api_client, url):
    """The docs are routes of the app too, not of the API's routers."""
    r = api_client.put(url)
    assert r.status_code == 405, r.text
    assert r.headers["allow"] == "GET, HEAD"


def test_head_is_no_operation_of_the_openapi_document(api_client):
    schema = api_client.get("/openapi.json").json()
    assert schema["paths"]
    assert all("head" not in item for item in schema["paths"].values())
    ids = [op["operationId"] for item in schema["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))


def test_head_is_counted_as_head(api_client, make_user):
    user = make_user(api_client)
    assert api_client.head("/images", headers=user.headers).status_code == 200
    metrics = api_client.get("/metrics").text
    assert 'polar_http_requests_total{method="HEAD",route="/images",status="200"} 1.0' in metrics
