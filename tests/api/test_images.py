"""/images through HTTP, on SQLite and PostgreSQL: every route's success and error paths."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from app.main import create_app
from app.models import Image as ImageRow
from app.models import Job, User
from tests.db_fixtures import image_bytes, noisy_jpeg, png_claiming
from tests.fakes import RecordingQueue, use_queue


@pytest.fixture(autouse=True)
def queue(request: pytest.FixtureRequest) -> RecordingQueue:
    """These tests are about /images: jobs are only recorded. Embedding runs (and is tested)
    in test_search.py."""
    recorder = RecordingQueue()
    for name in ("api_client", "client"):
        if name in request.fixturenames:
            use_queue(request.getfixturevalue(name), recorder)
    return recorder


def colour(i: int) -> tuple[int, int, int]:
    """A distinct colour per index (so each image has distinct content)."""
    return (i * 37 % 256, i * 91 % 256, i * 53 % 256)


def jpeg(i: int = 0) -> bytes:
    return image_bytes("JPEG", (32, 24), colour(i))


def upload(client: TestClient, user, *files: tuple[str, bytes]):
    return client.post(
        "/images",
        files=[("files", (name, data, "application/octet-stream")) for name, data in files],
        headers=user.headers,
    )


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    assert set(body["error"]) <= {"code", "message", "detail"}
    return body["error"]


def count(client: TestClient, model: Any) -> int:
    with client.app.state.container.session_factory() as s:
        return s.scalar(select(func.count()).select_from(model))


def stored_files(client: TestClient) -> list[Path]:
    root = client.app.state.container.settings.data_dir
    return [
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix != ".db" and "-wal" not in p.name and "-shm" not in p.name
    ]


def assert_nothing_stored(client: TestClient) -> None:
    assert count(client, ImageRow) == 0
    assert count(client, Job) == 0
    assert stored_files(client) == []


@contextmanager
def client_with_limits(db_settings, **limits: int) -> Iterator[TestClient]:
    for name, value in limits.items():
        setattr(db_settings.limits, name, value)
    with TestClient(create_app(db_settings)) as client:
        yield client


# -- upload ---------------------------------------------------------------------------------


def test_upload_one_image(api_client, make_user):
    user = make_user(api_client)
    data = jpeg()
    r = upload(api_client, user, ("beach.jpg", data))
    assert r.status_code == 202, r.text
    body = r.json()
    [img] = body["images"]
    assert img["filename"] == "beach.jpg"
    assert (img["mime"], img["width"], img["height"]) == ("image/jpeg", 32, 24)
    assert img["size_bytes"] == len(data)
    assert img["duplicate"] is False and img["embedded"] is False
    assert img["file_url"] == f"/images/{img['id']}/file"

    job = body["job"]
    assert (job["kind"], job["state"], job["progress"]) == ("embed_images", "queued", 0.0)
    with api_client.app.state.container.session_factory() as s:
        row = s.get(Job, job["id"])
        assert row.user_id == user.id
        assert row.payload == {"image_ids": [img["id"]]}

    got = api_client.get(f"/images/{img['id']}", headers=user.headers)
    assert got.status_code == 200
    assert {k: v for k, v in img.items() if k != "duplicate"} == got.json()


def test_upload_many_formats_in_one_request(api_client, make_user):
    user = make_user(api_client)
    formats = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
    formats |= {"GIF": "image/gif", "BMP": "image/bmp", "TIFF": "image/tiff"}
    formats |= {"HEIF": "image/heic"}  # iPhone photos
    files = [
        (f"f{i}.{fmt.lower()}", image_bytes(fmt, (20, 10), colour(i)))
        for i, fmt in enumerate(formats)
    ]
    r = upload(api_client, user, *files)
    assert r.status_code == 202, r.text
    images = r.json()["images"]
    assert [i["mime"] for i in images] == list(formats.values())
    assert [i["filename"] for i in images] == [name for name, _ in files]
    with api_client.app.state.container.session_factory() as s:
        job = s.get(Job, r.json()["job"]["id"])
        assert job.payload["image_ids"] == [i["id"] for i in images]


def test_the_queue_gets_the_committed_job(api_client, make_user, queue):
    user = make_user(api_client)
    r = upload(api_client, user, ("a.jpg", jpeg()))
    assert queue.job_ids == [r.json()["job"]["id"]]
    with api_client.app.state.container.session_factory() as s:  # committed before it was enqueued
        assert s.get(Job, queue.job_ids[0]).state == "queued"


def test_a_queue_that_is_down_does_not_fail_the_upload(api_client, make_user, queue):
    queue.fail = True
    user = make_user(api_client)
    r = upload(api_client, user, ("a.jpg", jpeg()))
    assert r.status_code == 202
    assert count(api_client, Job) == 1  # recorded as queued: the database is the queue of record


def test_duplicates_return_the_existing_image(api_client, make_user):
    user = make_user(api_client)
    first = upload(api_client, user, ("a.jpg", jpeg(1))).json()["images"][0]
    r = upload(
        api_client, user, ("copy.jpg", jpeg(1)), ("new.jpg", jpeg(2)), ("again.jpg", jpeg(2))
    )
    assert r.status_code == 202
    dup, new, again = r.json()["images"]
    assert dup["id"] == first["id"] and dup["duplicate"] is True
    assert dup["filename"] == "a.jpg"  # the existing image, unchanged
    assert new["duplicate"] is False
    assert again["id"] == new["id"] and again["duplicate"] is True
    assert count(api_client, ImageRow) == 2
    originals = [p for p in stored_files(api_client) if "originals" in p.parts]
    assert len(originals) == 2


def test_uploading_only_embedded_duplicates_queues_no_job(api_client, make_user):
    user = make_user(api_client)
    img_id = upload(api_client, user, ("a.jpg", jpeg())).json()["images"][0]["id"]
    with api_client.app.state.container.session_factory() as s:
        row = s.get(ImageRow, img_id)
        row.embedding, row.embedding_model = b"\0" * 16, "some-model"  # as the embed job does
        s.commit()
    r = upload(api_client, user, ("a.jpg", jpeg()))
    assert r.status_code == 202
    assert r.json()["job"] is None
    assert r.json()["images"][0]["embedded"] is True
    assert count(api_client, Job) == 1


def test_same_content_for_two_users_is_two_images(api_client, make_user):
    alice, bob = make_user(api_client, "alice"), make_user(api_client, "bob")
    a = upload(api_client, alice, ("a.jpg", jpeg())).json()["images"][0]
    b = upload(api_client, bob, ("b.jpg", jpeg())).json()["images"][0]
    assert a["id"] != b["id"] and b["duplicate"] is False
    # One file on disk serves both; deleting Alice's image must keep Bob's bytes.
    assert api_client.delete(f"/images/{a['id']}", headers=alice.headers).status_code == 204
    r = api_client.get(f"/images/{b['id']}/file", headers=bob.headers)
    assert r.status_code == 200 and r.content == jpeg()


def test_exif_orientation_is_applied(api_client, make_user):
    user = make_user(api_client)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = image_bytes("JPEG", (60, 20), exif=exif.tobytes())
    img = upload(api_client, user, ("phone.jpg", data)).json()["images"][0]
    assert (img["width"], img["height"]) == (20, 60)


@pytest.mark.parametrize(
    ("raw", "shown"),
    [("../../etc/passwd.png", "passwd.png"), ("C:\\Users\\me\\cat.png", "cat.png")],
)
def test_path_like_filenames_are_reduced_to_their_base_name(api_client, make_user, raw, shown):
    user = make_user(api_client)
    r = upload(api_client, user, (raw, image_bytes("PNG")))
    assert r.status_code == 202, r.text
    assert r.json()["images"][0]["filename"] == shown
    files = stored_files(api_client)
    assert files and all("passwd" not in str(p) and "cat" not in p.name for p in files)
    data_dir = api_client.app.state.container.settings.data_dir.resolve()
    assert all(p.resolve().is_relative_to(data_dir) for p in files)


# -- rejected uploads store nothing -----------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"just some text, not an image", 422, "invalid_image"),
        (b"", 422, "invalid_image"),
        (noisy_jpeg()[: len(noisy_jpeg()) * 2 // 3], 422, "invalid_image"),
        (png_claiming(100_000, 100_000), 422, "image_too_large"),
        (image_bytes("ICO", (16, 16)), 415, "unsupported_media"),
    ],
    ids=["not-an-image", "zero-byte", "truncated-jpeg", "decompression-bomb", "unknown-format"],
)
def test_bad_file_is_rejected_and_nothing_is_stored(api_client, make_user, data, status, code):
    user = make_user(api_client)
    err = assert_error(upload(api_client, user, ("bad.bin", data)), status, code)
    assert err["detail"]["files"] == [
        {
            "index": 0,
            "filename": "bad.bin",
            "code": code,
            "message": err["detail"]["files"][0]["message"],
        }
    ]
    assert_nothing_stored(api_client)


def test_one_bad_file_rejects_the_whole_request(api_client, make_user):
    user = make_user(api_client)
    r = upload(
        api_client,
        user,
        ("good.jpg", jpeg(1)),
        ("empty.jpg", b""),
        ("good2.jpg", jpeg(2)),
        ("x.txt", b"hi"),
    )
    err = assert_error(r, 422, "invalid_image")
    assert [(f["index"], f["filename"]) for f in err["detail"]["files"]] == [
        (1, "empty.jpg"),
        (3, "x.txt"),
    ]
    assert "empty.jpg" in err["message"] and "x.txt" in err["message"]
    assert_nothing_stored(api_client)


def test_file_over_the_size_limit_is_413(db_settings, make_user):
    small, big = image_bytes("PNG", (8, 8)), noisy_jpeg((128, 128))
    with client_with_limits(db_settings, max_upload_bytes=len(big) - 1) as client:
        user = make_user(client)
        err = assert_error(
            upload(client, user, ("ok.png", small), ("big.jpg", big)), 413, "payload_too_large"
        )
        assert err["detail"]["files"][0]["filename"] == "big.jpg"
        assert_nothing_stored(client)


def test_image_over_the_pixel_limit_is_rejected(db_settings, make_user):
    with client_with_limits(db_settings, max_pixels=999) as client:
        user = make_user(client)
        r = upload(client, user, ("wide.png", image_bytes("PNG", (100, 10))))
        assert_error(r, 422, "image_too_large")
        assert_nothing_stored(client)


def test_too_many_files_is_rejected(db_settings, make_user):
    with client_with_limits(db_settings, max_files_per_request=2) as client:
        user = make_user(client)
        err = assert_error(
            upload(client, user, *[(f"{i}.jpg", jpeg(i)) for i in range(3)]), 422, "too_many_files"
        )
        assert err["detail"] == {"max_files": 2}
        assert_nothing_stored(client)
        # Far too many: the multipart parser stops early; still a 4xx with the error shape.
        r = upload(client, user, *[(f"{i}.jpg", jpeg(i)) for i in range(6)])
        assert 400 <= r.status_code < 500 and "error" in r.json()
        assert_nothing_stored(client)


def test_request_body_over_the_total_limit_is_413(db_settings, make_user):
    big = noisy_jpeg((256, 256))
    with client_with_limits(db_settings, max_upload_bytes=1000, max_files_per_request=1) as client:
        user = make_user(client)
        err = assert_error(upload(client, user, ("big.jpg", big * 100)), 413, "payload_too_large")
        assert err["detail"] == {"max_bytes": 1000 + 64 * 1024}  # refused before reading
        assert_nothing_stored(client)


def test_chunked_body_over_the_total_limit_is_cut_off_with_413(db_settings, make_user):
    boundary = "polar-test-boundary"

    def body() -> Iterator[bytes]:  # no Content-Length: the limit must count while reading
        yield (
            f"--{boundary}\r\nContent-Disposition: form-data; name=files; filename=big.jpg\r\n"
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        for _ in range(64):
            yield b"\xff" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    with client_with_limits(db_settings, max_upload_bytes=1000, max_files_per_request=1) as client:
        user = make_user(client)
        headers = user.headers | {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        r = client.post("/images", content=body(), headers=headers)
        assert "content-length" not in {k.lower() for k in r.request.headers}
        err = assert_error(r, 413, "payload_too_large")
        assert "request is larger" in err["message"]  # cut off by the body limit, not per file
        assert_nothing_stored(client)


def test_upload_without_files_is_422(api_client, make_user):
    user = make_user(api_client)
    assert_error(api_client.post("/images", headers=user.headers), 422, "validation_failed")


# -- list and pagination ----------------------------------------------------------------------


def test_pagination_is_stable_complete_and_without_duplicates(api_client, make_user):
    user = make_user(api_client)
    ids = [
        i["id"]
        for i in upload(api_client, user, *[(f"{i}.jpg", jpeg(i)) for i in range(4)]).json()[
            "images"
        ]
    ]
    ids += [
        i["id"]
        for i in upload(api_client, user, *[(f"{i}.jpg", jpeg(i)) for i in range(4, 7)]).json()[
            "images"
        ]
    ]
    other = make_user(api_client, "other")
    upload(api_client, other, ("theirs.jpg", jpeg(99)))

    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        r = api_client.get("/images", params=params, headers=user.headers)
        assert r.status_code == 200, r.text
        page = r.json()
        seen += page["items"]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert len(seen) == len({i["id"] for i in seen}) == 7
    assert {i["id"] for i in seen} == set(ids)
    keys = [(i["created_at"], i["id"]) for i in seen]
    assert keys == sorted(keys)

    # Pages do not move when an image before the cursor is deleted or a new one arrives.
    first = api_client.get("/images", params={"limit": 3}, headers=user.headers).json()
    api_client.delete(f"/images/{first['items'][0]['id']}", headers=user.headers)
    upload(api_client, user, ("late.jpg", jpeg(50)))
    second = api_client.get(
        "/images", params={"limit": 3, "cursor": first["next_cursor"]}, headers=user.headers
    )
    assert [i["id"] for i in second.json()["items"]] == [i["id"] for i in seen[3:6]]


def test_images_list_newest_first_when_asked_and_pages_stay_in_that_order(api_client, make_user):
    user = make_user(api_client)
    for i in range(5):  # one request each: five distinct upload times
        upload(api_client, user, (f"{i}.jpg", jpeg(200 + i)))
    seen, cursor = [], None
    while True:
        params = {"limit": 2, "order": "newest"} | ({"cursor": cursor} if cursor else {})
        r = api_client.get("/images", params=params, headers=user.headers)
        assert r.status_code == 200, r.text
        seen += r.json()["items"]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
    assert [i["filename"] for i in seen] == ["4.jpg", "3.jpg", "2.jpg", "1.jpg", "0.jpg"]
    keys = [(i["created_at"], i["id"]) for i in seen]
    assert keys == sorted(keys, reverse=True)
    bad = api_client.get("/images", params={"order": "sideways"}, headers=user.headers)
    assert bad.status_code == 422


def test_default_page_and_empty_library(api_client, make_user):
    user = make_user(api_client)
    r = api_client.get("/images", headers=user.headers)
    assert r.status_code == 200
    assert r.json() == {"items": [], "next_cursor": None}


@pytest.mark.parametrize("cursor", ["garbage!", "bm90LWEtY3Vyc29y", "MjAyNS0wMS0wMXxub3QtYS11dWlk"])
def test_malformed_cursor_is_422(api_client, make_user, cursor):
    user = make_user(api_client)
    r = api_client.get("/images", params={"cursor": cursor}, headers=user.headers)
    assert_error(r, 422, "invalid_cursor")


@pytest.mark.parametrize("limit", [0, 201, -1])
def test_limit_out_of_range_is_422(api_client, make_user, limit):
    user = make_user(api_client)
    r = api_client.get("/images", params={"limit": limit}, headers=user.headers)
    assert_error(r, 422, "validation_failed")


# -- file, thumbnail --------------------------------------------------------------------------


def test_file_and_thumbnail(api_client, make_user):
    user = make_user(api_client)
    data = image_bytes("PNG", (600, 300), colour(3))
    img = upload(api_client, user, ("wide.png", data)).json()["images"][0]
    r = api_client.get(img["file_url"], headers=user.headers)
    assert r.status_code == 200
    assert r.content == data
    assert r.headers["content-type"] == "image/png"
    assert "wide.png" in r.headers["content-disposition"]
    t = api_client.get(img["thumbnail_url"], headers=user.headers)
    assert t.status_code == 200 and t.headers["content-type"] == "image/webp"
    with Image.open(io.BytesIO(t.content)) as thumb:
        assert thumb.size == (256, 128)


def test_missing_file_on_disk_is_reported_and_healed_by_reupload(api_client, make_user):
    user = make_user(api_client)
    img = upload(api_client, user, ("a.jpg", jpeg())).json()["images"][0]
    for p in stored_files(api_client):
        p.unlink()
    assert_error(api_client.get(img["file_url"], headers=user.headers), 404, "file_missing")
    upload(api_client, user, ("a.jpg", jpeg()))
    assert api_client.get(img["file_url"], headers=user.headers).content == jpeg()
    assert api_client.get(img["thumbnail_url"], headers=user.headers).status_code == 200


# -- delete ---------------------------------------------------------------------------------


def test_delete_removes_row_and_file_and_bumps_the_index_generation(api_client, make_user):
    user = make_user(api_client)
    img = upload(api_client, user, ("a.jpg", jpeg())).json()["images"][0]
    with api_client.app.state.container.session_factory() as s:
        generation = s.get(User, user.id).index_generation
    r = api_client.delete(f"/images/{img['id']}", headers=user.headers)
    assert r.status_code == 204 and r.content == b""
    assert_error(api_client.get(f"/images/{img['id']}", headers=user.headers), 404, "not_found")
    assert_error(api_client.delete(f"/images/{img['id']}", headers=user.headers), 404, "not_found")
    assert count(api_client, ImageRow) == 0
    assert [
        p for p in stored_files(api_client) if "originals" in p.parts or "thumbs" in p.parts
    ] == []
    with api_client.app.state.container.session_factory() as s:
        assert s.get(User, user.id).index_generation == generation + 1


# -- ownership ------------------------------------------------------------------------------


ROUTES = [
    ("GET", "/images/{id}"),
    ("GET", "/images/{id}/file"),
    ("GET", "/images/{id}/thumbnail"),
    ("DELETE", "/images/{id}"),
]


@pytest.mark.parametrize(("method", "route"), ROUTES)
def test_foreign_id_is_404_identical_to_a_missing_one(api_client, make_user, method, route):
    alice, mallory = make_user(api_client, "alice"), make_user(api_client, "mallory")
    img = upload(api_client, alice, ("a.jpg", jpeg())).json()["images"][0]
    foreign = api_client.request(method, route.format(id=img["id"]), headers=mallory.headers)
    missing = api_client.request(
        method, route.format(id="00000000-0000-4000-8000-000000000000"), headers=mallory.headers
    )
    not_a_uuid = api_client.request(method, route.format(id="nope"), headers=mallory.headers)
    assert_error(foreign, 404, "not_found")
    assert foreign.content == missing.content == not_a_uuid.content
    # Alice's image is untouched and Mallory's listing does not show it.
    assert api_client.get(f"/images/{img['id']}", headers=alice.headers).status_code == 200
    assert api_client.get("/images", headers=mallory.headers).json()["items"] == []


@pytest.mark.parametrize(("method", "route"), [*ROUTES, ("GET", "/images"), ("POST", "/images")])
def test_every_images_route_needs_a_key(api_client, make_user, method, route):
    user = make_user(api_client)
    img = upload(api_client, user, ("a.jpg", jpeg())).json()["images"][0]
    r = api_client.request(method, route.format(id=img["id"]))
    assert_error(r, 401, "unauthorized")
    bad = api_client.request(
        method, route.format(id=img["id"]), headers={"Authorization": "Bearer x"}
    )
    assert_error(bad, 401, "unauthorized")
    assert count(api_client, ImageRow) == 1


def test_a_rejected_upload_names_files_counted_from_one(api_client, make_user):
    user = make_user(api_client)
    r = upload(api_client, user, ("good.jpg", jpeg(1)), ("notes.png", b"not an image"))
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert "1 of 2 file(s) rejected" in err["message"]
    assert "file 2 (notes.png):" in err["message"]  # for people, from 1
    assert err["detail"]["files"][0]["index"] == 1  # for programs, from 0
