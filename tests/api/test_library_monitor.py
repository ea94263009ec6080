"""Libraries stay current by themselves: watched folders and periodic rescans (both databases)."""

from __future__ import annotations

import os
import subprocess
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from app import repositories
from app.config import LibrarySettings, Settings
from app.db import session_scope
from app.models import Job, JobState, Library, utcnow
from app.runtime.library_monitor import (
    MonitorState,
    due_for_rescan,
    monitor_pass,
    real_folders,
    watch_plan,
)
from app.services import libraries, library_scan
from app.services.job_runs import JobContext, JobEnvironment
from app.storage import ImageStore
from tests.api.test_libraries import library_settings
from tests.api.test_search import wait_jobs
from tests.db_fixtures import noisy_jpeg
from tests.fakes import RecordingQueue
from tests.unit.ml.conftest import tiny_clip

# --- the monitor's decisions, against the real database, with a recording queue --------------


@pytest.fixture
def library(factory: Any, user_id: str, tmp_path: Path) -> Library:
    folder = tmp_path / "photos" / "lib"
    folder.mkdir(parents=True)
    with session_scope(factory) as s:
        lib = Library(user_id=user_id, path=str(folder), scan_generation=0)
        s.add(lib)
        s.flush()
        return lib


def cfg(tmp_path: Path, **kw: Any) -> LibrarySettings:
    return LibrarySettings(roots=[tmp_path / "photos"], **kw)


def set_scanned(factory: Any, lib: Library, ago_s: float | None) -> None:
    with session_scope(factory) as s:
        row = s.get(Library, lib.id)
        assert row is not None
        row.scanned_at = None if ago_s is None else utcnow() - timedelta(seconds=ago_s)


def finish_jobs(factory: Any, state: JobState = JobState.SUCCEEDED) -> None:
    with session_scope(factory) as s:
        for job in s.query(Job).all():
            job.state = state


def scan_jobs(factory: Any) -> list[Job]:
    with session_scope(factory) as s:
        return list(s.query(Job).filter(Job.kind == "scan_library").all())


def test_periodic_rescan_when_due_once_per_interval(factory, library, tmp_path):
    queue, state = RecordingQueue(), MonitorState()
    c = cfg(tmp_path, watch=False, rescan_interval_s=60)
    set_scanned(factory, library, ago_s=30)
    assert monitor_pass(factory, queue, c, state, now_mono=1000.0) == []  # not due yet
    set_scanned(factory, library, ago_s=61)
    assert monitor_pass(factory, queue, c, state, now_mono=1000.0) == [library.id]
    assert [j.id for j in scan_jobs(factory)] == queue.job_ids
    # queued already: nothing more
    assert monitor_pass(factory, queue, c, state, now_mono=1001.0) == []
    # that scan failed (a disk not mounted sets no scanned_at): not asked again at once ...
    finish_jobs(factory, JobState.FAILED)
    assert monitor_pass(factory, queue, c, state, now_mono=1030.0) == []
    # ... but after another interval
    assert monitor_pass(factory, queue, c, state, now_mono=1061.0) == [library.id]
    assert len(queue.job_ids) == 2


def test_the_watched_folders_are_the_real_ones_a_scan_reads(tmp_path):
    top = tmp_path / "lib"
    (top / "2024" / "summer").mkdir(parents=True)
    (tmp_path / "elsewhere" / "deep").mkdir(parents=True)
    os.symlink(tmp_path / "elsewhere", top / "2024" / "link")  # a link out: never watched
    os.symlink(top / "loop", top / "loop")
    want = {str(top), str(top / "2024"), str(top / "2024" / "summer")}
    assert set(real_folders([str(top)], [tmp_path.resolve()])) == want


def test_one_librarys_trouble_stays_its_own(tmp_path):
    """A tree deeper than Python's recursion limit (os.walk raised RecursionError, and no
    library was watched), a library folder swapped for a link out of the roots (os.walk
    followed it), a library folder gone: each is left out with its reason, the others are
    watched."""
    roots = [(tmp_path / "photos").resolve()]
    deep, linked, gone, fine = (roots[0] / n for n in ("deep", "linked", "gone", "fine"))
    (fine / "2024").mkdir(parents=True)
    folder = deep
    deep.mkdir()
    for _ in range(1200):  # one at a time: pathlib's mkdir(parents=True) recurses too
        folder = folder / "d"
        os.mkdir(folder)
    (tmp_path / "outside" / "secret").mkdir(parents=True)
    linked.symlink_to(tmp_path / "outside")
    libs = {str(p): ("u", p.name) for p in (deep, linked, gone, fine)}

    try:
        folders, problems = watch_plan(libs, roots)
    finally:  # removed here: shutil.rmtree (pytest's cleanup) recurses too deep for it
        subprocess.run(["rm", "-rf", str(deep)], check=True)

    assert set(problems) == {"linked", "gone"}, problems
    assert "a link now" in problems["linked"] and "missing" in problems["gone"]
    assert str(folder) in folders and len([f for f in folders if f.startswith(str(deep))]) == 1201
    assert {str(fine), str(fine / "2024")} <= set(folders)
    assert not any(f.startswith(str(tmp_path / "outside")) for f in folders)
    assert not any(f.startswith(str(linked)) for f in folders)


