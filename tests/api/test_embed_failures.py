"""Images whose file passed validation but cannot be read or decoded when they are embedded (a
library file swapped for a FIFO, a decompression bomb or other bytes after the scan; an upload's
stored original lost): marked failed with the reason (GET /index `failed`, `embed_error` on the
image, the library scan's report), not read again by every embed pass, read again once the file
changes (a rescan sees it; the same bytes uploaded again) or a rebuild is asked for. On SQLite
and PostgreSQL."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import BinaryIO

import pytest
from sqlalchemy import update

from app.models import Image
from app.services import embedding
from app.services import library_scan as libraries_service
from tests.api.test_libraries import db_settings, report  # noqa: F401 (fixture)
from tests.api.test_search import upload, wait_jobs
from tests.db_fixtures import noisy_jpeg, png_claiming
from tests.unit.test_untrusted_images import unblock_fifo

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")


def before_embedding(monkeypatch, change) -> None:
    """Run `change()` once, after the first scan has indexed its files and before they are
    embedded (the moment a file is swapped in the race this covers)."""
    embed_pending = libraries_service.embed_pending
    done: list[bool] = []

    def changed_first(*args, **kwargs):
        if not done:
            done.append(True)
            change()
        return embed_pending(*args, **kwargs)

    monkeypatch.setattr(libraries_service, "embed_pending", changed_first)


def reads(monkeypatch) -> list[str]:
    """The files embedding reads from now on (library paths; storage paths for uploads)."""
    seen: list[str] = []
    open_rgb = embedding._open_rgb

    def spy(store, src, *args, **kwargs):
        seen.append(src if isinstance(src, str) else src.source_path or src.storage_path)
        return open_rgb(store, src, *args, **kwargs)

    monkeypatch.setattr(embedding, "_open_rgb", spy)
    return seen


def index(client, user) -> dict:
    r = client.get("/index", headers=user.headers)
    assert r.status_code == 200, r.text
    return r.json()


def by_path(client, user) -> dict[str, dict]:
    items = client.get("/images", headers=user.headers).json()["items"]
    return {i["path"]: i for i in items}


def rescan(client, user, lib_id: str) -> dict:
    assert client.post(f"/libraries/{lib_id}/scan", headers=user.headers).status_code == 202
    wait_jobs(client)
    return report(client, user, lib_id)


def polar(client, user, monkeypatch, capsys, *argv: str) -> str:
    """What the CLI prints for `argv` (on the test's app)."""
    from app.cli import main as cli
    from app.cli.http import PolarClient

    monkeypatch.setattr(cli, "client_factory", lambda url, key: PolarClient(url, key, http=client))
    capsys.readouterr()
    assert cli.main([*argv, "--key", user.key]) == 0
    return capsys.readouterr().out


def undecodable_when_embedded(monkeypatch, path: Path) -> None:
    """Embedding reads bytes it cannot decode from `path` until the file changes, while a scan
    sees the file as it was (a file the scan's checks passed but whose full decode fails; a
    swap on disk cannot stand in: a scan sees it by its ctime and inode)."""
    opened = embedding._opened
    st = path.stat()

    def junk(store, roots, src):
        f = opened(store, roots, src)
        if src.source_path == str(path) and path.stat().st_mtime_ns == st.st_mtime_ns:
            f.close()
            return io.BytesIO(b"this is no image")
        return f

    monkeypatch.setattr(embedding, "_opened", junk)


def test_a_library_file_that_cannot_be_embedded_is_failed_and_rests_until_it_changes(
    api_client, folder_user, monkeypatch, capsys
):
    user, lib = folder_user
    good, bad = lib / "a.jpg", lib / "b.jpg"
    good.write_bytes(noisy_jpeg(seed=1))
    bad.write_bytes(noisy_jpeg(seed=2))
    undecodable_when_embedded(monkeypatch, bad)
    r = api_client.post("/libraries", json={"path": str(lib)}, headers=user.headers)
    assert r.status_code == 202, r.text
    lib_id = r.json()["id"]
    wait_jobs(api_client)

    status = index(api_client, user)
    assert (status["images"], status["embedded"], status["failed"], status["pending"]) == (
        2, 1, 1, 0
    ), status  # fmt: skip
    found = by_path(api_client, user)
    assert found[str(good)]["embed_error"] is None and found[str(good)]["embedded"]
    reason = found[str(bad)]["embed_error"]
    assert "not an image" in reason and not found[str(bad)]["embedded"]
    rep = report(api_client, user, lib_id)
    assert (rep["failed_count"], rep["failed"]) == (1, [{"path": str(bad), "reason": reason}])
    # Search does not count it as still to come; the CLI says it and why.
    hits = api_client.get("/search", params={"q": "a photo"}, headers=user.headers).json()
    assert hits["pending"] == 0, hits
    out = polar(api_client, user, monkeypatch, capsys, "index")
    assert "1 searchable, 0 pending, 1 unreadable" in out, out
    out = polar(api_client, user, monkeypatch, capsys, "library", "list")
    assert "1 not searchable" in out and f"not searchable {bad}: {reason}" in out, out

    # The next scans see the same file: it is not read again, for the scan nor for embedding.
    seen = reads(monkeypatch)
    for _ in range(2):
        rep = rescan(api_client, user, lib_id)
        assert (rep["unchanged"], rep["failed_count"]) == (2, 1), rep
    assert seen == []
    assert index(api_client, user)["failed"] == 1

    # A rebuild, asked for, reads it once more (a fixed permission changes no size or time).
    assert api_client.post("/index/rebuild", headers=user.headers).status_code == 202
    wait_jobs(api_client)
    assert seen == [str(bad)]
    assert by_path(api_client, user)[str(bad)]["embed_error"] == reason
    assert index(api_client, user)["failed"] == 1

    # Once the file changes, the next scan reads it again, and it is embedded.
    bad.write_bytes(noisy_jpeg(seed=3))
    os.utime(bad, ns=(2_000_000_000_000_000_000, 2_000_000_000_000_000_000))
    rep = rescan(api_client, user, lib_id)
    assert (rep["changed"], rep["failed_count"], rep["failed"]) == (1, 0, []), rep
    found = by_path(api_client, user)
    assert found[str(bad)]["embed_error"] is None and found[str(bad)]["embedded"]
    status = index(api_client, user)
    assert (status["embedded"], status["failed"], status["pending"]) == (2, 0, 0), status


def test_a_library_file_swapped_for_a_fifo_or_a_bomb_after_the_scan_fails_with_its_reason(
    api_client, folder_user, monkeypatch
):
    user, lib = folder_user
    fifo, bomb = lib / "c.jpg", lib / "d.png"
    fifo.write_bytes(noisy_jpeg(seed=4))
    bomb.write_bytes(noisy_jpeg(seed=5))
    # A photo that stays: a folder left with no photo at all removes nothing (an unmounted
    # share's mount point; tests/api/test_library_unreachable.py).
    (lib / "a.jpg").write_bytes(noisy_jpeg(seed=6))

    def swap() -> None:
        fifo.unlink()
        os.mkfifo(fifo)
        bomb.write_bytes(png_claiming(30_000, 30_000))

    before_embedding(monkeypatch, swap)
    try:
        r = api_client.post("/libraries", json={"path": str(lib)}, headers=user.headers)
        assert r.status_code == 202, r.text
        lib_id = r.json()["id"]
        wait_jobs(api_client)  # no hang on the FIFO, no failed job for the bomb
        status = index(api_client, user)
        assert (status["images"], status["failed"], status["pending"]) == (3, 2, 0), status
        found = by_path(api_client, user)
        assert "not a regular file" in found[str(fifo)]["embed_error"]
        # A regular file, but not the one the scan read: never decoded as if it were.
        assert "changed since the library's scan" in found[str(bomb)]["embed_error"]
        rep = report(api_client, user, lib_id)
        assert {f["path"] for f in rep["failed"]} == {str(fifo), str(bomb)}
        # The next scan sees the changed files: skipped with their reason, out of the index.
        rep = rescan(api_client, user, lib_id)
        reasons = {s["path"]: s["reason"] for s in rep["skipped"]}
        assert set(reasons) == {str(fifo), str(bomb)} and rep["removed"] == 2, rep
        assert (rep["failed_count"], index(api_client, user)["images"]) == (0, 1)
    finally:
        unblock_fifo(fifo)


def test_an_upload_whose_stored_file_is_lost_fails_and_is_read_again_when_sent_again(
    api_client, folder_user, monkeypatch
):
    user, lib = folder_user
    ids = upload(api_client, user, range(2))
    wait_jobs(api_client)
    lost = ids[1]
    settings = api_client.app.state.container.settings
    with api_client.app.state.container.session_factory() as s:
        storage_path = s.get(Image, lost).storage_path
        # As after a model change: to be embedded again, and its stored original is gone.
        s.execute(
            update(Image).where(Image.id == lost).values(embedding=None, embedding_model=None)
        )
        s.commit()
    (settings.data_dir / storage_path).unlink()
    assert api_client.post("/index/rebuild", headers=user.headers).status_code == 202
    wait_jobs(api_client)
    status = index(api_client, user)
    assert (status["embedded"], status["failed"], status["pending"]) == (1, 1, 0), status
    image = api_client.get(f"/images/{lost}", headers=user.headers).json()
    assert image["embed_error"] == "the file is gone" and not image["embedded"]

    # Another embed pass over all the user's images (a library's scan) leaves it alone.
    seen = reads(monkeypatch)
    (lib / "x.jpg").write_bytes(noisy_jpeg(seed=9))
    r = api_client.post("/libraries", json={"path": str(lib)}, headers=user.headers)
    assert r.status_code == 202, r.text
    wait_jobs(api_client)
    assert set(seen) == {str(lib / "x.jpg")}  # (whole, then its crops)
    assert index(api_client, user)["failed"] == 1

    # The same bytes sent again restore the file; the image is read again and embedded.
    r = api_client.post(
        "/images",
        files=[("files", ("p1.jpg", noisy_jpeg(seed=1), "image/jpeg"))],
        headers=user.headers,
    )
    assert r.status_code == 202, r.text
    assert r.json()["images"][0]["id"] == lost and r.json()["job"] is not None
    wait_jobs(api_client)
    image = api_client.get(f"/images/{lost}", headers=user.headers).json()
    assert image["embed_error"] is None and image["embedded"]
    status = index(api_client, user)
    assert (status["embedded"], status["failed"], status["pending"]) == (3, 0, 0), status


class ShareDropped(io.BytesIO):
    """A library file on a share that stops answering after its first kilobyte: reads past it
    fail with EIO (what an SMB or NFS mount says when its server goes away)."""

    def __init__(self, f: BinaryIO) -> None:
        with f:
            super().__init__(f.read())

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or self.tell() + size > 1024:
            raise OSError(errno.EIO, "Input/output error")
        return super().read(size)


def test_a_file_whose_share_dropped_while_embedding_is_read_again_by_the_next_scan(
    api_client, folder_user, monkeypatch
):
    """An I/O error says nothing of the file's bytes: the file is failed with the reason (not
    pending, not read again by every pass) until the library's next scan, which reads it again,
    though the file did not change. A file whose bytes failed waits for a change."""
    user, lib = folder_user
    flaky, junk = lib / "a.jpg", lib / "b.jpg"
    flaky.write_bytes(noisy_jpeg(seed=11))
    junk.write_bytes(noisy_jpeg(seed=12))
    undecodable_when_embedded(monkeypatch, junk)
    opened = embedding._opened
    dropped = [True]

    def share(store, roots, src):
        f = opened(store, roots, src)
        return ShareDropped(f) if dropped[0] and src.source_path == str(flaky) else f

    monkeypatch.setattr(embedding, "_opened", share)
    r = api_client.post("/libraries", json={"path": str(lib)}, headers=user.headers)
    assert r.status_code == 202, r.text
    lib_id = r.json()["id"]
    wait_jobs(api_client)
    found = by_path(api_client, user)
    assert "Input/output error" in found[str(flaky)]["embed_error"], found[str(flaky)]
    assert "not an image" in found[str(junk)]["embed_error"]
    status = index(api_client, user)
    assert (status["failed"], status["pending"]) == (2, 0), status

    # The share is back; nothing changed on disk. An upload's embed pass leaves both alone...
    dropped[0] = False
    seen = reads(monkeypatch)
    upload(api_client, user, range(1))
    wait_jobs(api_client)
    assert str(flaky) not in seen and str(junk) not in seen
    # ...the library's next scan reads the one that failed on I/O again, not the junk.
    rep = rescan(api_client, user, lib_id)
    assert str(flaky) in seen and str(junk) not in seen
    assert rep["failed"] == [{"path": str(junk), "reason": found[str(junk)]["embed_error"]}]
    found = by_path(api_client, user)
    assert found[str(flaky)]["embed_error"] is None and found[str(flaky)]["embedded"]
