"""Conditional GET of the file routes: strong ETags from the content hash, 304 Not Modified for a
matching If-None-Match (RFC 9110 13.1.2), Range and If-Range still working; and a folder's
photo changed since its scan is refused (409 `file_changed`), not served under its old type.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from app.api.files import none_match
from app.config import Settings
from tests.api.test_auth import assert_error
from tests.api.test_libraries import library_settings, paths
from tests.api.test_search import upload, wait_jobs
from tests.db_fixtures import image_bytes, noisy_jpeg
from tests.model_fixtures import tiny_serving  # noqa: F401


@pytest.fixture
def db_settings(tmp_path: Path, db_url: str) -> Settings:
    # Libraries under tmp_path/photos, scanned only on request.
    return library_settings(tmp_path, db_url, watch=False, rescan_interval_s=0)


@pytest.fixture
def files(api_client, make_user, tiny_serving) -> tuple[Any, dict[str, str], str]:  # noqa: F811, ARG001 (installs the model)
    """A user; the URLs of an upload's original and thumbnail and of a concept photo's; the
    upload's sha256."""
    user = make_user(api_client)
    image_id = upload(api_client, user, range(1))[0]
    photos = [("files", (f"c{i}.jpg", noisy_jpeg(seed=20 + i), "image/jpeg")) for i in range(3)]
    r = api_client.post("/concepts", data={"name": "Fido"}, files=photos, headers=user.headers)
    assert r.status_code == 202, r.text
    concept_id = r.json()["concept"]["id"]
    wait_jobs(api_client)
    example = api_client.get(f"/concepts/{concept_id}/examples", headers=user.headers).json()
    example_url = f"/concepts/{concept_id}/examples/{example['items'][0]['id']}"
    urls = {
        "file": f"/images/{image_id}/file",
        "thumbnail": f"/images/{image_id}/thumbnail",
        "example_file": f"{example_url}/file",
        "example_thumbnail": f"{example_url}/thumbnail",
    }
    sha = api_client.get(f"/images/{image_id}", headers=user.headers).json()["sha256"]
    return user, urls, sha


def test_every_file_route_answers_304_for_its_etag(api_client, files):
    user, urls, _ = files
    for name, url in urls.items():
        got = api_client.get(url, headers=user.headers)
        assert got.status_code == 200, (name, got.text)
        etag = got.headers["etag"]
        assert etag.startswith('"') and etag.endswith('"'), name  # strong
        assert "immutable" in got.headers["cache-control"], name
        for asked in (etag, f'"other", {etag}', f"W/{etag}", "*", f'"x,y", W/{etag}'):
            for method in ("GET", "HEAD"):
                r = api_client.request(
                    method, url, headers={**user.headers, "If-None-Match": asked}
                )
                assert r.status_code == 304, (name, asked, method)
                assert r.content == b""
                assert r.headers["etag"] == etag
                assert r.headers["cache-control"] == got.headers["cache-control"]
                assert "content-length" not in r.headers
        for other in ('"other"', 'W/"other"', etag[:-2] + '"', "garbage"):
            r = api_client.get(url, headers={**user.headers, "If-None-Match": other})
            assert r.status_code == 200 and r.content == got.content, (name, other)
        # Two If-None-Match field lines are one list.
        two = [("If-None-Match", '"other"'), ("If-None-Match", etag)]
        r = api_client.get(url, headers=[*user.headers.items(), *two])
        assert r.status_code == 304, name


def test_an_uploads_etag_is_its_content_hash(api_client, files):
    user, urls, sha = files
    assert api_client.get(urls["file"], headers=user.headers).headers["etag"] == f'"{sha}"'
    # The thumbnail is another representation: another tag.
    assert api_client.get(urls["thumbnail"], headers=user.headers).headers["etag"] != f'"{sha}"'


def test_a_stale_etag_still_gets_its_range_and_if_range_picks_whole_or_part(api_client, files):
    user, urls, _ = files
    whole = api_client.get(urls["file"], headers=user.headers)
    etag = whole.headers["etag"]
    r = api_client.get(
        urls["file"], headers={**user.headers, "If-None-Match": '"old"', "Range": "bytes=0-9"}
    )
    assert r.status_code == 206 and r.content == whole.content[:10]
    # A matching If-None-Match wins over Range (RFC 9110 13.2.2).
    r = api_client.get(
        urls["file"], headers={**user.headers, "If-None-Match": etag, "Range": "bytes=0-9"}
    )
    assert r.status_code == 304
    r = api_client.get(
        urls["file"], headers={**user.headers, "If-Range": etag, "Range": "bytes=2-5"}
    )
    assert r.status_code == 206 and r.content == whole.content[2:6]
    r = api_client.get(
        urls["file"], headers={**user.headers, "If-Range": '"old"', "Range": "bytes=2-5"}
    )
    assert r.status_code == 200 and r.content == whole.content


