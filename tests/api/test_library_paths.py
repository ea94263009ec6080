"""/libraries and the bytes of file names: names that are not UTF-8, names not in NFKC, and what
another user's library lets a user learn (nothing), on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path

import pytest

from app.text import UnsafeText, check_path_text
from tests.api.test_libraries import db_settings, paths, report  # noqa: F401 (fixture)
from tests.api.test_search import wait_jobs
from tests.db_fixtures import noisy_jpeg
from tests.model_fixtures import tiny_serving  # noqa: F401


def add(client, user, path: str | Path):
    body = json.dumps({"path": str(path)})  # ASCII: "\\ud800" escapes a lone surrogate
    headers = {**user.headers, "Content-Type": "application/json"}
    return client.post("/libraries", content=body, headers=headers)


def test_a_library_with_files_named_in_latin1_indexes_the_rest_and_reports_them(
    api_client, folder_user
):
    user, lib = folder_user
    raw = os.fsencode(lib)
    (lib / "ok.jpg").write_bytes(noisy_jpeg(seed=11))
    Path(os.fsdecode(raw + b"/caf\xe9.jpg")).write_bytes(noisy_jpeg(seed=12))  # Latin-1 "é"
    sub = Path(os.fsdecode(raw + b"/d\xe9j\xe0"))  # a folder so named: its subtree is skipped
    (sub / "deeper").mkdir(parents=True)
    (sub / "inside.jpg").write_bytes(noisy_jpeg(seed=13))
    (sub / "deeper" / "more.jpg").write_bytes(noisy_jpeg(seed=14))
    r = add(api_client, user, lib)
    assert r.status_code == 202, r.text
    lib_id = r.json()["id"]
    wait_jobs(api_client)  # fails if the scan failed
    rep = report(api_client, user, lib_id)  # a 200, with text that is valid UTF-8
    assert (rep["added"], rep["skipped_count"]) == (1, 2), rep
    reasons = {s["path"]: s["reason"] for s in rep["skipped"]}
    assert set(reasons) == {f"{lib}/caf\\xe9.jpg", f"{lib}/d\\xe9j\\xe0"}, reasons
    assert "not valid UTF-8" in reasons[f"{lib}/caf\\xe9.jpg"]
    assert "folder" in reasons[f"{lib}/d\\xe9j\\xe0"]
    assert set(paths(api_client, user)) == {str(lib / "ok.jpg")}
    assert api_client.get("/libraries", headers=user.headers).status_code == 200
    # The next scan sees the same; a new file beside them is indexed.
    (lib / "new.jpg").write_bytes(noisy_jpeg(seed=15))
    assert api_client.post(f"/libraries/{lib_id}/scan", headers=user.headers).status_code == 202
    wait_jobs(api_client)
    rep = report(api_client, user, lib_id)
    assert (rep["added"], rep["unchanged"], rep["skipped_count"]) == (1, 1, 2), rep
    assert set(paths(api_client, user)) == {str(lib / "ok.jpg"), str(lib / "new.jpg")}


def test_a_link_or_fifo_named_in_latin1_is_skipped_and_the_library_still_reads(
    api_client, folder_user, tmp_path
):
    user, lib = folder_user
    raw = os.fsencode(lib)
    (lib / "ok.jpg").write_bytes(noisy_jpeg(seed=21))
    (tmp_path / "secret.jpg").write_bytes(noisy_jpeg(seed=22))
    os.symlink(os.fsencode(tmp_path / "secret.jpg"), raw + b"/lnk_\xff.jpg")  # leads out
    os.symlink(os.fsencode(lib / "ok.jpg"), raw + b"/in_\xfe.jpg")  # stays in
    os.mkfifo(raw + b"/fifo_\xfd")
    os.symlink(os.fsencode(tmp_path), raw + b"/dir_\xfc")  # a linked folder
    r = add(api_client, user, lib)
    assert r.status_code == 202, r.text
    lib_id = r.json()["id"]
    wait_jobs(api_client)
    rep = report(api_client, user, lib_id)
    assert (rep["added"], rep["skipped_count"]) == (1, 4), rep
    assert {s["path"] for s in rep["skipped"]} == {
        f"{lib}/lnk_\\xff.jpg",
        f"{lib}/in_\\xfe.jpg",
        f"{lib}/fifo_\\xfd",
        f"{lib}/dir_\\xfc",
    }
    assert all("not valid UTF-8" in s["reason"] for s in rep["skipped"]), rep
    listing = api_client.get("/libraries", headers=user.headers)
    assert listing.status_code == 200 and listing.json()["items"][0]["report"] == rep
    assert set(paths(api_client, user)) == {str(lib / "ok.jpg")}


def test_a_folder_that_leads_to_a_name_not_in_utf8_is_refused_clearly(
    api_client,
    make_user,
    tmp_path,
):
    user = make_user(api_client)
    photos = tmp_path / "photos"
    target = Path(os.fsdecode(os.fsencode(photos) + b"/caf\xe9"))
    target.mkdir()
    (photos / "link").symlink_to(target)
    for path in (photos / "link", photos / "link" / "sub"):
        r = add(api_client, user, path)
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "invalid_path" and "caf\\xe9" in error["message"], error
    assert api_client.get("/libraries", headers=user.headers).json()["items"] == []


@pytest.mark.parametrize(
    "name",
    [
        unicodedata.normalize("NFD", "Café"),  # as macOS writes it
        "ｂｏｂ２",  # full width
        "ﬁles",  # a ligature
    ],
)
def test_a_folder_name_is_taken_as_given_never_normalised(
    api_client,
    make_user,
    tiny_serving,  # noqa: F811, ARG001 (installs the model)
    tmp_path,
    name,
):
    user = make_user(api_client)
    folder = tmp_path / "photos" / name
    folder.mkdir()
    (folder / "x.jpg").write_bytes(noisy_jpeg(seed=31))
    assert unicodedata.normalize("NFKC", name) != name
    assert not (tmp_path / "photos" / unicodedata.normalize("NFKC", name)).exists()
    r = add(api_client, user, folder)
    assert r.status_code == 202, r.text
    assert r.json()["path"] == str(folder.resolve())
    wait_jobs(api_client)
    assert report(api_client, user, r.json()["id"])["added"] == 1
    assert set(paths(api_client, user)) == {str(folder.resolve() / "x.jpg")}


def test_a_full_width_name_is_its_own_folder_not_the_ascii_one(
    api_client,
    make_user,
    tiny_serving,  # noqa: F811, ARG001 (installs the model)
    tmp_path,
):
    photos = (tmp_path / "photos").resolve()
    alice, bob = make_user(api_client, "alice"), make_user(api_client, "bob")
    (photos / "alice").mkdir()
    (photos / "alice" / "a.jpg").write_bytes(noisy_jpeg(seed=41))
    (photos / "ａｌｉｃｅ").mkdir()
    (photos / "ａｌｉｃｅ" / "b.jpg").write_bytes(noisy_jpeg(seed=42))
    assert add(api_client, alice, photos / "alice").status_code == 202
    r = add(api_client, bob, photos / "ａｌｉｃｅ")
    assert r.status_code == 202, r.text
    assert r.json()["path"] == str(photos / "ａｌｉｃｅ")
    wait_jobs(api_client)
    assert set(paths(api_client, bob)) == {str(photos / "ａｌｉｃｅ" / "b.jpg")}
    assert set(paths(api_client, alice)) == {str(photos / "alice" / "a.jpg")}


def test_a_library_path_is_still_checked(api_client, make_user, tmp_path):
    user = make_user(api_client)
    photos = tmp_path / "photos"
    for bad in (
        f"{photos}/a\x00b",  # NUL
        f"{photos}/a\ud800b",  # a lone surrogate (JSON "\ud800")
        f"{photos}/a\nb",  # control characters
        f"{photos}/a\tb",
        f"{photos}/a\x7fb",
        f"{photos}/a\x85b",
        f"{photos}/{'n' * 4097}",  # over-long
        "",
    ):
        r = add(api_client, user, bad)
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["error"]["code"] == "validation_failed", r.text
        assert "path" in r.json()["error"]["message"]
    for good in ("Café", unicodedata.normalize("NFD", "Café"), "ｂｏｂ２", "a b", "😀\u200d"):
        assert check_path_text(f"/x/{good}") == f"/x/{good}"  # unchanged
    for bad in ("\x1b[31m", "\x00", "\udce9"):
        with pytest.raises(UnsafeText):
            check_path_text(f"/x/{bad}")


def test_another_users_library_tells_nothing_of_what_exists_in_it(
    api_client,
    make_user,
    tmp_path,
):
    photos = (tmp_path / "photos").resolve()
    alice, bob = make_user(api_client, "alice"), make_user(api_client, "bob")
    mine = photos / "alice"
    (mine / "trips" / "2019").mkdir(parents=True)
    (mine / "a.jpg").write_bytes(noisy_jpeg(seed=51))
    (mine / "out").symlink_to(tmp_path)  # a link leaving the roots
    (mine / "loop").symlink_to(mine / "loop")
    (mine / "too").symlink_to(photos / "bobs")  # a link to bob's own folder
    assert add(api_client, alice, mine).status_code == 202
    (photos / "bobs").mkdir()
    (photos / "bobs" / "into").symlink_to(mine)  # bob's way into alice's folder

    taken = add(api_client, bob, mine)
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "library_taken"
    assert "alice" not in taken.text and alice.id not in taken.text
    probes = [
        mine / "trips",  # exists
        mine / "trips" / "2019",
        mine / "holidays",  # does not
        mine / "holidays" / "2019",
        mine / "a.jpg",  # a file
        mine / "out",
        mine / "out" / "x",
        mine / "loop",
        mine / "loop" / "x",
        mine / "too",
        mine / ("n" * 300),
        f"{mine}/./trips",
        f"{mine}//holidays",
        photos / "bobs" / "into",
        photos / "bobs" / "into" / "trips",
        photos / "bobs" / "into" / "holidays",
        photos / "bobs" / "into" / "loop" / "x",
        photos,  # above it
    ]
    for probe in probes:
        r = add(api_client, bob, probe)
        assert (r.status_code, r.content) == (taken.status_code, taken.content), (probe, r.text)
    # Elsewhere the answers are what they were: a missing folder, a path outside the roots.
    r = add(api_client, bob, photos / "bobs" / "missing")
    assert r.status_code == 422 and r.json()["error"]["code"] == "not_a_folder", r.text
    r = add(api_client, bob, "/")
    assert r.status_code == 422 and r.json()["error"]["code"] == "path_not_allowed", r.text
    assert add(api_client, bob, photos / "bobs").status_code == 202
    # Alice's own overlapping folders are still named to her.
    r = add(api_client, alice, mine / "trips")
    assert r.status_code == 409 and r.json()["error"]["code"] == "library_overlaps", r.text


def test_a_report_stored_before_the_fix_is_still_answered(api_client, folder_user):
    """A report written by an older version with a raw non-UTF-8 name (SQLite kept it) made
    GET /libraries answer 500 until the next scan: no answer can fail to encode now."""
    from sqlalchemy import update
    from sqlalchemy.exc import SQLAlchemyError

    from app.models import Library

    user, lib = folder_user
    (lib / "ok.jpg").write_bytes(noisy_jpeg(seed=16))
    lib_id = add(api_client, user, lib).json()["id"]
    wait_jobs(api_client)
    old = report(api_client, user, lib_id)
    bad = f"{lib}/caf\udce9.jpg"  # what os.walk gives for b"caf\xe9.jpg"
    old["skipped"] = [{"path": bad, "reason": "not an image"}]
    old["skipped_count"] = 1
    try:
        with api_client.app.state.container.session_factory() as s:
            s.execute(update(Library).where(Library.id == lib_id).values(report=old))
            s.commit()
    except (SQLAlchemyError, UnicodeError):  # PostgreSQL cannot even store it
        assert api_client.app.state.container.engine.dialect.name == "postgresql"
        return
    r = api_client.get(f"/libraries/{lib_id}", headers=user.headers)
    assert r.status_code == 200, r.text
    assert r.json()["report"]["skipped"][0]["path"] == f"{lib}/caf?.jpg"
    assert api_client.get("/libraries", headers=user.headers).status_code == 200


def test_folders_whose_names_differ_in_case_are_different_folders(
    api_client, folder_user, make_user
):
    """On SQLite, LIKE ignores ASCII case: bob's /…/trips was refused as inside alice's
    /…/TRIPS/x. Paths are case-sensitive on the file systems the service runs on."""
    alice, lib = folder_user
    bob = make_user(api_client, "bob")
    (lib / "TRIPS" / "x").mkdir(parents=True)
    (lib / "trips").mkdir()
    (lib / "trips" / "a.jpg").write_bytes(noisy_jpeg(seed=41))
    assert add(api_client, alice, lib / "TRIPS" / "x").status_code == 202
    r = add(api_client, bob, lib / "trips")
    assert r.status_code == 202, r.text
    wait_jobs(api_client)
    assert set(paths(api_client, bob)) == {str(lib / "trips" / "a.jpg")}
    # The same folder, or one inside alice's, still overlaps.
    assert add(api_client, bob, lib / "TRIPS").status_code == 409
