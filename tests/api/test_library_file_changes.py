"""A library photo replaced in place: search ranks by its new picture at once, in every process
and across restarts; and what counts as a change cannot be fooled by a restored mtime."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.models import Image
from tests.api.test_libraries import db_settings, paths, report  # noqa: F401 (the fixture)
from tests.api.test_search import wait_jobs
from tests.db_fixtures import noisy_jpeg
from tests.model_fixtures import tiny_clip


def _scores(client, user, q: str = "a photo") -> dict[str, float]:
    r = client.post("/search", json={"q": q, "k": 50, "personalize": False}, headers=user.headers)
    assert r.status_code == 200, r.text
    return {h["image"]["id"]: h["score"] for h in r.json()["hits"]}


def _expected(client, user, q: str = "a photo") -> dict[str, float]:
    """Each image's cosine with the query, from the embeddings the database holds now."""
    r = client.post("/embed/text", json={"q": q, "personalize": False}, headers=user.headers)
    assert r.status_code == 200, r.text
    text = np.asarray(r.json()["embedding"], np.float32)
    with client.app.state.container.session_factory() as s:
        rows = s.query(Image).filter(Image.embedding.is_not(None)).all()
        return {i.id: float(np.frombuffer(i.embedding, np.float32) @ text) for i in rows}


def _serving(client) -> TestClient:
    client.app.state.container.model.install(tiny_clip(0))
    return client


def _replace_and_rescan(client, user, lib_id: str, photo: Path, seed: int) -> None:
    photo.write_bytes(noisy_jpeg(seed=seed))
    r = client.post(f"/libraries/{lib_id}/scan", headers=user.headers)
    assert r.status_code == 202, r.text
    wait_jobs(client)
    assert report(client, user, lib_id)["changed"] == 1


def test_a_replaced_photo_is_searched_by_its_new_picture_at_once_and_after_a_restart(
    api_client,
    folder_user,
    db_settings,  # noqa: F811 (the fixture)
):
    user, lib = folder_user
    for i in range(4):
        (lib / f"p{i}.jpg").write_bytes(noisy_jpeg(seed=10 + i))
    r = api_client.post("/libraries", json={"path": str(lib)}, headers=user.headers)
    lib_id = r.json()["id"]
    wait_jobs(api_client)
    before = _scores(api_client, user)  # the index is cached (in memory and on disk) now
    assert before == pytest.approx(_expected(api_client, user), abs=1e-4)
    photo_id = paths(api_client, user)[str(lib / "p0.jpg")]

    # Replaced and rescanned with no search in between: the next search sees the new picture.
    _replace_and_rescan(api_client, user, lib_id, lib / "p0.jpg", seed=99)
    expected = _expected(api_client, user)
    assert abs(expected[photo_id] - before[photo_id]) > 1e-3  # the picture did change
    assert _scores(api_client, user) == pytest.approx(expected, abs=1e-4)

    # Twice more, searching in between only in the second process: each process's cache and
    # the files it saved follow every re-embedding.
    with _serving(TestClient(create_app(db_settings))) as second:
        assert _scores(second, user) == pytest.approx(expected, abs=1e-4)
        _replace_and_rescan(api_client, user, lib_id, lib / "p0.jpg", seed=123)
        expected = _expected(api_client, user)
        assert _scores(second, user) == pytest.approx(expected, abs=1e-4)
        assert _scores(api_client, user) == pytest.approx(expected, abs=1e-4)
    api_client.app.state.container.index_cache.flush()
    # A restart loads the saved index: it holds the new vectors.
    with _serving(TestClient(create_app(db_settings))) as restarted:
        assert _scores(restarted, user) == pytest.approx(expected, abs=1e-4)


def _stamp_restored_replace(photo: Path, new_bytes: bytes, how: str) -> None:
    """Put `new_bytes` (same size) in `photo` with its old mtime, the way users' tools do."""
    assert len(new_bytes) == photo.stat().st_size
    staged = photo.with_name(".staged-" + photo.name)
    staged.write_bytes(new_bytes)
    if how == "cp -p":  # rewrites the file in place, then sets the source's times on it
        os.utime(staged, ns=(photo.stat().st_atime_ns, photo.stat().st_mtime_ns))
        subprocess.run(["cp", "-p", str(staged), str(photo)], check=True)
        staged.unlink()
    elif how == "rsync -a":  # a new file renamed over the old one, with the old times
        os.utime(staged, ns=(photo.stat().st_atime_ns, photo.stat().st_mtime_ns))
        os.replace(staged, photo)
    else:  # "touch -r": written in place, then the old time set back from a reference
        ref = photo.with_name(".ref-" + photo.name)
        shutil.copy2(photo, ref)
        photo.write_bytes(new_bytes)
        subprocess.run(["touch", "-r", str(ref), str(photo)], check=True)
        ref.unlink()
        staged.unlink()