def test_never_scanned_or_zero_interval_is_not_due():
    now = utcnow()
    assert not due_for_rescan(None, 60, now)
    assert not due_for_rescan(now - timedelta(hours=5), 0, now)
    assert due_for_rescan(now - timedelta(seconds=61), 60, now)
    assert due_for_rescan((now - timedelta(seconds=61)).replace(tzinfo=None), 60, now)


def test_changes_wait_until_the_folder_is_quiet_and_no_scan_runs(factory, library, tmp_path):
    queue, state = RecordingQueue(), MonitorState()
    c = cfg(tmp_path, watch=True, watch_settle_s=10, rescan_interval_s=0)
    monitor_pass(factory, queue, c, state, now_mono=0.0)  # learns the folders
    folder = Path(library.path)
    assert state.mark([str(folder / "a.jpg"), "/elsewhere/b.jpg"], now=100.0) == {library.id}
    assert state.mark([str(folder / "sub" / "c.jpg")], now=105.0) == {library.id}
    assert monitor_pass(factory, queue, c, state, now_mono=114.0) == []  # 9 s since the last
    assert monitor_pass(factory, queue, c, state, now_mono=115.0) == [library.id]
    assert library.id not in state.dirty

    # A change while that scan runs is kept until it ends, then scanned once more.
    with session_scope(factory) as s:
        s.query(Job).update({Job.state: JobState.RUNNING})
    state.mark([str(folder / "d.jpg")], now=120.0)
    assert monitor_pass(factory, queue, c, state, now_mono=140.0) == []
    assert library.id in state.dirty
    finish_jobs(factory)
    assert monitor_pass(factory, queue, c, state, now_mono=141.0) == [library.id]
    assert len(queue.job_ids) == 2


def test_a_deleted_library_is_forgotten(factory, library, tmp_path):
    queue, state = RecordingQueue(), MonitorState()
    c = cfg(tmp_path, watch=True, watch_settle_s=0, rescan_interval_s=0)
    monitor_pass(factory, queue, c, state, now_mono=0.0)
    state.mark([str(Path(library.path) / "a.jpg")], now=1.0)
    with session_scope(factory) as s:
        s.delete(s.get(Library, library.id))
    assert monitor_pass(factory, queue, c, state, now_mono=5.0) == []
    assert state.dirty == {} and state.folders == {}
    assert queue.job_ids == []


def test_a_second_scan_of_a_library_does_nothing_while_one_runs(
    factory, library, user_id, tmp_path
):
    """Two scans of one folder at once would prune each other's rows: the later one yields."""
    queue = RecordingQueue()
    with session_scope(factory) as s:
        first, created = libraries.request_scan(user_id, library.id, db_session=s, queue=queue)
        assert created
        first.state = JobState.RUNNING
    with session_scope(factory) as s:
        second, created = libraries.request_scan(user_id, library.id, db_session=s, queue=queue)
        assert second.id == first.id and not created  # one open scan at a time
        # A duplicate that slipped in (two processes, SQLite) is harmless: it does nothing.
        dup = repositories.add_job(
            db_session=s, user_id=user_id, kind="scan_library", payload={"library_id": library.id}
        )
        dup.state = JobState.RUNNING
    settings = Settings(data_dir=tmp_path / "data", library=cfg(tmp_path))
    env = JobEnvironment(settings, factory, ImageStore(settings.data_dir), {}, no_model)
    ctx = JobContext(dup.id, user_id, "scan_library", {"library_id": library.id}, env, print)
    library_scan.scan_library_job(ctx)
    with session_scope(factory) as s:
        assert s.get(Library, library.id).scan_generation == 0  # type: ignore[union-attr]


def no_model() -> Any:
    raise AssertionError("a scan that yields needs no model")


# --- end to end: the embedded runner's monitor, a real watcher, real files ------------------


@pytest.fixture
def watch_settings(tmp_path: Path, db_url: str) -> Settings:
    return library_settings(tmp_path, db_url, watch=True, watch_settle_s=0.3, rescan_interval_s=0)


