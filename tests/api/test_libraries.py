"""/libraries: folders indexed in place, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.config import LibrarySettings, Settings
from tests.api.test_search import wait_jobs
from tests.db_fixtures import noisy_jpeg
from tests.model_fixtures import tiny_serving  # noqa: F401


def library_settings(tmp_path: Path, db_url: str, **library: object) -> Settings:
    """Embedded jobs on `db_url`, libraries allowed under tmp_path/photos (lib/ made)."""
    (tmp_path / "photos" / "lib").mkdir(parents=True)
    return Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        broker_url="",
        library=LibrarySettings.model_validate({"roots": [tmp_path / "photos"], **library}),
    )


@pytest.fixture
def db_settings(tmp_path: Path, db_url: str) -> Settings:
    # Scans only on request here (tests/api/test_library_monitor.py: watching, rescans).
    return library_settings(tmp_path, db_url, watch=False, rescan_interval_s=0)


def report(client, user, lib_id):
    r = client.get(f"/libraries/{lib_id}", headers=user.headers)
    assert r.status_code == 200, r.text
    return r.json()["report"]


def libraries(client, user):
    return client.get("/libraries", headers=user.headers).json()["items"]


def paths(client, user):
    items = client.get("/images", headers=user.headers).json()["items"]
    return {i["path"]: i["id"] for i in items}


def test_scan_rescan_and_safety(api_client, make_user, tiny_serving, tmp_path):  # noqa: F811, ARG001
    user = make_user(api_client)
    lib = tmp_path / "photos" / "lib"
    (lib / "a.jpg").write_bytes(noisy_jpeg(seed=1))
    (lib / "b.jpg").write_bytes(noisy_jpeg(seed=2))
    (lib / "bad.jpg").write_bytes(b"not an image")
    (tmp_path / "secret.jpg").write_bytes(noisy_jpeg(seed=9))
    os.symlink(tmp_path / "secret.jpg", lib / "escape.jpg")
    os.symlink(lib / "gone.jpg", lib / "broken.jpg")
    listing = api_client.get("/libraries", headers=user.headers).json()
    assert listing == {"items": [], "roots": [str((tmp_path / "photos").resolve())]}
    r = api_client.post("/libraries", json={"path": str(lib)}, headers=user.headers)
    assert r.status_code == 202, r.text
    lib_id = r.json()["id"]
    wait_jobs(api_client)
    rep = report(api_client, user, lib_id)
    assert rep["added"] == 2
    reasons = {Path(s["path"]).name: s["reason"] for s in rep["skipped"]}
    assert set(reasons) == {"bad.jpg", "escape.jpg", "broken.jpg"}
    found = paths(api_client, user)
    assert set(found) == {str(lib / "a.jpg"), str(lib / "b.jpg")}

    # move a, change b, add c
    a_id = found[str(lib / "a.jpg")]
    (lib / "sub").mkdir()
    os.replace(lib / "a.jpg", lib / "sub" / "a2.jpg")
    (lib / "b.jpg").write_bytes(noisy_jpeg(seed=3))
    os.utime(lib / "b.jpg", ns=(1, 1))
    (lib / "c.jpg").write_bytes(noisy_jpeg(seed=4))
    assert api_client.post(f"/libraries/{lib_id}/scan", headers=user.headers).status_code == 202
    wait_jobs(api_client)
    rep = report(api_client, user, lib_id)
    assert (rep["moved"], rep["changed"], rep["added"]) == (1, 1, 1)
    found = paths(api_client, user)
    assert found[str(lib / "sub" / "a2.jpg")] == a_id

    # delete c
    (lib / "c.jpg").unlink()
    api_client.post(f"/libraries/{lib_id}/scan", headers=user.headers)
    wait_jobs(api_client)
    assert report(api_client, user, lib_id)["removed"] == 1

    # foreign library is 404; its folder is refused to others
    other = make_user(api_client, "bob")
    assert api_client.get(f"/libraries/{lib_id}", headers=other.headers).status_code == 404
    r = api_client.post("/libraries", json={"path": str(lib / "sub")}, headers=other.headers)
    assert r.status_code == 409 and r.json()["error"]["code"] == "library_taken"
    # traversal and escapes
    for bad, code in [
        (str(lib / ".." / "lib"), "path_traversal"),
        (str(tmp_path), "path_not_allowed"),
        ("relative/x", "path_not_absolute"),
    ]:
        r = api_client.post("/libraries", json={"path": bad}, headers=other.headers)
        assert r.status_code == 422 and r.json()["error"]["code"] == code, r.text
    os.symlink(tmp_path, tmp_path / "photos" / "out")
    r = api_client.post(
        "/libraries", json={"path": str(tmp_path / "photos" / "out")}, headers=other.headers
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "path_not_allowed"
    # What the file system refuses is a clear 422 too, never a 500: a name too long, a loop.
    os.symlink(tmp_path / "photos" / "loop", tmp_path / "photos" / "loop")
    for bad in (str(tmp_path / "photos" / ("n" * 300)), str(tmp_path / "photos" / "loop")):
        r = api_client.post("/libraries", json={"path": bad}, headers=other.headers)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_path", r.text
    assert [x["path"] for x in libraries(api_client, other)] == []
    # ... and a loop inside a library is one skipped file: the scan goes on.
    os.symlink(lib / "spin.jpg", lib / "spin.jpg")
    assert api_client.post(f"/libraries/{lib_id}/scan", headers=user.headers).status_code == 202
    wait_jobs(api_client)
    skipped = report(api_client, user, lib_id)["skipped"]
    reasons = {Path(x["path"]).name: x["reason"] for x in skipped}
    assert "loops" in reasons["spin.jpg"], reasons

    assert api_client.delete(f"/libraries/{lib_id}", headers=user.headers).status_code == 204
    assert paths(api_client, user) == {}
    assert (lib / "b.jpg").exists()


def scanned_photos(client, user, lib: Path, seeds: range) -> list[str]:
    """Photos fido0.jpg... in `lib` (one per seed), added as a library and scanned: their ids."""
    for i, seed in enumerate(seeds):
        (lib / f"fido{i}.jpg").write_bytes(noisy_jpeg(seed=seed))
    r = client.post("/libraries", json={"path": str(lib)}, headers=user.headers)
    assert r.status_code == 202, r.text
    wait_jobs(client)
    ids = list(paths(client, user).values())
    assert len(ids) == len(seeds)
    return ids


def test_a_concept_taught_from_folder_photos_keeps_copies_of_them(
    api_client,
    make_user,
    tiny_serving,  # noqa: F811, ARG001 (installs the model)
    tmp_path,
):
    user = make_user(api_client)
    lib = tmp_path / "photos" / "lib"
    ids = scanned_photos(api_client, user, lib, seeds=range(40, 43))
    r = api_client.post("/concepts", data={"name": "Fido", "image_ids": ids}, headers=user.headers)
    assert r.status_code == 202, r.text
    concept_id = r.json()["concept"]["id"]
    wait_jobs(api_client)
    concept = api_client.get(f"/concepts/{concept_id}", headers=user.headers).json()
    assert concept["state"] == "ready", concept
    # The folder's files may go: the concept keeps its own copies (validated like uploads).
    for f in lib.iterdir():
        f.unlink()
    examples = api_client.get(f"/concepts/{concept_id}/examples", headers=user.headers).json()
    for ex in examples["items"]:
        got = api_client.get(
            f"/concepts/{concept_id}/examples/{ex['id']}/file", headers=user.headers
        )
        assert got.status_code == 200 and got.content[:2] == b"\xff\xd8"  # a JPEG
    assert len(examples["items"]) == 3


def test_the_original_of_a_folder_photo_is_served_from_its_folder_only(
    api_client,
    make_user,
    tiny_serving,  # noqa: F811, ARG001 (installs the model)
    tmp_path,
):
    user = make_user(api_client)
    lib = tmp_path / "photos" / "lib"
    data = noisy_jpeg(seed=61)
    (lib / "a.jpg").write_bytes(data)
    r = api_client.post("/libraries", json={"path": str(lib)}, headers=user.headers)
    assert r.status_code == 202, r.text
    wait_jobs(api_client)
    image_id = paths(api_client, user)[str(lib / "a.jpg")]
    got = api_client.get(f"/images/{image_id}/file", headers=user.headers)
    assert got.status_code == 200 and got.content == data
    assert "immutable" not in got.headers["cache-control"]  # the folder may change it
    # Another user cannot read it; a swap for a link out of the folder is refused.
    other = make_user(api_client, "bob")
    assert api_client.get(f"/images/{image_id}/file", headers=other.headers).status_code == 404
    (tmp_path / "secret.jpg").write_bytes(noisy_jpeg(seed=62))
    (lib / "a.jpg").unlink()
    os.symlink(tmp_path / "secret.jpg", lib / "a.jpg")
    r = api_client.get(f"/images/{image_id}/file", headers=user.headers)
    assert r.status_code == 404 and r.json()["error"]["code"] == "file_missing"
    (lib / "a.jpg").unlink()  # gone from the folder
    r = api_client.get(f"/images/{image_id}/file", headers=user.headers)
    assert r.status_code == 404 and r.json()["error"]["code"] == "file_missing"


def test_the_cli_adds_scans_lists_and_removes_libraries(
    api_client,
    make_user,
    tiny_serving,  # noqa: F811, ARG001 (installs the model)
    tmp_path,
    monkeypatch,
    capsys,
):
    from app.cli import main as cli
    from app.cli.http import PolarClient

    user = make_user(api_client)
    monkeypatch.setattr(
        cli, "client_factory", lambda url, key: PolarClient(url, key, http=api_client)
    )

    def polar(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main([*argv, "--key", user.key])
        out = capsys.readouterr()
        return code, out.out, out.err

    lib = tmp_path / "photos" / "lib"
    (lib / "a.jpg").write_bytes(noisy_jpeg(seed=81))
    (lib / "notes.jpg").write_bytes(b"not an image")
    code, out, err = polar("library", "add", str(lib))
    assert code == 0, err
    assert "1 added" in out and "1 skipped" in out and "notes.jpg" in out
    (lib / "b.jpg").write_bytes(noisy_jpeg(seed=82))
    code, out, err = polar("library", "scan", str(lib))
    assert code == 0 and "1 added" in out and "1 unchanged" in out, (out, err)
    code, out, _ = polar("library", "list")
    assert code == 0 and str(lib) in out
    # A search names a folder's photo by its file on the server, not a URL that needs the key.
    wait_jobs(api_client)
    code, out, err = polar("search", "a photo", "-k", "5")
    assert code == 0, err
    assert str(lib / "a.jpg") in out and str(lib / "b.jpg") in out, out
    assert "/file" not in out, out
    code, _, err = polar("library", "add", str(tmp_path / "elsewhere"))
    assert code != 0 and "error:" in err  # outside the allowed roots: refused, said so
    code, _, err = polar("library", "scan")
    assert code != 0 and "needs a folder" in err
    code, out, _ = polar("library", "remove", str(lib))
    assert code == 0 and "files are untouched" in out
    assert (lib / "a.jpg").exists()
    code, out, _ = polar("library", "list")
    assert "no libraries yet" in out
