"""A library scan that cannot look at part of its folder keeps what it indexed there.

A network share that drops or times out answers EIO, ESTALE or ETIMEDOUT, and one that is not
mounted leaves its mount point as an empty folder. Neither says a photo is gone, so a rescan
must not remove its images (their ids, what was embedded, concepts taught from them) the way it
removes files that were deleted. ENOENT still means gone.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from app import repositories
from app.services import concepts as concepts_service
from app.services import images as images_service
from app.services import library_scan as libraries_service
from tests.api.test_libraries import db_settings, paths, report  # noqa: F401 (fixture)
from tests.api.test_search import wait_jobs
from tests.db_fixtures import noisy_jpeg
from tests.model_fixtures import tiny_serving  # noqa: F401


def scan(client, user, lib: Path) -> tuple[str, dict]:
    r = client.post("/libraries", json={"path": str(lib)}, headers=user.headers)
    assert r.status_code == 202, r.text
    lib_id = r.json()["id"]
    wait_jobs(client)
    return lib_id, report(client, user, lib_id)


def rescan(client, user, lib_id: str) -> dict:
    assert client.post(f"/libraries/{lib_id}/scan", headers=user.headers).status_code == 202
    wait_jobs(client)
    return report(client, user, lib_id)


def photos(lib: Path) -> dict[str, Path]:
    """lib/{a.jpg, trips/b.jpg, trips/c.jpg}."""
    (lib / "trips").mkdir()
    out = {"a": lib / "a.jpg", "b": lib / "trips" / "b.jpg", "c": lib / "trips" / "c.jpg"}
    for n, p in enumerate(out.values()):
        p.write_bytes(noisy_jpeg(seed=60 + n))
    return out


def failing(monkeypatch, name: str, bad: set[str], code: int) -> None:
    """`os.<name>` (as the scan calls it) fails with `code` for the paths in `bad`."""
    real = getattr(os, name)

    def fake(path: Any, *args: Any, **kwargs: Any) -> Any:
        # A folder is listed through its open descriptor (app.services.folders.walk).
        named = os.readlink(f"/proc/self/fd/{path}") if isinstance(path, int) else str(path)
        if named in bad:
            raise OSError(code, os.strerror(code), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(libraries_service.os, name, fake)


@pytest.mark.parametrize("code", [errno.EIO, errno.ETIMEDOUT, errno.EACCES])
def test_a_folder_that_cannot_be_listed_keeps_its_images(
    api_client, folder_user, monkeypatch, code
):
    user, lib = folder_user
    files = photos(lib)
    lib_id, _ = scan(api_client, user, lib)
    before = paths(api_client, user)
    assert set(before) == {str(p) for p in files.values()}

    failing(monkeypatch, "scandir", {str(lib / "trips")}, code)
    rep = rescan(api_client, user, lib_id)
    assert (rep["removed"], rep["kept_count"], rep["not_pruned"]) == (0, 1, None), rep
    [skipped] = rep["skipped"]
    assert skipped["path"] == str(lib / "trips") and "kept" in skipped["reason"], skipped
    assert paths(api_client, user) == before  # the same images, the same ids

    # The share is back, and a photo was deleted meanwhile: now it goes.
    monkeypatch.undo()
    files["c"].unlink()
    rep = rescan(api_client, user, lib_id)
    assert (rep["removed"], rep["kept_count"], rep["skipped_count"]) == (1, 0, 0), rep
    assert set(paths(api_client, user)) == {str(files["a"]), str(files["b"])}


def test_a_file_that_cannot_be_looked_at_keeps_its_image_and_a_gone_one_is_removed(
    api_client, folder_user, monkeypatch
):
    user, lib = folder_user
    files = photos(lib)
    lib_id, _ = scan(api_client, user, lib)
    before = paths(api_client, user)

    failing(monkeypatch, "stat", {str(files["b"])}, errno.ESTALE)
    rep = rescan(api_client, user, lib_id)
    assert (rep["removed"], rep["unchanged"], rep["kept_count"]) == (0, 2, 1), rep
    assert paths(api_client, user) == before

    # ENOENT between the listing and the stat: the file is gone, its image removed.
    monkeypatch.undo()
    failing(monkeypatch, "stat", {str(files["b"])}, errno.ENOENT)
    rep = rescan(api_client, user, lib_id)
    assert (rep["removed"], rep["kept_count"]) == (1, 0), rep
    assert str(files["b"]) not in paths(api_client, user)


def test_an_empty_folder_removes_nothing_until_it_holds_files_again(api_client, folder_user):
    """An unmounted share's mount point is an empty folder: the scan says so and keeps every
    image; once the share is back, scans work as before."""
    user, lib = folder_user
    files = photos(lib)
    lib_id, _ = scan(api_client, user, lib)
    before = paths(api_client, user)
    keep = lib.parent / "elsewhere"
    shutil.move(lib, keep)
    lib.mkdir()  # the mount point: empty but for a note that is not a photo
    (lib / "NOT-MOUNTED.txt").write_text("the share is not mounted")

    rep = rescan(api_client, user, lib_id)
    assert rep["removed"] == 0 and "no photos" in rep["not_pruned"], rep
    assert paths(api_client, user) == before
    listed = api_client.get(f"/libraries/{lib_id}", headers=user.headers).json()
    assert "not mounted" in listed["report"]["not_pruned"]

    shutil.rmtree(lib)
    shutil.move(keep, lib)
    files["a"].unlink()
    rep = rescan(api_client, user, lib_id)
    assert (rep["removed"], rep["unchanged"], rep["not_pruned"]) == (1, 2, None), rep
    assert set(paths(api_client, user)) == {str(files["b"]), str(files["c"])}


def test_a_folder_emptied_on_purpose_is_said_and_deleting_the_library_drops_it(
    api_client, folder_user
):
    user, lib = folder_user
    files = photos(lib)
    lib_id, _ = scan(api_client, user, lib)
    for p in files.values():
        p.unlink()
    rep = rescan(api_client, user, lib_id)
    assert "delete the library" in rep["not_pruned"] and len(paths(api_client, user)) == 3
    assert api_client.delete(f"/libraries/{lib_id}", headers=user.headers).status_code in (
        200,
        202,
        204,
    )
    wait_jobs(api_client)
    assert paths(api_client, user) == {}


def share_down(monkeypatch, module: Any, path: Path, code: int) -> None:
    """`module.open_library_file` fails with `code` for `path`, as on a share that is down."""
    real = module.open_library_file

    def down(source_path: str, *args: Any) -> Any:
        if source_path == str(path):
            raise OSError(code, os.strerror(code), source_path)
        return real(source_path, *args)

    monkeypatch.setattr(module, "open_library_file", down)


def test_a_photo_whose_share_is_down_is_a_503_and_a_gone_one_a_404(
    api_client, folder_user, monkeypatch
):
    user, lib = folder_user
    files = photos(lib)
    scan(api_client, user, lib)
    image_id = paths(api_client, user)[str(files["a"])]
    share_down(monkeypatch, images_service, files["a"], errno.EIO)
    r = api_client.get(f"/images/{image_id}/file", headers=user.headers)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "library_unavailable" and r.headers["retry-after"]
    assert "Input/output error" in r.json()["error"]["message"]

    monkeypatch.undo()
    files["a"].unlink()
    r = api_client.get(f"/images/{image_id}/file", headers=user.headers)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "file_missing"), r.text


def test_teaching_from_a_photo_whose_share_is_down_is_a_503_and_changes_nothing(
    api_client, folder_user, monkeypatch
):
    user, lib = folder_user
    files = photos(lib)
    scan(api_client, user, lib)
    ids = list(paths(api_client, user).values())
    share_down(monkeypatch, concepts_service, files["c"], errno.ETIMEDOUT)
    r = api_client.post("/concepts", data={"name": "Fido", "image_ids": ids}, headers=user.headers)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "library_unavailable"
    assert r.json()["error"]["detail"] == {"image_ids": [paths(api_client, user)[str(files["c"])]]}
    assert api_client.get("/concepts", headers=user.headers).json()["items"] == []


def test_teaching_from_a_folder_photo_changed_since_its_scan_is_409_file_changed(
    api_client, folder_user
):
    """The concept would learn from bytes that are not the image the user picked (the file
    was overwritten with another photo): refused as the file route refuses it."""
    user, lib = folder_user
    files = photos(lib)
    scan(api_client, user, lib)
    ids = list(paths(api_client, user).values())
    files["b"].write_bytes(noisy_jpeg(seed=99))
    os.utime(files["b"], ns=(2_000_000_000_000_000_000, 2_000_000_000_000_000_000))
    r = api_client.post("/concepts", data={"name": "Fido", "image_ids": ids}, headers=user.headers)
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "file_changed"
    assert api_client.get("/concepts", headers=user.headers).json()["items"] == []


def test_a_scan_batch_that_meets_an_upload_of_the_same_bytes_is_indexed_again(
    api_client, folder_user, monkeypatch
):
    """An upload committed between a scan batch's lookup of the bytes and its insert made the
    insert fail on the unique (user, sha256) key, and the whole scan job with it. The batch is
    indexed once more: the file is then the upload's duplicate, the rest of the batch indexed,
    and the report counts each file once."""
    user, lib = folder_user
    # One file a batch: on SQLite a batch that has written holds the one writer lock, so only a
    # batch's first lookup can race an upload there.
    monkeypatch.setattr(api_client.app.state.container.settings.library, "batch", 1)
    files = photos(lib)
    data = files["b"].read_bytes()
    lookup = repositories.get_image_by_sha256
    raced: list[str] = []

    def upload_meanwhile(**kwargs: Any) -> Any:
        found = lookup(**kwargs)
        if not raced and found is None and kwargs["sha256"] == hashlib.sha256(data).hexdigest():
            raced.append("")  # first: the upload's own lookup, through here too, passes
            r = api_client.post(
                "/images", files=[("files", ("b-up.jpg", data, "image/jpeg"))], headers=user.headers
            )
            assert r.status_code == 202, r.text
            raced[0] = r.json()["images"][0]["id"]
        return found  # what the scan saw before the upload committed

    monkeypatch.setattr(repositories, "get_image_by_sha256", upload_meanwhile)
    _lib_id, rep = scan(api_client, user, lib)  # fails if the scan job failed
    assert raced
    assert (rep["added"], rep["skipped_count"]) == (2, 1), rep
    assert "same content as image " + raced[0] in rep["skipped"][0]["reason"]
    items = api_client.get("/images", headers=user.headers).json()["items"]
    assert sorted((i["path"] or i["filename"]) for i in items) == sorted(
        [str(files["a"]), str(files["c"]), "b-up.jpg"]
    ), items