def test_the_etag_does_not_reveal_a_file_to_another_user(api_client, make_user, files):
    _, urls, _ = files
    bob = make_user(api_client, "bob")
    for url in urls.values():
        r = api_client.get(url, headers={**bob.headers, "If-None-Match": "*"})
        assert_error(r, 404, "not_found")


def _folder_photo(api_client: Any, user: Any, lib: Path, data: bytes) -> tuple[str, str]:
    (lib / "a.jpg").write_bytes(data)
    r = api_client.post("/libraries", json={"path": str(lib)}, headers=user.headers)
    assert r.status_code == 202, r.text
    wait_jobs(api_client)
    return r.json()["id"], paths(api_client, user)[str(lib / "a.jpg")]


def test_a_folder_photo_changed_since_its_scan_is_refused_until_rescanned(api_client, folder_user):
    user, lib = folder_user
    data = noisy_jpeg(seed=71)
    lib_id, image_id = _folder_photo(api_client, user, lib, data)
    url = f"/images/{image_id}/file"
    got = api_client.get(url, headers=user.headers)
    assert got.status_code == 200 and got.content == data
    assert got.headers["content-type"] == "image/jpeg"
    assert got.headers["cache-control"] == "private, no-cache"  # revalidated: it may change
    etag = got.headers["etag"]
    r = api_client.get(url, headers={**user.headers, "If-None-Match": etag})
    assert r.status_code == 304 and r.headers["etag"] == etag

    # Overwritten with text: not served as a JPEG, not a 304 for the old tag either.
    (lib / "a.jpg").write_bytes(b"just some text, no longer a photo\n")
    for headers in (user.headers, {**user.headers, "If-None-Match": etag}):
        err = assert_error(api_client.get(url, headers=headers), 409, "file_changed")
        assert "scan" in err["message"] and err["detail"] == {"library_id": lib_id}
    assert api_client.head(url, headers=user.headers).status_code == 409

    # Another photo (a PNG) in its place: once rescanned, served as what it is now.
    png = image_bytes("PNG", color=(10, 200, 10))
    (lib / "a.jpg").write_bytes(png)
    os.utime(lib / "a.jpg", ns=(10**18, 10**18))
    assert_error(api_client.get(url, headers=user.headers), 409, "file_changed")
    assert api_client.post(f"/libraries/{lib_id}/scan", headers=user.headers).status_code == 202
    wait_jobs(api_client)
    assert paths(api_client, user)[str(lib / "a.jpg")] == image_id  # same image, re-read
    r = api_client.get(url, headers={**user.headers, "If-None-Match": etag})
    assert r.status_code == 200 and r.content == png
    assert r.headers["content-type"] == "image/png"
    assert r.headers["etag"] != etag


def test_a_touched_folder_photo_gets_a_new_etag_after_its_rescan(api_client, folder_user):
    user, lib = folder_user
    lib_id, image_id = _folder_photo(api_client, user, lib, noisy_jpeg(seed=72))
    url = f"/images/{image_id}/file"
    etag = api_client.get(url, headers=user.headers).headers["etag"]
    os.utime(lib / "a.jpg", ns=(10**18, 10**18))  # same bytes, another modification time
    assert_error(api_client.get(url, headers=user.headers), 409, "file_changed")
    assert api_client.post(f"/libraries/{lib_id}/scan", headers=user.headers).status_code == 202
    wait_jobs(api_client)
    r = api_client.get(url, headers={**user.headers, "If-None-Match": etag})
    assert r.status_code == 200 and r.headers["etag"] != etag


@pytest.mark.parametrize(
    ("values", "matches"),
    [
        (['"a"'], True),
        (['W/"a"'], True),  # weak comparison
        (['"b", "a"'], True),
        (['"b"', ' "a" '], True),  # two field lines
        (["*"], True),
        ([" * "], True),
        (['"b"'], False),
        (['"a-"', '"A"'], False),
        (['"a,b"'], False),  # a comma inside a tag is part of it
        (["a"], False),  # not a quoted tag
        ([""], False),
        ([], False),
    ],
)
def test_if_none_match_is_compared_as_rfc_9110_says(values, matches):
    assert none_match(values, '"a"') is matches