def _same_size_jpeg(size: int, seed: int) -> bytes:
    data = noisy_jpeg(seed=seed)
    assert len(data) <= size
    return data + b"\0" * (size - len(data))  # bytes after a JPEG's end are ignored


@pytest.mark.parametrize("how", ["cp -p", "rsync -a", "touch -r"])
def test_a_same_size_replacement_with_its_mtime_restored_is_a_change(api_client, folder_user, how):
    user, lib = folder_user
    photo = lib / "p.jpg"
    photo.write_bytes(noisy_jpeg(seed=1) + b"\0" * 2000)
    (lib / "q.jpg").write_bytes(noisy_jpeg(seed=2))
    lib_id = api_client.post("/libraries", json={"path": str(lib)}, headers=user.headers).json()[
        "id"
    ]
    wait_jobs(api_client)
    image_id = paths(api_client, user)[str(photo)]
    first = api_client.get(f"/images/{image_id}/file", headers=user.headers)
    assert first.status_code == 200
    old = os.stat(photo)

    _stamp_restored_replace(photo, _same_size_jpeg(old.st_size, seed=7), how)
    new = os.stat(photo)
    assert (new.st_size, new.st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    # Before the rescan: the new bytes are never served under the old content's ETag.
    r = api_client.get(
        f"/images/{image_id}/file",
        headers={**user.headers, "If-None-Match": first.headers["etag"]},
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "file_changed", r.text
    # The rescan sees the change and reads the file again.
    assert api_client.post(f"/libraries/{lib_id}/scan", headers=user.headers).status_code == 202
    wait_jobs(api_client)
    assert report(api_client, user, lib_id)["changed"] == 1
    served = api_client.get(f"/images/{image_id}/file", headers=user.headers)
    assert served.status_code == 200 and served.content == photo.read_bytes()
    assert served.headers["etag"] != first.headers["etag"]


def test_a_touched_but_unchanged_photo_keeps_its_embedding(api_client, folder_user):
    """ctime moves on a chmod or a copy with the same bytes: the file is read again, but the
    same bytes keep their image, vector and all (nothing to embed)."""
    user, lib = folder_user
    photo = lib / "p.jpg"
    photo.write_bytes(noisy_jpeg(seed=3))
    lib_id = api_client.post("/libraries", json={"path": str(lib)}, headers=user.headers).json()[
        "id"
    ]
    wait_jobs(api_client)
    with api_client.app.state.container.session_factory() as s:
        before = s.query(Image).one()
        vec_id, embedding = before.vec_id, before.embedding
    os.chmod(photo, 0o600)  # ctime changes, content does not
    photo.write_bytes(photo.read_bytes())  # rewritten in place: mtime too
    assert api_client.post(f"/libraries/{lib_id}/scan", headers=user.headers).status_code == 202
    wait_jobs(api_client)
    rep = report(api_client, user, lib_id)
    assert (rep["changed"], rep["unchanged"]) == (0, 1), rep
    with api_client.app.state.container.session_factory() as s:
        after = s.query(Image).one()
        assert (after.vec_id, after.embedding) == (vec_id, embedding)
        assert after.source_ctime_ns == os.stat(photo).st_ctime_ns


def test_a_row_from_before_the_stamp_takes_it_without_a_read(api_client, folder_user, monkeypatch):
    """Rows indexed before ctime and inode were kept (NULL): the next scan trusts size and
    mtime as the old version did, reads nothing, and fills the stamp; a later same-size swap
    with its mtime put back is then seen."""
    from sqlalchemy import update

    from app.services import library_scan as libraries_service

    user, lib = folder_user
    photo = lib / "p.jpg"
    photo.write_bytes(noisy_jpeg(seed=1) + b"\0" * 2000)
    lib_id = api_client.post("/libraries", json={"path": str(lib)}, headers=user.headers).json()[
        "id"
    ]
    wait_jobs(api_client)
    with api_client.app.state.container.session_factory() as s:
        s.execute(update(Image).values(source_ctime_ns=None, source_ino=None))
        s.commit()
    read: list[object] = []
    inspect_file = libraries_service.inspect_file
    monkeypatch.setattr(
        libraries_service, "inspect_file", lambda *a, **k: read.append(a) or inspect_file(*a, **k)
    )
    assert api_client.post(f"/libraries/{lib_id}/scan", headers=user.headers).status_code == 202
    wait_jobs(api_client)
    assert (report(api_client, user, lib_id)["unchanged"], read) == (1, [])
    with api_client.app.state.container.session_factory() as s:
        row = s.query(Image).one()
        assert (row.source_ctime_ns, row.source_ino) == (
            os.stat(photo).st_ctime_ns,
            os.stat(photo).st_ino,
        )
    _stamp_restored_replace(photo, _same_size_jpeg(os.stat(photo).st_size, seed=8), "rsync -a")
    assert api_client.post(f"/libraries/{lib_id}/scan", headers=user.headers).status_code == 202
    wait_jobs(api_client)
    assert report(api_client, user, lib_id)["changed"] == 1
