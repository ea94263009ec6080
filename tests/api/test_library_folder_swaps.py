"""A folder inside a library swapped for a link to somewhere else between the check of a file's
resolved path and the file's open (a race a user who can write in their folder can win): the
scan, embedding, GET /images/{id}/file and a concept's photo copy read nothing outside the
library, on SQLite and PostgreSQL. Each swap is made at the worst moment, deterministically."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from app.services import images as images_service
from app.services import library_scan as libraries_service
from tests.api.test_libraries import db_settings, paths, report  # noqa: F401 (fixture)
from tests.api.test_search import wait_jobs
from tests.db_fixtures import noisy_jpeg


def swap_for_link(lib: Path, outside: Path) -> Callable[[], None]:
    """A swap of lib/sub for a link to `outside` (the real folder moves out of the library)."""

    def swap() -> None:
        os.rename(lib / "sub", lib.parent.parent / "sub.moved")
        os.symlink(outside, lib / "sub")

    return swap


def swap_after_resolving(monkeypatch, path: Path, swap: Callable[[], None]) -> None:
    """Run `swap` right after `path` is first resolved (the containment check), before the
    file is opened."""
    real_resolve = Path.resolve
    done: list[bool] = []

    def resolve(self: Path, strict: bool = False) -> Path:
        out = real_resolve(self, strict)
        if not done and str(self) == str(path):
            done.append(True)
            swap()
        return out

    monkeypatch.setattr(Path, "resolve", resolve)


@pytest.fixture
def setup(folder_user, tmp_path):
    """(user, lib, outside, inside bytes, outside bytes): lib/sub/a.jpg, and outside/a.jpg
    (the file a link in place of lib/sub would lead to) beside the allowed root."""
    user, lib = folder_user
    (lib / "sub").mkdir()
    inside, secret = noisy_jpeg(seed=71), noisy_jpeg(seed=72)
    (lib / "sub" / "a.jpg").write_bytes(inside)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.jpg").write_bytes(secret)
    return user, lib, outside, inside, secret


def add(client, user, lib: Path) -> str:
    r = client.post("/libraries", json={"path": str(lib)}, headers=user.headers)
    assert r.status_code == 202, r.text
    wait_jobs(client)
    return r.json()["id"]


def images(client, user) -> list[dict]:
    return client.get("/images", headers=user.headers).json()["items"]


def test_the_scan_reads_nothing_through_a_folder_swapped_after_the_walk(
    api_client, setup, monkeypatch
):
    user, lib, outside, _, secret = setup
    index_batch = libraries_service._index_batch
    swap = swap_for_link(lib, outside)

    def swapped_first(*args, **kwargs):
        if not (lib / "sub").is_symlink():
            swap()  # the walk saw a folder; it is a link by the time the file is read
        return index_batch(*args, **kwargs)

    monkeypatch.setattr(libraries_service, "_index_batch", swapped_first)
    lib_id = add(api_client, user, lib)
    assert images(api_client, user) == []  # the file behind the link was not indexed
    rep = report(api_client, user, lib_id)
    reasons = {s["path"]: s["reason"] for s in rep["skipped"]}
    assert "link" in reasons[str(lib / "sub" / "a.jpg")], reasons
    assert hashlib.sha256(secret).hexdigest() not in {i["sha256"] for i in images(api_client, user)}


def test_embedding_reads_nothing_through_a_folder_swapped_after_its_check(
    api_client, setup, monkeypatch
):
    user, lib, outside, inside, _ = setup
    swap_after_resolving(monkeypatch, lib / "sub" / "a.jpg", swap_for_link(lib, outside))
    add(api_client, user, lib)  # the scan reads the file; embedding, after the swap, must not
    (image,) = images(api_client, user)
    assert image["sha256"] == hashlib.sha256(inside).hexdigest()
    assert not image["embedded"], "the file outside the library was embedded"
    assert "link" in image["embed_error"], image
    index = api_client.get("/index", headers=user.headers).json()
    assert (index["failed"], index["pending"]) == (1, 0), index


def test_the_original_is_not_served_through_a_folder_swapped_after_its_check(
    api_client, setup, monkeypatch
):
    user, lib, outside, inside, _ = setup
    add(api_client, user, lib)
    (image,) = images(api_client, user)
    url = f"/images/{image['id']}/file"
    assert api_client.get(url, headers=user.headers).content == inside
    swap_after_resolving(monkeypatch, lib / "sub" / "a.jpg", swap_for_link(lib, outside))
    r = api_client.get(url, headers=user.headers)
    assert r.status_code == 404 and r.json()["error"]["code"] == "file_missing", r.status_code


def test_the_original_served_is_the_file_opened_whatever_its_name_becomes(
    api_client, setup, monkeypatch
):
    """The route gets the file already opened (checked, no link followed) and serves that:
    a swap after the check and the open changes nothing it sends."""
    user, lib, outside, inside, secret = setup
    add(api_client, user, lib)
    (image,) = images(api_client, user)
    original_file = images_service.original_file
    swap = swap_for_link(lib, outside)

    def then_swapped(*args, **kwargs):
        found = original_file(*args, **kwargs)
        swap()
        return found

    monkeypatch.setattr(images_service, "original_file", then_swapped)
    r = api_client.get(f"/images/{image['id']}/file", headers=user.headers)
    assert r.content != secret, "a file outside the library was served"
    assert r.status_code == 200 and r.content == inside
    r = api_client.get(
        f"/images/{image['id']}/file", headers={**user.headers, "Range": "bytes=0-9"}
    )  # (the folder is a link now: refused by name, so no second swap is needed)
    assert r.status_code == 404 and r.json()["error"]["code"] == "file_missing"


def test_a_concept_copies_nothing_through_a_folder_swapped_after_its_check(
    api_client, folder_user, tmp_path, monkeypatch
):
    user, lib = folder_user
    (lib / "sub").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    for i in range(3):  # one photo in sub/, which is swapped; the others beside it
        (lib / ("sub" if i == 0 else ".") / f"fido{i}.jpg").write_bytes(noisy_jpeg(seed=80 + i))
    (outside / "fido0.jpg").write_bytes(noisy_jpeg(seed=90))
    add(api_client, user, lib)
    ids = [i["id"] for i in images(api_client, user)]
    assert len(ids) == 3
    swap_after_resolving(monkeypatch, lib / "sub" / "fido0.jpg", swap_for_link(lib, outside))
    r = api_client.post("/concepts", data={"name": "Fido", "image_ids": ids}, headers=user.headers)
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "file_missing"
    assert api_client.get("/concepts", headers=user.headers).json()["items"] == []