def wait_for_paths(client: Any, user: Any, want: set[str], timeout: float = 45.0) -> set[str]:
    deadline = time.monotonic() + timeout
    found: set[str] = set()
    while time.monotonic() < deadline:
        items = client.get("/images", headers=user.headers).json()["items"]
        found = {i["path"] for i in items}
        if found == want:
            return found
        time.sleep(0.2)
    raise AssertionError(f"library not current: {sorted(found)} != {sorted(want)}")


@pytest.mark.slow
def test_new_and_deleted_photos_appear_without_asking(
    watch_settings: Settings,
    make_user: Any,
    tmp_path: Path,
) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    lib = tmp_path / "photos" / "lib"
    (lib / "a.jpg").write_bytes(noisy_jpeg(seed=1))
    with TestClient(create_app(watch_settings)) as client:
        client.app.state.container.model.install(tiny_clip(0))
        user = make_user(client)
        r = client.post("/libraries", json={"path": str(lib)}, headers=user.headers)
        assert r.status_code == 202, r.text
        wait_jobs(client)
        assert wait_for_paths(client, user, {str(lib / "a.jpg")})
        # Once watched, a folder is scanned once more (changes made before the watch began).
        deadline = time.monotonic() + 30
        while len(scans(client, user)) < 2:
            assert time.monotonic() < deadline, "no scan when the folder began to be watched"
            time.sleep(0.2)
        wait_jobs(client)
        time.sleep(0.5)
        (lib / "new").mkdir()
        (lib / "new" / "b.jpg").write_bytes(noisy_jpeg(seed=2))  # no scan asked for
        wait_for_paths(client, user, {str(lib / "a.jpg"), str(lib / "new" / "b.jpg")})
        wait_jobs(client)
        time.sleep(1.0)  # the new folder is watched too now
        (lib / "new" / "c.jpg").write_bytes(noisy_jpeg(seed=3))
        (lib / "a.jpg").unlink()
        wait_for_paths(client, user, {str(lib / "new" / "b.jpg"), str(lib / "new" / "c.jpg")})
        wait_jobs(client)
        assert len(scans(client, user)) >= 4  # first, watch began, b.jpg added, c.jpg and a.jpg


@pytest.mark.slow
def test_a_library_whose_folder_became_a_link_says_why_it_is_not_watched(
    watch_settings: Settings,
    make_user: Any,
    tmp_path: Path,
) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    lib, other = tmp_path / "photos" / "lib", tmp_path / "photos" / "other"
    other.mkdir()
    (lib / "a.jpg").write_bytes(noisy_jpeg(seed=1))
    (other / "b.jpg").write_bytes(noisy_jpeg(seed=2))
    (tmp_path / "outside").mkdir()
    with TestClient(create_app(watch_settings)) as client:
        client.app.state.container.model.install(tiny_clip(0))
        user = make_user(client)
        ids = []
        for folder in (lib, other):
            r = client.post("/libraries", json={"path": str(folder)}, headers=user.headers)
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        wait_for_paths(client, user, {str(lib / "a.jpg"), str(other / "b.jpg")})
        wait_jobs(client)
        # lib's folder swapped for a link out of the roots; the monitor restarts its watch when
        # the folder set changes, here when a third library is added.
        lib.rename(tmp_path / "lib-moved")
        lib.symlink_to(tmp_path / "outside")
        third = tmp_path / "photos" / "third"
        third.mkdir()
        assert (
            client.post("/libraries", json={"path": str(third)}, headers=user.headers).status_code
            == 202
        )
        deadline = time.monotonic() + 30
        while True:
            got = client.get(f"/libraries/{ids[0]}", headers=user.headers).json()
            if got["watch_error"]:
                break
            assert time.monotonic() < deadline, got
            time.sleep(0.2)
        assert "link" in got["watch_error"], got
        # A change outside marks nothing; the other library is still watched.
        (tmp_path / "outside" / "x.jpg").write_bytes(noisy_jpeg(seed=3))
        wait_jobs(client)
        (other / "c.jpg").write_bytes(noisy_jpeg(seed=4))
        wait_for_paths(
            client, user, {str(lib / "a.jpg"), str(other / "b.jpg"), str(other / "c.jpg")}
        )
        assert (
            client.get(f"/libraries/{ids[1]}", headers=user.headers).json()["watch_error"] is None
        )


def scans(client: Any, user: Any) -> list[dict[str, Any]]:
    jobs = client.get("/jobs", headers=user.headers).json()["items"]
    return [j for j in jobs if j["kind"] == "scan_library"]
