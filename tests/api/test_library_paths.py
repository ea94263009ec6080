"""/libraries and the bytes of file names: a path is taken as given, never normalised, on SQLite
and PostgreSQL."""

from __future__ import annotations

import json
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
