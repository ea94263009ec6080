"""Folder libraries on real file systems: a second name for one folder is the same folder.

Bind mounts (what `docker run -v` and `mount --bind` make), a case-insensitive file system (a
FUSE passthrough that folds case as SMB/CIFS shares do, tests/fixtures/casefold_fs.py), tmpfs,
and mounts that change under the running service. Mounting needs root (CI runs as root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.config import LibrarySettings, Settings
from app.errors import Misconfigured
from app.main import create_app
from tests.api.test_libraries import db_settings, paths, report  # noqa: F401 (the fixture)
from tests.api.test_search import wait_jobs
from tests.db_fixtures import noisy_jpeg

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root (CI runs as root)")

CASEFOLD_FS = Path(__file__).parents[1] / "fixtures" / "casefold_fs.py"


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def umount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    """Mount points to unmount after the test, last first."""
    made: list[Path] = []
    yield made
    for target in reversed(made):
        umount(target)


def bind(source: Path, target: Path, mounts: list[Path]) -> None:
    target.mkdir(parents=True, exist_ok=True)
    mount("--bind", str(source), str(target))
    mounts.append(target)


def add(client, user, path) -> object:
    return client.post("/libraries", json={"path": str(path)}, headers=user.headers)


def photos_in(folder: Path, seeds: range) -> set[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for s in seeds:
        (folder / f"p{s}.jpg").write_bytes(noisy_jpeg(seed=s))
    return {str(folder / f"p{s}.jpg") for s in seeds}


def rescan(client, user, lib_id: str) -> dict:
    """Scan again and wait for it; the library as GET /libraries/{id} shows it then."""
    r = client.post(f"/libraries/{lib_id}/scan", headers=user.headers)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 60
    while client.get(f"/jobs/{job_id}", headers=user.headers).json()["state"] in (
        "queued",
        "running",
    ):
        assert time.monotonic() < deadline, "the scan did not finish"
        time.sleep(0.05)
    return client.get(f"/libraries/{lib_id}", headers=user.headers).json()


def last_scan(client, user) -> dict:
    jobs = client.get("/jobs", headers=user.headers).json()["items"]
    return max((j for j in jobs if j["kind"] == "scan_library"), key=lambda j: j["created_at"])


def test_a_bind_mount_of_another_users_folder_is_that_folder(
    api_client, folder_user, make_user, tmp_path, mounts
):
    alice, lib = folder_user
    bob = make_user(api_client, "bob")
    photos = (tmp_path / "photos").resolve()
    mine = photos_in(lib / "trips", range(1, 3))
    assert add(api_client, alice, lib).status_code == 202
    wait_jobs(api_client)
    bobs = photos / "bob"
    own = photos_in(bobs, range(10, 11))

    # Alice's folder, and one inside it, under another name in bob's folder.
    bind(lib, bobs / "view", mounts)
    bind(lib / "trips", bobs / "trips-view", mounts)
    for probe in (bobs / "view", bobs / "view" / "trips", bobs / "trips-view"):
        r = add(api_client, bob, probe)
        assert r.status_code == 409 and r.json()["error"]["code"] == "library_taken", probe
    # Bob's own folder holds those mounts: added, but the scan does not enter them.
    r = add(api_client, bob, bobs)
    assert r.status_code == 202, r.text
    bob_lib = r.json()["id"]
    wait_jobs(api_client)
    assert set(paths(api_client, bob)) == own
    rep = report(api_client, bob, bob_lib)
    refused = {s["path"]: s["reason"] for s in rep["skipped"]}
    assert set(refused) == {str(bobs / "view"), str(bobs / "trips-view")}, rep
    assert all("another user's library" in why for why in refused.values())
    assert rep["refused_count"] == 2
    # The report names the mount by its own path only: nothing of what lies inside.
    assert "p1.jpg" not in str(rep) and str(lib) not in str(rep)
    assert set(paths(api_client, alice)) == mine


def test_a_mount_that_changes_under_the_running_service_is_seen_by_the_next_scan(
    api_client, folder_user, make_user, tmp_path, mounts
):
    alice, lib = folder_user
    bob = make_user(api_client, "bob")
    photos_in(lib, range(1, 3))
    assert add(api_client, alice, lib).status_code == 202
    bobs = (tmp_path / "photos" / "bob").resolve()
    own = photos_in(bobs, range(10, 11))
    trip = photos_in(bobs / "trip", range(20, 22))
    r = add(api_client, bob, bobs)
    bob_lib = r.json()["id"]
    wait_jobs(api_client)
    assert set(paths(api_client, bob)) == own | trip

    # Alice's folder mounted over bob's sub-folder: its photos are not bob's, and bob's own
    # photos that were there go (the next scan after the mount goes away finds them again).
    bind(lib, bobs / "trip", mounts)
    got = rescan(api_client, bob, bob_lib)
    assert set(paths(api_client, bob)) == own, got["report"]
    assert got["report"]["refused_count"] == 1
    umount(bobs / "trip")
    mounts.pop()
    rescan(api_client, bob, bob_lib)
    assert set(paths(api_client, bob)) == own | trip

    # Alice's folder mounted over bob's whole library folder: the scan fails, saying so,
    # and bob's library holds nothing of hers.
    bind(lib, bobs, mounts)
    rescan(api_client, bob, bob_lib)
    job = last_scan(api_client, bob)
    assert job["state"] == "failed" and job["error"]["code"] == "library_taken", job
    assert paths(api_client, bob) == {}


def test_the_data_folder_is_never_a_library(api_client, folder_user, tmp_path, mounts):
    user, lib = folder_user
    data = api_client.app.state.container.settings.data_dir.resolve()
    photos = (tmp_path / "photos").resolve()
    # A bind mount of the data folder (or a folder in it) under an allowed root.
    (data / "originals").mkdir(exist_ok=True)
    bind(data, photos / "data-view", mounts)
    bind(data / "originals", photos / "o", mounts)
    for probe in (photos / "data-view", photos / "data-view" / "originals", photos / "o"):
        r = add(api_client, user, probe)
        assert r.status_code == 422 and "data folder" in r.json()["error"]["message"], r.text
    # A library around it: added (the root holds other things), never entering it.
    photos_in(lib, range(1, 2))
    r = add(api_client, user, lib)
    assert r.status_code == 202
    bind(data, lib / "inside", mounts)
    wait_jobs(api_client)
    got = rescan(api_client, user, r.json()["id"])
    assert set(paths(api_client, user)) == {str(lib / "p1.jpg")}
    assert got["report"]["refused_count"] == 1, got["report"]


@pytest.mark.parametrize("how", ["by name", "by a bind mount of a folder above it"])
def test_the_service_refuses_to_start_with_its_data_folder_under_a_library_root(
    tmp_path, mounts, how
):
    data = tmp_path / "srv" / "polar-data"
    data.mkdir(parents=True)
    if how == "by name":
        root = tmp_path / "srv"
    else:
        root = tmp_path / "photos"
        bind(tmp_path / "srv", root, mounts)
    settings = Settings(
        data_dir=data,
        database_url=f"sqlite:///{tmp_path / 'x.db'}",
        broker_url="",
        library=LibrarySettings(roots=[root]),
    )
    with pytest.raises(Misconfigured) as refused:
        create_app(settings)
    assert "POLAR_DATA_DIR" in refused.value.message and str(data) in refused.value.message
    # The CLI says it in one line, no traceback.
    env = {
        **os.environ,
        "POLAR_DATA_DIR": str(data),
        "POLAR_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}",
        "POLAR_BROKER_URL": "",
        "POLAR_LIBRARY__ROOTS": f'["{root}"]',
    }
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve"], env=env, capture_output=True, text=True
    )
    assert out.returncode != 0 and "data_dir_in_library_roots" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


# --- a case-insensitive file system ----------------------------------------------------------


@pytest.fixture(params=["serverino", "noserverino"])
def share(request, tmp_path, mounts) -> Path:
    """tmp_path/photos/share: a case-insensitive FUSE mount. serverino: one inode number per
    folder, whatever the name (CIFS's default); noserverino: a number per name asked for."""
    backing, share = tmp_path / "share-backing", tmp_path / "photos" / "share"
    backing.mkdir()
    share.mkdir(parents=True)
    flags = ["--use-ino"] if request.param == "serverino" else []
    proc = subprocess.Popen(
        [sys.executable, str(CASEFOLD_FS), str(backing), str(share), *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 10
    while not os.path.ismount(share):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the FUSE mount did not come up"
        time.sleep(0.05)
    mounts.append(share)
    yield share.resolve()
    umount(share)
    proc.wait(timeout=10)


def test_on_a_case_insensitive_share_another_case_is_the_same_folder(
    api_client, folder_user, make_user, share
):
    alice, _ = folder_user
    bob = make_user(api_client, "bob")
    mine = photos_in(share / "Alice" / "Trips", range(1, 3))
    assert (share / "ALICE" / "trips" / "p1.jpg").read_bytes() == noisy_jpeg(seed=1)
    assert add(api_client, alice, share / "Alice").status_code == 202
    wait_jobs(api_client)
    assert set(paths(api_client, alice)) == mine

    taken = add(api_client, bob, share / "Alice")
    assert taken.status_code == 409
    for probe in (
        share / "ALICE",
        share / "alice",
        share / "aLiCe" / "trips",
        share / "ALICE" / "no-such-folder",  # refused before asking: no answer tells it exists
        share,  # around it
    ):
        r = add(api_client, bob, probe)
        assert (r.status_code, r.content) == (taken.status_code, taken.content), probe
    # Alice's own other name for her folder is her overlap, not a second library.
    r = add(api_client, alice, share / "ALICE" / "TRIPS")
    assert r.status_code == 409, r.text
    # Nothing of alice's reached bob.
    assert paths(api_client, bob) == {}
    photos_in(share / "bob", range(5, 6))
    assert add(api_client, bob, share / "Bob").status_code == 202
    wait_jobs(api_client)
    assert {Path(p).name for p in paths(api_client, bob)} == {"p5.jpg"}


def test_on_a_case_sensitive_file_system_names_differing_in_case_stay_two_folders(
    api_client, folder_user, make_user, tmp_path, mounts
):
    """tmpfs is case-sensitive: bob's /…/alice beside alice's /…/Alice is his own folder."""
    alice, _ = folder_user
    bob = make_user(api_client, "bob")
    disk = (tmp_path / "photos" / "tmpfs").resolve()
    disk.mkdir()
    mount("-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk))
    mounts.append(disk)
    photos_in(disk / "Alice", range(1, 2))
    theirs = photos_in(disk / "alice", range(2, 3))
    assert add(api_client, alice, disk / "Alice").status_code == 202
    r = add(api_client, bob, disk / "alice")
    assert r.status_code == 202, r.text
    wait_jobs(api_client)
    assert set(paths(api_client, bob)) == theirs


def test_a_proc_link_the_server_may_not_read_is_a_422():
    """realpath raised PermissionError for /proc/1/cwd and the request ended in a 500. Checked
    in a forked child that became an unprivileged user (root may read every /proc link), with
    / as the allowed root."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from app.errors import ValidationFailed
    from app.models import Base
    from app.services.library_paths import confine_folder

    work = Path(tempfile.mkdtemp(prefix="polar-nobody-"))
    os.chmod(work, 0o777)
    settings = Settings(data_dir=work / "data", library=LibrarySettings(roots=["/"]), broker_url="")
    engine = create_engine(f"sqlite:///{work}/nobody.db")
    Base.metadata.create_all(engine)
    os.chmod(work / "nobody.db", 0o666)
    engine.dispose()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            answers = []
            child_engine = create_engine(f"sqlite:///{work}/nobody.db")
            with Session(child_engine) as s:
                for raw in ("/proc/1/cwd", "/proc/1/root/etc", "/proc/1/cwd/x"):
                    try:
                        confine_folder(raw, settings, db_session=s, user_id="u")
                        answers.append(f"{raw} accepted")
                    except ValidationFailed as e:
                        answers.append(f"{raw} {e.code}")
            os.write(write, "\n".join(answers).encode())
        except BaseException as e:  # told to the parent, which fails the test
            os.write(write, f"crashed: {type(e).__name__}: {e}".encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        out = f.read()
    os.waitpid(pid, 0)
    shutil.rmtree(work, ignore_errors=True)
    assert out.split("\n") == [
        "/proc/1/cwd invalid_path", "/proc/1/root/etc invalid_path", "/proc/1/cwd/x invalid_path",
    ], out  # fmt: skip


def test_a_folder_swapped_for_a_link_during_a_scan_is_not_walked(
    api_client, folder_user, make_user, tmp_path, monkeypatch
):
    """Between the listing of a folder and the walk into it, it becomes a link to another
    user's folder (or /): named in the report by its own path, nothing under it."""
    from app.services import folders

    alice, lib = folder_user
    bob = make_user(api_client, "bob")
    secret = (tmp_path / "photos" / "bobs").resolve()
    photos_in(secret / "private-names", range(30, 32))
    assert add(api_client, bob, secret).status_code == 202
    photos_in(lib / "a", range(1, 2))
    photos_in(lib / "b", range(2, 3))
    wait_jobs(api_client)

    real_open = folders.open_folder_beneath
    swapped: list[Path] = []

    def swap_then_open(path: Path, root: Path) -> int:
        if path.name == "b" and not swapped:  # listed as a folder a moment ago
            shutil.rmtree(path)
            path.symlink_to(secret)
            swapped.append(path)
        return real_open(path, root)

    monkeypatch.setattr(folders, "open_folder_beneath", swap_then_open)
    r = add(api_client, alice, lib)
    assert r.status_code == 202, r.text
    wait_jobs(api_client)
    assert swapped == [lib / "b"]
    rep = report(api_client, alice, r.json()["id"])
    assert set(paths(api_client, alice)) == {str(lib / "a" / "p1.jpg")}
    assert [s["path"] for s in rep["skipped"]] == [str(lib / "b")], rep
    assert "private-names" not in str(rep) and "p30" not in str(rep)
