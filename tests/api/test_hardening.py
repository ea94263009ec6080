"""Regressions of the outside audit (issue 12): no single request answers 5xx or sizes memory.

Each test names the class of bug it guards; every one of them answered 500 (or the wrong 4xx)
before the fix.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.api.errors import BodySizeLimit
from app.config import Settings
from app.main import create_app
from app.models import Concept
from app.services import model as model_service
from app.text import fold
from tests.api.test_auth import assert_error
from tests.api.test_search import _add_concept
from tests.model_fixtures import tiny_serving  # noqa: F401

JSON = {"content-type": "application/json"}


@pytest.fixture
def user(api_client, make_user, tiny_serving):  # noqa: F811, ARG001 (installs the model)
    return make_user(api_client)


def _concept(client: Any, user_id: str, name: str) -> str:
    """A concept still training (no adapter): the query names it, nothing is applied."""
    with client.app.state.container.session_factory() as s:
        c = Concept(user_id=user_id, name=name, name_key=fold(name), token="sks", version=1)
        s.add(c)
        s.commit()
        return c.id


# -- numbers: every one has an upper bound, and out-of-range or fractional is a 422 ----------


@pytest.mark.parametrize("offset", [10_000_000_000_000, 50_000_000, 10_001])
def test_offset_past_the_limit_is_422_not_500_nor_a_huge_allocation(api_client, user, offset):
    r = api_client.get("/search", params={"q": "hat", "offset": offset}, headers=user.headers)
    assert_error(r, 422, "invalid_offset")
    r = api_client.post("/search", json={"q": "hat", "offset": offset}, headers=user.headers)
    assert_error(r, 422, "invalid_offset")


@pytest.mark.parametrize("offset", [1e13, 2.5, "1e3", "ten"])
def test_fractional_or_float_offset_is_422(api_client, user, offset):
    r = api_client.post("/search", json={"q": "hat", "offset": offset}, headers=user.headers)
    assert r.status_code == 422, r.text
    r = api_client.get("/search", params={"q": "hat", "offset": offset}, headers=user.headers)
    assert r.status_code == 422, r.text


def test_deepest_offset_is_answered(api_client, user):
    r = api_client.get("/search", params={"q": "hat", "offset": 10_000}, headers=user.headers)
    assert r.status_code == 200, r.text
    assert r.json()["hits"] == []


def test_too_many_concept_ids_and_mime_types_are_422(api_client, user):
    many = [f"{i:08d}-0000-0000-0000-000000000000" for i in range(51)]
    r = api_client.post("/search", json={"q": "x", "concept_ids": many}, headers=user.headers)
    assert_error(r, 422, "validation_failed")
    mimes = ["image/jpeg"] * 21
    r = api_client.post(
        "/search", json={"q": "x", "filters": {"mime": mimes}}, headers=user.headers
    )
    assert_error(r, 422, "validation_failed")


def test_a_json_body_over_its_limit_is_413_before_parsing(api_client, user):
    body = '{"q": "' + "a" * (2 * 1024 * 1024) + '"}'
    r = api_client.post("/search", content=body, headers={**user.headers, **JSON})
    assert_error(r, 413, "payload_too_large")


def test_multipart_uploads_keep_the_file_limit_not_the_json_limit(api_client, user):
    import io
    import os

    from PIL import Image

    buf = io.BytesIO()
    Image.frombytes("RGB", (800, 700), os.urandom(800 * 700 * 3)).save(buf, "PNG")
    assert buf.tell() > 1024 * 1024  # over the JSON limit, far under the file limit
    files = [("files", ("noise.png", buf.getvalue(), "image/png"))]
    r = api_client.post("/images", files=files, headers=user.headers)
    assert r.status_code == 202, r.text
    assert BodySizeLimit  # the middleware under test (app/api/errors.py)


# -- text: one normal form, one caseless rule for matching and lookup ------------------------


@pytest.mark.parametrize(
    ("name", "query"),
    [
        ("Fido", "Fıdo on the beach"),  # dotless ı
        ("Fido", "FİDO on the beach"),  # capital dotted İ
        ("Kırmızı", "kirmizi at home"),
        ("Kırmızı", "KIRMIZI at home"),
        ("Straße", "STRASSE at night"),
        ("fido", "ＦＩＤＯ on the sofa"),  # full width: NFKC
    ],
)
def test_names_match_with_the_same_rule_they_are_looked_up_with(api_client, user, name, query):
    cid = _concept(api_client, user.id, name)
    r = api_client.get("/search", params={"q": query}, headers=user.headers)
    assert r.status_code == 200, r.text
    assert [c["id"] for c in r.json()["concepts"]] == [cid]


def test_a_turkish_i_variant_of_a_name_is_a_duplicate(api_client, user, tiny_serving):  # noqa: F811
    _add_concept(api_client, user.id, tiny_serving, "Fido", "hat")
    from tests.db_fixtures import noisy_jpeg

    files = [("files", (f"f{i}.jpg", noisy_jpeg(seed=50 + i), "image/jpeg")) for i in range(3)]
    r = api_client.post("/concepts", data={"name": "FİDO"}, files=files, headers=user.headers)
    assert_error(r, 409, "duplicate_concept_name")


# -- strings: invalid UTF-8, lone surrogates and NUL are a 422 wherever they come in ----------


@pytest.mark.parametrize(
    "body",
    [
        '{"q": "\\ud800"}',
        '{"q": "hat \\udfff"}',
        '{"q": "x", "filters": {"mime": ["\\ud800"]}}',
        '{"q": "x", "filters": {"mime": ["image/\\u0000"]}}',
        '{"q": "x", "concept_ids": ["\\ud800"]}',
        '{"q": "a\\u0000b"}',
    ],
)
def test_lone_surrogates_and_nul_in_json_are_422(api_client, user, body):
    r = api_client.post("/search", content=body, headers={**user.headers, **JSON})
    assert_error(r, 422, "validation_failed")


def test_a_json_body_that_is_not_utf8_is_422(api_client, user):
    r = api_client.post("/search", content=b'{"q": "\xff\xfe"}', headers={**user.headers, **JSON})
    assert_error(r, 422, "invalid_utf8")


@pytest.mark.parametrize(
    "path",
    ["/images/a%00b", "/concepts/%00", "/jobs/x%00", "/images/a%00b/thumbnail"],
)
def test_nul_in_a_path_id_is_422(api_client, user, path):
    assert_error(api_client.get(path, headers=user.headers), 422, "validation_failed")


def test_overlong_path_id_is_422(api_client, user):
    assert_error(
        api_client.get("/images/" + "a" * 65, headers=user.headers), 422, "validation_failed"
    )


def test_nul_in_query_and_cursor_is_422(api_client, user):
    r = api_client.get("/search", params={"q": "a\x00"}, headers=user.headers)
    assert_error(r, 422, "validation_failed")
    r = api_client.get("/images", params={"cursor": "\x00"}, headers=user.headers)
    assert_error(r, 422, "validation_failed")


def test_patch_with_a_lone_surrogate_is_422(api_client, user):
    cid = _concept(api_client, user.id, "Luna")
    r = api_client.patch(
        f"/concepts/{cid}", content='{"name": "L\\ud800"}', headers={**user.headers, **JSON}
    )
    assert_error(r, 422, "validation_failed")


# -- date-times: always aware; naive is UTC, a date alone midnight UTC -------------------------


@pytest.mark.parametrize(
    "after",
    ["2025-01-01T00:00:00", "2025-01-01", "2025-01-01T00:00:00+05:00", "0001-01-01T00:00:00+01:00"],
)
def test_created_after_without_a_zone_or_as_a_date_is_utc(api_client, user, after):
    r = api_client.post(
        "/search", json={"q": "x", "filters": {"created_after": after}}, headers=user.headers
    )
    assert r.status_code in (200, 422), r.text
    if after.startswith("0001"):
        assert_error(r, 422, "validation_failed")


@pytest.mark.usefixtures("tiny_serving")
def test_a_naive_filter_means_utc(api_client, make_user):
    from tests.api.test_search import upload, wait_jobs

    user = make_user(api_client)
    upload(api_client, user, range(2))
    wait_jobs(api_client)

    def hits(after: str) -> int:
        body = {"q": "x", "filters": {"created_after": after}}
        r = api_client.post("/search", json=body, headers=user.headers)
        assert r.status_code == 200, r.text
        return len(r.json()["hits"])

    assert hits("2000-01-01") == 2
    assert hits("2000-01-01T00:00:00") == 2
    assert hits("9999-01-01T00:00:00") == 0


# -- uploads: over the file limit is the documented too_many_files --------------------------


def test_more_files_than_the_limit_is_too_many_files(tmp_path, db_url, make_user):
    settings = Settings(data_dir=tmp_path / "d", database_url=db_url, broker_url="")
    settings.limits.max_files_per_request = 3
    with TestClient(create_app(settings)) as client:
        user = make_user(client)
        # One over (the upload service counts), more (the multipart parser stops reading).
        cases = [("/images", 4), ("/images", 5), ("/images", 9), ("/concepts", 5), ("/concepts", 9)]
        for route, n in cases:
            files = [("files", (f"p{i}.jpg", b"x", "image/jpeg")) for i in range(n)]
            r = client.post(route, files=files, data={"name": "Fido"}, headers=user.headers)
            body = assert_error(r, 422, "too_many_files")
            assert "3" in body["message"], body


# -- probes, metrics, docs ------------------------------------------------------------------


def test_metrics_is_public_and_names_no_user(api_client, user):
    api_client.get("/search", params={"q": "x"}, headers=user.headers)
    r = api_client.get("/metrics")
    assert r.status_code == 200
    assert user.id not in r.text and user.key not in r.text


def test_made_up_methods_do_not_grow_the_metrics(api_client):
    for i in range(5):
        api_client.request(f"FOO{i}", "/healthz")
    text = api_client.get("/metrics").text
    assert "FOO" not in text and 'method="other"' in text


def test_readyz_answers_at_once_while_the_model_loads(db_settings, monkeypatch):
    started, release = threading.Event(), threading.Event()

    def slow_load(_cfg):  # called by ModelLoader.get under its lock, for the whole load
        started.set()
        release.wait(30)
        raise model_service.ModelUnavailable("test loader gave up")

    monkeypatch.setattr(model_service, "load_model", slow_load)
    db_settings.model.preload = True
    try:
        with TestClient(create_app(db_settings)) as client:
            assert started.wait(10)
            r = client.get("/readyz")  # used to wait for the loader's lock
            assert r.status_code == 503
            assert r.json()["status"] == "loading"
            assert r.json()["checks"]["model"]["detail"].startswith("loading")
            user = __import__("tests.db_fixtures", fromlist=["x"]).create_api_user(client)
            r = client.get("/search", params={"q": "x"}, headers=user.headers)
            assert_error(r, 503, "model_loading")
            release.set()
    finally:
        release.set()


def test_docs_page_uses_local_assets(api_client):
    page = api_client.get("/docs")
    assert page.status_code == 200
    assert "cdn" not in page.text.lower()
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert asset in page.text
        url = next(p for p in page.text.split('"') if p.endswith(asset))
        assert api_client.get(url).status_code == 200


# -- docs/API.md's error table and the OpenAPI say what the code answers ---------------------


def test_api_doc_error_table_names_real_codes_and_documented_statuses(client):
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    page = (root / "docs" / "API.md").read_text()
    rows = re.findall(r"^\| (\d{3}) \| (.+?) \| .+ \|$", page, re.M)
    assert rows, "docs/API.md has an error table"
    source = "\n".join(p.read_text() for p in (root / "app").rglob("*.py"))
    for _status, codes in rows:
        for code in re.findall(r"`([a-z_]+)`", codes):
            assert f'"{code}"' in source, f"docs/API.md names {code!r}, which no code raises"
    documented = {
        status
        for item in client.get("/openapi.json").json()["paths"].values()
        for op in item.values()
        for status in op["responses"]
    }
    assert {status for status, _ in rows} <= documented


def test_openapi_public_routes_have_no_security_and_search_states_its_limits(client):
    doc = client.get("/openapi.json").json()
    for path in ("/healthz", "/readyz", "/metrics"):
        op = doc["paths"][path]["get"]
        assert "security" not in op and "401" not in op["responses"]
    assert doc["paths"]["/images"]["get"]["security"]
    params = {p["name"]: p for p in doc["paths"]["/search"]["get"]["parameters"]}
    assert params["k"]["schema"]["maximum"] == 200
    assert params["offset"]["schema"]["maximum"] == 10_000
    assert params["q"]["schema"]["minLength"] == 1
    assert params["q"]["schema"]["maxLength"] == 1000
    cursor = {p["name"]: p for p in doc["paths"]["/images"]["get"]["parameters"]}["cursor"]
    assert cursor["schema"]["pattern"] == "^[A-Za-z0-9_=-]*$"
    for status in ("400", "413", "422"):
        assert status in doc["paths"]["/images"]["post"]["responses"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]


# -- bodies: the route sets the limit, and a keyed route reads none without a good key --------


def test_a_json_route_keeps_its_limit_when_the_body_claims_to_be_multipart(api_client, user):
    """The client's Content-Type used to choose the limit: labelled multipart, a 2 MB body for
    /search was read in full (the upload limit is gigabytes)."""
    body = b"--b\r\n" + b"a" * (2 * 1024 * 1024)
    headers = {**user.headers, "content-type": "multipart/form-data; boundary=b"}
    r = api_client.post("/search", content=body, headers=headers)
    assert_error(r, 413, "payload_too_large")
    assert (
        r.json()["error"]["detail"]["max_bytes"]
        == api_client.app.state.container.settings.limits.max_json_bytes
    )


def _call(app: Any, middleware: Any, headers: dict[str, str], path: str = "/images") -> Any:
    """Run one request through `middleware` alone; what it read of the body and what it sent."""
    import asyncio

    read: list[bytes] = []
    sent: list[dict[str, Any]] = []
    reached: list[bool] = []

    async def receive() -> dict[str, Any]:
        read.append(b"x" * 1024)
        return {"type": "http.request", "body": read[-1], "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def inner(*_: Any) -> None:
        reached.append(True)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "root_path": "",
        "query_string": b"",
        "app": app,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    asyncio.run(middleware(inner)(scope, receive, send))
    status = next((m["status"] for m in sent if m["type"] == "http.response.start"), None)
    return status, read, reached


@pytest.mark.parametrize(
    "authorization",
    [None, "Basic abc", "Bearer", "Bearer polar_bad", "Bearer polar_aaaaaaaa_bbbbbbbbbbbbbbbb"],
)
def test_an_upload_without_a_good_key_is_refused_before_its_body_is_read(
    api_client, user, authorization
):
    """FastAPI parses a body before the AUTH dependency runs: a key-less 100 MB upload was
    spooled to disk to answer 401. The gate answers first and reads nothing."""
    from app.api.deps import KeyBeforeBody

    factory = api_client.app.state.container.session_factory
    headers = {"content-type": "multipart/form-data; boundary=b", "content-length": str(10**8)}
    if authorization is not None:
        headers["authorization"] = authorization

    def gate(inner: Any) -> Any:
        return KeyBeforeBody(inner, session_factory=factory)

    status, read, reached = _call(api_client.app, gate, headers)
    assert (status, read, reached) == (401, [], [])
    # With the user's key the request goes on to the app, which reads the body.
    status, read, reached = _call(
        api_client.app, gate, {**headers, "authorization": user.headers["Authorization"]}
    )
    assert reached == [True]
    # Public routes (Immich's /predict sends no key) are not gated.
    assert _call(api_client.app, gate, headers, path="/predict")[2] == [True]


def test_an_upload_without_a_key_gets_the_usual_401(api_client, user):  # noqa: ARG001
    files = [("files", ("a.png", b"\x89PNG" + b"0" * 5000, "image/png"))]
    r = api_client.post("/images", files=files)
    assert_error(r, 401, "unauthorized")
    r = api_client.post("/images", files=files, headers={"Authorization": "Bearer polar_x_y"})
    assert_error(r, 401, "unauthorized")


@pytest.mark.parametrize("body", ['{"q":', '{"q": "hat"', "{", '{"q": "hat"}}'])
def test_a_body_that_is_not_json_is_400(api_client, user, body):
    r = api_client.post("/search", content=body, headers={**user.headers, **JSON})
    assert_error(r, 400, "bad_request")
    assert "not valid JSON" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "url",
    [
        "/search?q=%FF",
        "/search?q=hat%ED%A0%80",  # a UTF-8-encoded lone surrogate
        "/search?q=hat&k=%C3",
        "/images/%ED%A0%80/file",
        "/concepts/abc%FF",
    ],
)
def test_a_url_that_is_not_utf8_is_422_not_replaced(api_client, user, url):
    """Starlette decoded these with replacement characters: the search ran for "\ufffd"."""
    r = api_client.get(url, headers=user.headers)
    assert_error(r, 422, "invalid_utf8")


def test_a_percent_encoded_utf8_url_is_fine(api_client, user):
    r = api_client.get("/search?q=caf%C3%A9+%E2%98%95", headers=user.headers)
    assert r.status_code == 200, r.text
    assert r.json()["query"] == "café ☕"


@pytest.mark.parametrize(
    "extra",
    [
        {"k": 5.0},
        {"k": True},
        {"k": "5"},
        {"offset": False},
        {"personalize": 0},
        {"personalize": "yes"},
        # A number is not a date-time (lax mode read it as Unix time).
        {"filters": {"taken_before": 0}},
        {"filters": {"created_after": 1.7e9}},
        {"filters": {"taken_after": True}},
    ],
)
def test_json_numbers_and_booleans_are_strict(api_client, user, extra):
    """Pydantic's lax mode took these (k=true ran as k=1)."""
    r = api_client.post("/search", json={"q": "hat", **extra}, headers=user.headers)
    assert_error(r, 422, "validation_failed")
    if "personalize" in extra:
        r = api_client.post("/embed/text", json={"q": "hat", **extra}, headers=user.headers)
        assert_error(r, 422, "validation_failed")


