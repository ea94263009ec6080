"""Library scans and what the file system says of one entry: a path past PATH_MAX, a tree deeper
than Python's recursion limit, a link to another file of the library. One entry the file system
refuses is skipped with its reason; the scan never fails for it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.config import Settings
from app.services.library_scan import MAX_STORED_PATH_BYTES, TOO_LONG_TO_STORE
from tests.api.test_libraries import library_settings, paths, report
from tests.api.test_search import wait_jobs
from tests.db_fixtures import noisy_jpeg
from tests.model_fixtures import tiny_serving  # noqa: F401


@pytest.fixture
def db_settings(tmp_path: Path, db_url: str) -> Settings:
    # One file a batch: a link and its target are indexed in different transactions.
    return library_settings(tmp_path, db_url, watch=False, rescan_interval_s=0, batch=1)


def scan(client, user, lib: Path) -> tuple[str, dict]:
    r = client.post("/libraries", json={"path": str(lib)}, headers=user.headers)
    assert r.status_code == 202, r.text
    lib_id = r.json()["id"]
    wait_jobs(client)  # fails if the scan failed
    return lib_id, report(client, user, lib_id)


def rescan(client, user, lib_id: str) -> dict:
    assert client.post(f"/libraries/{lib_id}/scan", headers=user.headers).status_code == 202
    wait_jobs(client)
    return report(client, user, lib_id)


def test_a_path_longer_than_path_max_is_skipped_and_the_rest_indexed(api_client, folder_user):
    user, lib = folder_user
    (lib / "ok.jpg").write_bytes(noisy_jpeg(seed=31))
    # 40 folders of 200 characters, a photo at the bottom: built relative to an open folder,
    # as its absolute path is past PATH_MAX (4096 bytes on Linux).
    fd = os.open(lib, os.O_RDONLY | os.O_DIRECTORY)
    chain = [lib / "vdeep"]
    try:
        for name in ["vdeep"] + ["z" * 200] * 40:
            if name != "vdeep":
                chain.append(chain[-1] / name)
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        out = os.open("toodeep.jpg", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, noisy_jpeg(seed=32))
        os.close(out)
    finally:
        os.close(fd)
    assert len(os.fsencode(chain[-1])) > 4096
    # Folders are opened one by one (openat), so PATH_MAX does not stop the walk; a folder whose
    # path is too long for the database to index is not entered (nothing under it could be).
    too_long = next(p for p in chain if len(os.fsencode(p)) > MAX_STORED_PATH_BYTES)

    lib_id, rep = scan(api_client, user, lib)
    assert (rep["added"], rep["skipped_count"]) == (1, 1), rep
    assert rep["skipped"] == [{"path": str(too_long), "reason": TOO_LONG_TO_STORE}]
    assert set(paths(api_client, user)) == {str(lib / "ok.jpg")}
    # The next scan sees the same.
    rep = rescan(api_client, user, lib_id)
    assert (rep["added"], rep["unchanged"], rep["skipped_count"]) == (0, 1, 1), rep


def test_a_tree_deeper_than_the_recursion_limit_is_walked(api_client, folder_user):
    user, lib = folder_user
    chain = [lib / "d"]
    for _ in range(1199):  # "d/" 1200 times: 2400 bytes, under PATH_MAX
        chain.append(chain[-1] / "d")
    try:
        for folder in chain:
            os.mkdir(folder)
        deep = chain[-1]
        (deep / "bottom.jpg").write_bytes(noisy_jpeg(seed=41))
        (lib / "top.jpg").write_bytes(noisy_jpeg(seed=42))
        _, rep = scan(api_client, user, lib)
        assert (rep["added"], rep["skipped_count"]) == (2, 0), rep
        assert set(paths(api_client, user)) == {str(lib / "top.jpg"), str(deep / "bottom.jpg")}
    finally:  # removed here: shutil.rmtree (pytest's cleanup) recurses too deep for it
        (chain[-1] / "bottom.jpg").unlink(missing_ok=True)
        for folder in reversed(chain):
            if folder.exists():
                os.rmdir(folder)


def test_a_link_to_a_file_of_the_library_is_its_target_indexed_once(api_client, folder_user):
    user, lib = folder_user
    (lib / "sub").mkdir()
    (lib / "g11.jpg").write_bytes(noisy_jpeg(seed=51))
    (lib / "sub" / "b.jpg").write_bytes(noisy_jpeg(seed=52))
    (lib / "text.jpg").write_bytes(b"not an image")
    (lib / "a_rel.jpg").symlink_to("g11.jpg")  # sorts before its target
    (lib / "sub" / "abs.jpg").symlink_to(lib / "g11.jpg")
    (lib / "z_sub.jpg").symlink_to("sub/b.jpg")
    (lib / "chain.jpg").symlink_to("a_rel.jpg")  # a link to a link to g11.jpg
    (lib / "to_text.jpg").symlink_to("text.jpg")
    lib_id, rep = scan(api_client, user, lib)
    assert (rep["added"], rep["skipped_count"]) == (2, 6), rep
    reasons = {s["path"]: s["reason"] for s in rep["skipped"]}
    in_lib = "a link to {} in the library; indexed there"
    assert reasons == {
        str(lib / "text.jpg"): reasons[str(lib / "text.jpg")],
        str(lib / "to_text.jpg"): reasons[str(lib / "text.jpg")],  # read as its target
        str(lib / "a_rel.jpg"): in_lib.format(lib / "g11.jpg"),
        str(lib / "chain.jpg"): in_lib.format(lib / "g11.jpg"),
        str(lib / "sub" / "abs.jpg"): in_lib.format(lib / "g11.jpg"),
        str(lib / "z_sub.jpg"): in_lib.format(lib / "sub" / "b.jpg"),
    }, reasons
    assert "symbolic links" not in reasons[str(lib / "to_text.jpg")]
    found = paths(api_client, user)
    assert set(found) == {str(lib / "g11.jpg"), str(lib / "sub" / "b.jpg")}
    rep = rescan(api_client, user, lib_id)
    assert (rep["added"], rep["unchanged"], rep["skipped_count"]) == (0, 2, 6), rep
    assert paths(api_client, user) == found

    # The target gone, its link is broken; a link whose target is not indexed (its folder
    # named in Latin-1) is read through it and indexed under its own path.
    (lib / "sub" / "b.jpg").unlink()
    latin = Path(os.fsdecode(os.fsencode(lib) + b"/caf\xe9"))
    latin.mkdir()
    (latin / "c.jpg").write_bytes(noisy_jpeg(seed=53))
    (lib / "to_latin.jpg").symlink_to(latin / "c.jpg")
    rep = rescan(api_client, user, lib_id)
    assert (rep["added"], rep["unchanged"], rep["removed"]) == (1, 1, 1), rep
    reasons = {s["path"]: s["reason"] for s in rep["skipped"]}
    assert reasons[str(lib / "z_sub.jpg")] == "broken link"
    assert "not valid UTF-8" in reasons[f"{lib}/caf\\xe9"]
    assert set(paths(api_client, user)) == {str(lib / "g11.jpg"), str(lib / "to_latin.jpg")}
    r = api_client.get(f"/images/{paths(api_client, user)[str(lib / 'to_latin.jpg')]}/file",
                       headers=user.headers)  # fmt: skip
    assert r.status_code == 200 and r.content == noisy_jpeg(seed=53)


def test_a_path_too_long_to_store_is_skipped_not_a_failed_scan(api_client, folder_user):
    """Under PATH_MAX but past what PostgreSQL's index on (library_id, source_path) takes: the
    insert failed, and with it the batch and the scan. Random names: no compression saves it."""
    import random
    import string

    from app.services.library_scan import MAX_STORED_PATH_BYTES

    user, lib = folder_user
    (lib / "ok.jpg").write_bytes(noisy_jpeg(seed=33))
    rng = random.Random(7)
    folder = lib
    while len(str(folder).encode()) < MAX_STORED_PATH_BYTES + 100:
        folder = folder / "".join(rng.choices(string.ascii_letters + string.digits, k=200))
    folder.mkdir(parents=True)
    long_one = folder / "far.jpg"
    long_one.write_bytes(noisy_jpeg(seed=34))
    assert len(str(long_one).encode()) < 4096
    _, rep = scan(api_client, user, lib)
    assert (rep["added"], rep["skipped_count"]) == (1, 1), rep
    # The first folder on its way too long to store: nothing under it could be stored.
    first = next(
        p for p in reversed(long_one.parents) if len(str(p).encode()) > MAX_STORED_PATH_BYTES
    )
    assert rep["skipped"][0]["path"] == str(first)
    assert str(MAX_STORED_PATH_BYTES) in rep["skipped"][0]["reason"]
    assert set(paths(api_client, user)) == {str(lib / "ok.jpg")}
