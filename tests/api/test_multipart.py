"""Form bodies read strictly (app/api/forms.py): text and file names that are not UTF-8 are a
422 `invalid_utf8`, a multipart body cut off before its closing boundary or framed with another
boundary a 400 `bad_request`; either way nothing is stored.

Starlette decoded such text as Latin-1 (`Rex\\xff` became the concept "Rexÿ") and took a cut-off
body as its complete parts (the request then failed for a missing field, or went on with the
files that made it).
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from app.api.errors import body_kinds
from app.api.forms import FormRoute
from app.main import api_routes
from app.models import Concept, ConceptExample, Job
from app.models import Image as ImageRow
from tests.api.test_auth import assert_error
from tests.api.test_search import upload, wait_jobs
from tests.db_fixtures import noisy_jpeg
from tests.model_fixtures import tiny_serving  # noqa: F401

BOUNDARY = b"polar-form-boundary"
MULTIPART = {"content-type": f"multipart/form-data; boundary={BOUNDARY.decode()}"}


@pytest.fixture
def user(api_client, make_user, tiny_serving):  # noqa: F811, ARG001 (installs the model)
    return make_user(api_client)


def field(name: bytes, value: bytes) -> bytes:
    return b'Content-Disposition: form-data; name="' + name + b'"\r\n\r\n' + value


def file(filename: bytes, data: bytes, name: bytes = b"files") -> bytes:
    return (
        b'Content-Disposition: form-data; name="' + name + b'"; filename="' + filename + b'"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n" + data
    )


def multipart(*parts: bytes) -> bytes:
    """A complete multipart body of `parts` (each its headers, a blank line and its data)."""
    body = b"".join(b"--" + BOUNDARY + b"\r\n" + part + b"\r\n" for part in parts)
    return body + b"--" + BOUNDARY + b"--\r\n"


def photos(n: int = 3, seed: int = 0) -> list[bytes]:
    return [file(b"p%d.jpg" % i, noisy_jpeg(seed=seed + i)) for i in range(n)]


def counts(client: Any) -> tuple[int, ...]:
    with client.app.state.container.session_factory() as s:
        return tuple(
            s.scalar(select(func.count()).select_from(m)) or 0
            for m in (Concept, ConceptExample, ImageRow, Job)
        )


def stored_files(client: Any) -> list[str]:
    data = client.app.state.container.settings.data_dir
    return sorted(
        str(p.relative_to(data))
        for p in data.rglob("*")
        if p.is_file() and p.parts[len(data.parts)] in ("originals", "thumbs")
    )


def assert_nothing_new(client: Any, before: tuple[tuple[int, ...], list[str]]) -> None:
    assert (counts(client), stored_files(client)) == before


def post(client: Any, user: Any, url: str, body: bytes, headers: dict[str, str] = MULTIPART):
    return client.post(url, content=body, headers={**user.headers, **headers})


# -- text that is not UTF-8 ------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        field(b"name", b"Rex\xff"),  # the audit's case: stored as "Rexÿ"
        field(b"name", b"Rex\xed\xa0\x80"),  # an encoded lone surrogate
        field(b"name", b"Rex\xc3"),  # cut off mid-character
    ],
    ids=["latin-1", "surrogate", "cut-character"],
)
def test_a_concept_name_that_is_not_utf8_is_422_and_stores_nothing(api_client, user, bad):
    before = (counts(api_client), stored_files(api_client))
    r = post(api_client, user, "/concepts", multipart(bad, *photos()))
    err = assert_error(r, 422, "invalid_utf8")
    assert "'name'" in err["message"]
    assert_nothing_new(api_client, before)
    assert api_client.get("/concepts", headers=user.headers).json()["items"] == []


def test_a_category_that_is_not_utf8_is_422(api_client, user):
    body = multipart(field(b"name", b"Rex"), field(b"category", b"d\xf6g"), *photos())
    err = assert_error(post(api_client, user, "/concepts", body), 422, "invalid_utf8")
    assert "'category'" in err["message"]
    assert counts(api_client) == (0, 0, 0, 0)


def test_a_field_name_that_is_not_utf8_is_422(api_client, user):
    body = multipart(field(b"name", b"Rex"), field(b"n\xe4me", b"x"), *photos())
    assert_error(post(api_client, user, "/concepts", body), 422, "invalid_utf8")
    assert counts(api_client) == (0, 0, 0, 0)


@pytest.mark.parametrize("url", ["/images", "/concepts"])
def test_a_file_name_that_is_not_utf8_is_422_and_stores_nothing(api_client, user, url):
    before = (counts(api_client), stored_files(api_client))
    named = [field(b"name", b"Rex")] if url == "/concepts" else []
    files = [*photos(2), file(b"caf\xe9.jpg", noisy_jpeg(seed=9))]
    err = assert_error(post(api_client, user, url, multipart(*named, *files)), 422, "invalid_utf8")
    assert "file name" in err["message"] and "part" in err["message"]
    assert_nothing_new(api_client, before)


def test_utf8_names_and_file_names_arrive_unchanged(api_client, user):
    r = post(
        api_client, user, "/images", multipart(file("café ☕.jpg".encode(), noisy_jpeg(seed=5)))
    )
    assert r.status_code == 202, r.text
    assert r.json()["images"][0]["filename"] == "café ☕.jpg"
    body = multipart(field(b"name", "Fidò".encode()), *photos(seed=10))
    r = post(api_client, user, "/concepts", body)
    assert r.status_code == 202, r.text
    assert r.json()["concept"]["name"] == "Fidò"


@pytest.mark.parametrize("charset", ["latin-1", "utf-16", "bogus"])
def test_a_declared_charset_does_not_change_how_text_is_read(api_client, user, charset):
    """Starlette decoded names and text with the Content-Type's `charset` (Latin-1 for one it
    does not know): "Café" sent in UTF-8 under `charset=latin-1` became "CafÃ©"."""
    headers = {"content-type": f"{MULTIPART['content-type']}; charset={charset}"}
    body = multipart(file("café.jpg".encode(), noisy_jpeg(seed=6)))
    r = post(api_client, user, "/images", body, headers)
    assert r.status_code == 202, r.text
    assert r.json()["images"][0]["filename"] == "café.jpg"
    body = multipart(field(b"name", "Café".encode()), *photos(seed=20))
    r = post(api_client, user, "/concepts", body, headers)
    assert r.status_code == 202, r.text
    assert r.json()["concept"]["name"] == "Café"
    body = multipart(field(b"name", "Caf\xe9".encode("latin-1")), *photos(seed=30))
    assert_error(post(api_client, user, "/concepts", body, headers), 422, "invalid_utf8")


def test_a_url_encoded_form_is_utf8_too(api_client, user):
    """POST /concepts takes a URL-encoded form too (library image ids, no files): `%FF` was
    decoded to U+FFFD and raw UTF-8 bytes as Latin-1 ("Fidò" became "FidÃ²")."""
    ids = upload(api_client, user, range(3))
    wait_jobs(api_client)
    form = {"content-type": "application/x-www-form-urlencoded"}
    query = b"&".join(b"image_ids=" + i.encode() for i in ids)
    for bad in (b"name=Rex%FF&", b"name=Rex\xff&", b"na%FFme=Rex&name=Rex&"):
        r = post(api_client, user, "/concepts", bad + query, form)
        assert_error(r, 422, "invalid_utf8")
    assert counts(api_client)[0] == 0
    r = post(api_client, user, "/concepts", "name=Fidò&".encode() + query, form)
    assert r.status_code == 202, r.text
    assert r.json()["concept"]["name"] == "Fidò"
    r = post(api_client, user, "/concepts", b"name=Rex+the%20Dog&" + query, form)
    assert r.status_code == 202, r.text
    assert r.json()["concept"]["name"] == "Rex the Dog"


# -- bodies cut off, or framed with another boundary -----------------------------------------


@pytest.mark.parametrize("url", ["/images", "/concepts"])
@pytest.mark.parametrize(
    "cut",
    [
        lambda body: body[: len(body) * 3 // 4],  # in the last photo's bytes
        lambda body: body[: body.rindex(b"Content-Type: image/jpeg") + 10],  # in its headers
        lambda body: body[: body.rindex(b"--" + BOUNDARY + b"--")],  # before the closing line
        lambda body: body[: body.rindex(b"--" + BOUNDARY + b"--") + 4],  # in the closing line
        lambda _: b"",  # nothing at all
    ],
    ids=["in-data", "in-headers", "before-closing", "in-closing", "empty"],
)
def test_a_cut_off_multipart_body_is_400_and_stores_nothing(api_client, user, url, cut):
    """The audit's case: a cut-off /concepts answered 422 `files: Field required`, and a
    cut-off /images stored the photos that made it."""
    before = (counts(api_client), stored_files(api_client))
    named = [field(b"name", b"Rex")] if url == "/concepts" else []
    r = post(api_client, user, url, cut(multipart(*named, *photos(4))))
    err = assert_error(r, 400, "bad_request")
    assert "incomplete" in err["message"] and "boundary" in err["message"]
    assert_nothing_new(api_client, before)


def test_a_body_with_another_boundary_is_400(api_client, user):
    body = multipart(field(b"name", b"Rex"), *photos())
    other = {"content-type": "multipart/form-data; boundary=not-the-one"}
    err = assert_error(post(api_client, user, "/concepts", body, other), 400, "bad_request")
    assert "malformed" in err["message"]
    # The boundary only in the middle (a preamble the client did not mean).
    body = b"preamble\r\n" + body
    err = assert_error(post(api_client, user, "/concepts", body), 400, "bad_request")
    assert "malformed" in err["message"]
    assert counts(api_client) == (0, 0, 0, 0)


@pytest.mark.parametrize("content_type", ["multipart/form-data", "multipart/form-data; boundary="])
def test_a_multipart_body_without_a_boundary_is_400(api_client, user, content_type):
    body = multipart(field(b"name", b"Rex"), *photos())
    r = post(api_client, user, "/concepts", body, {"content-type": content_type})
    err = assert_error(r, 400, "bad_request")
    assert "boundary" in err["message"]


def test_a_complete_body_with_an_epilogue_is_read(api_client, user):
    """Text after the closing boundary is the epilogue (RFC 2046 5.1.1): ignored, not an error."""
    body = multipart(*photos(1, seed=40)) + b"epilogue\r\n"
    assert post(api_client, user, "/images", body).status_code == 202


def test_every_route_that_takes_a_form_reads_it_strictly(api_client):
    marked = body_kinds(api_routes(api_client.app.state.container.settings))
    assert len(marked) >= 3  # POST /images, /concepts, /concepts/{id}/examples
    assert all(isinstance(route, FormRoute) for route, _ in marked)