def test_bad_ranges_on_files_get_the_json_error_shape(api_client, user):
    """Starlette answered these itself in plain text (416 with an empty body)."""
    from tests.db_fixtures import noisy_jpeg

    data = noisy_jpeg(seed=5)
    files = [("files", ("a.jpg", data, "image/jpeg"))]
    image = api_client.post("/images", files=files, headers=user.headers).json()["images"][0]
    for url in (image["file_url"], image["thumbnail_url"]):
        r = api_client.get(url, headers={**user.headers, "Range": "bytes=99999999-"})
        assert_error(r, 416, "range_not_satisfiable")
        assert r.headers["content-range"].startswith("bytes */")
        for bad in ("bytes=5-2", "items=0-1", "bytes=x-y"):
            r = api_client.get(url, headers={**user.headers, "Range": bad})
            assert_error(r, 400, "bad_request")
        r = api_client.get(url, headers={**user.headers, "Range": "bytes=0-9"})
        assert r.status_code == 206 and len(r.content) == 10
    got = api_client.get(image["file_url"], headers={**user.headers, "Range": "bytes=0-9"})
    assert got.content == data[:10]


@pytest.mark.parametrize(
    ("method", "url", "allowed"),
    [
        ("PUT", "/images", {"GET", "HEAD", "POST"}),
        ("PUT", "/concepts/x", {"GET", "HEAD", "PATCH", "DELETE"}),
        ("DELETE", "/search", {"GET", "HEAD", "POST"}),
        ("PUT", "/libraries", {"GET", "HEAD", "POST"}),
        ("PUT", "/embed/text", {"POST"}),
    ],
)
def test_a_405_names_every_method_the_path_answers_to(api_client, user, method, url, allowed):
    """One route per method: Starlette's Allow named only the first route's."""
    r = api_client.request(method, url, headers=user.headers)
    assert_error(r, 405, "method_not_allowed")
    assert set(r.headers["allow"].split(", ")) == allowed
