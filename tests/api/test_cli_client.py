"""The HTTP client (app/cli/http.py) and the `polar` client commands, against the real app.

The app runs in-process behind FastAPI's TestClient (SQLite and PostgreSQL, the embedded job
runner), serving a tiny random CLIP, so embedding and training really happen, in well under a
second. The CLI runs through `app.cli.main([...])` with `app.cli.main.client_factory` swapped for a
PolarClient over that TestClient.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.cli import main as cli
from app.cli.http import PolarAPIError, PolarClient, collect_images
from app.config import Settings
from app.models import Concept, Image
from tests.db_fixtures import ApiUser, image_bytes, noisy_jpeg
from tests.model_fixtures import tiny_serving  # noqa: F401


@dataclass
class Run:
    """What one `polar ...` invocation did."""

    code: int
    out: str
    err: str


@pytest.fixture
def fast_training(db_settings: Settings) -> Settings:
    """A few training steps are enough to go through the whole path."""
    db_settings.training.steps = 30
    return db_settings


@pytest.fixture
def user(api_client: Any, make_user: Callable[..., ApiUser]) -> ApiUser:
    return make_user(api_client, "alice")


@pytest.fixture
def polar(
    api_client: Any,
    user: ApiUser,
    tiny_serving: Any,  # noqa: F811, ARG001 (installs the model the server uses)
    fast_training: Settings,  # noqa: ARG001 (fewer training steps)
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Callable[..., Run]:
    """`polar("upload", path, ...)` runs the CLI as `user` against the test app."""
    monkeypatch.setattr(
        cli, "client_factory", lambda url, key: PolarClient(url, key, http=api_client)
    )
    monkeypatch.delenv("POLAR_API_KEY", raising=False)

    def run(*argv: str, key: str | None = user.key) -> Run:
        capsys.readouterr()
        args = list(argv) + (["--key", key] if key is not None else [])
        code = cli.main(args)
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    return run


def images_in_db(client: Any) -> dict[str, Image]:
    """filename -> row, for every library image."""
    with client.app.state.container.session_factory() as s:
        return {i.original_filename: i for i in s.query(Image).all()}


def write_library(root: Path) -> Path:
    """lib/{a.jpg, b.png, notes.txt, .hidden.jpg, sub/c.jpg, sub/deeper/d.JPEG}."""
    lib = root / "lib"
    (lib / "sub" / "deeper").mkdir(parents=True)
    (lib / "a.jpg").write_bytes(noisy_jpeg(seed=1))
    (lib / "b.png").write_bytes(image_bytes("PNG", color=(10, 200, 10)))
    (lib / "notes.txt").write_text("not a picture")
    (lib / ".hidden.jpg").write_bytes(noisy_jpeg(seed=9))
    (lib / "sub" / "c.jpg").write_bytes(noisy_jpeg(seed=3))
    (lib / "sub" / "deeper" / "d.JPEG").write_bytes(noisy_jpeg(seed=4))
    return lib


# -- upload ---------------------------------------------------------------------------------


def test_upload_folder_skips_and_lists_non_images_then_embeds(polar, api_client, tmp_path):
    lib = write_library(tmp_path)
    r = polar("upload", str(lib), "--wait")
    assert r.code == 0, r.err
    assert f"skipped: {lib / 'notes.txt'}: not an image file" in r.out
    assert f"skipped: {lib / 'sub'}: a folder (use --recursive)" in r.out
    assert "batch 1 (2/2 files): 2 new, 0 duplicate(s), 0 rejected; job " in r.out
    assert "done: 2 new, 0 duplicate(s), 2 skipped, 0 rejected" in r.out
    assert "embedding (job 1/1): 100% (succeeded)" in r.err
    rows = images_in_db(api_client)
    assert sorted(rows) == ["a.jpg", "b.png"]  # not the text file, not the hidden file
    assert all(row.embedding is not None for row in rows.values())


def test_a_file_named_in_latin1_uploads_with_a_replacement_character(polar, api_client, tmp_path):
    """A name that is not UTF-8 (an old share's Latin-1 `café.jpg`) is sent with U+FFFD for the
    bad byte: httpx cannot encode the surrogates Python holds it as, and the server takes UTF-8
    names only."""
    folder = tmp_path / "old-share"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9.jpg")
    (folder / name).write_bytes(noisy_jpeg(seed=21))
    (folder / "plain.jpg").write_bytes(noisy_jpeg(seed=22))
    r = polar("upload", str(folder), "--wait")
    assert r.code == 0, r.err
    assert "done: 2 new, 0 duplicate(s), 0 skipped, 0 rejected" in r.out
    assert sorted(images_in_db(api_client)) == ["caf\ufffd.jpg", "plain.jpg"]


def test_concept_photos_named_in_latin1_are_sent(api_client, user, tmp_path):
    photos = []
    for n in range(3):
        path = tmp_path / os.fsdecode(b"r\xe9x-%d.jpg" % n)
        path.write_bytes(noisy_jpeg(seed=30 + n))
        photos.append(path)
    client = PolarClient("http://testserver", user.key, http=api_client)
    concept, _job = client.create_concept("Rex", None, photos)
    assert concept.example_count == 3
    assert len(client.concept_photos(concept.id)) == 3


def test_recursive_reupload_reports_duplicates(polar, api_client, tmp_path):
    lib = write_library(tmp_path)
    assert polar("upload", str(lib / "a.jpg"), "--wait").code == 0
    first = images_in_db(api_client)["a.jpg"].id
    r = polar("upload", str(lib), "--recursive", "--wait", "--batch-size", "2")
    assert r.code == 0, r.err
    # a.jpg, b.png | sub/c.jpg, sub/deeper/d.JPEG: two requests, the first has the duplicate.
    assert "batch 1 (2/4 files): 1 new, 1 duplicate(s), 0 rejected" in r.out
    assert f"  duplicate: {lib / 'a.jpg'} (image {first})" in r.out
    assert "batch 2 (4/4 files): 2 new, 0 duplicate(s), 0 rejected" in r.out
    assert "done: 3 new, 1 duplicate(s), 1 skipped, 0 rejected" in r.out  # notes.txt
    assert "sub: a folder" not in r.out
    assert sorted(images_in_db(api_client)) == ["a.jpg", "b.png", "c.jpg", "d.JPEG"]
    again = polar("upload", str(lib / "sub" / "c.jpg"))
    assert "0 new, 1 duplicate(s)" in again.out and "; job " not in again.out  # nothing to embed


def test_a_bad_file_is_rejected_and_the_rest_uploaded(polar, api_client, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(noisy_jpeg(seed=1))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "empty.png").write_bytes(b"")
    (folder / "fine.png").write_bytes(image_bytes("PNG"))
    r = polar("upload", str(folder), "--wait")
    assert r.code == 1  # something was refused
    assert re.search(
        rf"rejected: {re.escape(str(folder / 'broken.jpg'))}: .+ \(invalid_image\)", r.out
    )
    assert re.search(
        rf"rejected: {re.escape(str(folder / 'empty.png'))}: .+\(invalid_image\)", r.out
    )
    assert "done: 2 new, 0 duplicate(s), 0 skipped, 2 rejected" in r.out
    assert sorted(images_in_db(api_client)) == ["fine.png", "good.jpg"]


@pytest.mark.usefixtures("tiny_serving")
def test_client_follows_the_servers_file_limit(api_client, user, tmp_path):
    api_client.app.state.container.settings.limits.max_files_per_request = 2
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"p{i}.jpg")
        paths[-1].write_bytes(noisy_jpeg(seed=i))
    client = PolarClient(api_key=user.key, http=api_client)
    seen: list[int] = []
    result = client.upload_images(paths, batch_size=50, on_batch=lambda b: seen.append(b.number))
    assert [len(b.images) for b in result.batches] == [2, 2, 1]
    assert seen == [1, 2, 3]
    assert [i.path for i in result.images] == paths  # request order is kept
    assert len(result.job_ids) == 3 and not any(i.duplicate for i in result.images)
    jobs = [client.wait_job(j, poll_interval=0.02, timeout=60) for j in result.job_ids]
    assert [j.state for j in jobs] == ["succeeded"] * 3
    assert {i.id for i in result.images} == {r.id for r in images_in_db(api_client).values()}


def test_client_raises_the_servers_refusal_unless_told_to_skip(api_client, user, tmp_path):
    good, bad = tmp_path / "good.jpg", tmp_path / "bad.jpg"
    good.write_bytes(noisy_jpeg(seed=1))
    bad.write_bytes(b"plain text")
    client = PolarClient(api_key=user.key, http=api_client)
    with pytest.raises(PolarAPIError) as e:
        client.upload_images([good, bad])
    assert (e.value.status, e.value.code) == (422, "invalid_image")
    assert e.value.detail["files"][0]["index"] == 1
    assert images_in_db(api_client) == {}  # the server stored nothing of the request


@pytest.mark.usefixtures("tiny_serving")
def test_wait_job_reports_progress_until_done(api_client, user, tmp_path):
    (tmp_path / "x.jpg").write_bytes(noisy_jpeg(seed=5))
    client = PolarClient(api_key=user.key, http=api_client)
    [job_id] = client.upload_images([tmp_path / "x.jpg"]).job_ids
    updates: list[Any] = []
    job = client.wait_job(job_id, updates.append, poll_interval=0.02, timeout=60)
    assert job.state == "succeeded" and job.progress == 1.0 and job.kind == "embed_images"
    assert updates[-1] == job
    assert all(u.id == job_id for u in updates)


# -- errors ---------------------------------------------------------------------------------


def test_a_bad_key_is_an_unauthorized_error(polar, api_client, tmp_path):
    client = PolarClient(api_key="polar_nope_0000", http=api_client)
    with pytest.raises(PolarAPIError) as e:
        client.search("a dog")
    assert (e.value.status, e.value.code) == (401, "unauthorized")
    (tmp_path / "a.jpg").write_bytes(noisy_jpeg())
    r = polar("upload", str(tmp_path / "a.jpg"), key="polar_nope_0000")
    assert r.code == 1
    assert r.err.startswith("error: ") and "(unauthorized)" in r.err and "POLAR_API_KEY" in r.err
    assert len(r.err.strip().splitlines()) == 1
    assert images_in_db(api_client) == {}


def test_a_missing_key_says_how_to_get_one(polar):
    r = polar("search", "a dog", key=None)
    assert r.code == 2
    assert "POLAR_API_KEY" in r.err and "polar create-user" in r.err


def test_server_errors_print_code_and_message(polar, tmp_path):
    r = polar("search", "   ")
    assert r.code == 1
    assert r.err.startswith("error: ") and r.err.rstrip().endswith("(empty_query)")
    only_text = tmp_path / "notes.txt"
    only_text.write_text("hello")
    r = polar("upload", str(only_text))
    assert r.code == 1 and "no image files to upload" in r.err
    r = polar("upload", str(tmp_path / "missing"))
    assert r.code == 1 and "no such file or folder" in r.err
    r = polar("concept", "create", "Fido", str(tmp_path / "nothing-here.jpg"))
    assert r.code == 1 and "no such file or folder" in r.err


def test_unreachable_service_is_one_line(monkeypatch, capsys):
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    monkeypatch.setattr(
        cli, "client_factory", lambda url, key: PolarClient(url, key, httpx.MockTransport(refuse))
    )
    code = cli.main(["search", "x", "--key", "k", "--url", "http://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: cannot reach http://127.0.0.1:9") and "polar serve" in err


def test_error_without_the_json_shape_still_maps():
    transport = httpx.MockTransport(
        lambda _request: httpx.Response(502, text="<h1>Bad gateway</h1>")
    )
    with (
        PolarClient("http://polar.example", "k", transport) as client,
        pytest.raises(PolarAPIError) as e,
    ):
        client.get_job("j")
    assert (e.value.status, e.value.code, e.value.message) == (
        502,
        "http_502",
        "<h1>Bad gateway</h1>",
    )


def test_the_key_travels_as_a_bearer_token():
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200, json={"id": "j", "kind": "embed_images", "state": "running", "progress": 0.5}
        )

    with PolarClient("http://polar.example/", "polar_k", httpx.MockTransport(answer)) as client:
        job = client.get_job("j")
    assert (job.state, job.progress, job.done) == ("running", 0.5, False)
    assert str(seen[0].url) == "http://polar.example/jobs/j"
    assert seen[0].headers["Authorization"] == "Bearer polar_k"


# -- concepts and search ------------------------------------------------------------------


def test_concept_create_then_search_through_the_cli(polar, api_client, user, tmp_path):
    lib = tmp_path / "library"
    lib.mkdir()
    for i in range(4):
        (lib / f"scene{i}.jpg").write_bytes(noisy_jpeg(seed=i))
    assert polar("upload", str(lib), "--wait").code == 0
    photos = tmp_path / "fido"
    photos.mkdir()
    for i in range(3):
        (photos / f"fido{i}.jpg").write_bytes(noisy_jpeg(seed=100 + i))

    r = polar("concept", "create", "Fido", "--category", "hat", str(photos))
    assert r.code == 0, r.err
    with api_client.app.state.container.session_factory() as s:
        concept = s.query(Concept).one()
        assert (concept.name, concept.state, concept.version) == ("Fido", "ready", 1)
        placeholder = f"{concept.token} hat"
    assert f"concept Fido ({concept.id}): training, version 1, 3 photo(s)" in r.out
    assert 'Fido: ready: search for "Fido on the beach" and the like' in r.out
    assert "  version 1, 3 photo(s), category hat" in r.out
    assert re.search(r"^  learned in \d+\.\d s from 3 photo\(s\)$", r.out, re.M)
    assert re.search(r"general search quality", r.out)
    assert placeholder not in r.out  # no jargon unless asked (--verbose)
    assert "training Fido: 100% (succeeded)" in r.err
    assert "\r" not in r.err  # not a terminal: one finished line, no redraws

    r = polar("search", "fido's hat at the beach", "-k", "3")
    assert r.code == 0, r.err
    api = api_client.get(
        "/search", params={"q": "fido's hat at the beach", "k": 3}, headers=user.headers
    ).json()
    assert f"rewritten: {api['rewritten']}" in r.out and placeholder in api["rewritten"]
    assert "concepts: Fido (v1, applied)" in r.out
    rows = re.findall(r"^\s+(\d+)\s+(-?[0-9.]+)\s+(\S+)\s+([0-9a-f-]{36})$", r.out, re.M)
    assert [(int(n), f, i) for n, _, f, i in rows] == [
        (h["rank"], h["image"]["filename"], h["image"]["id"]) for h in api["hits"]
    ]
    assert [float(s) for _, s, _, _ in rows] == pytest.approx(
        [h["score"] for h in api["hits"]], abs=1e-3
    )
    assert all(re.fullmatch(r"-?\d+\.\d{3}", s) for _, s, _, _ in rows)  # rounded
    for h in api["hits"]:  # where each hit's file is
        assert re.search(rf"  http://\S+/images/{h['image']['id']}/file$", r.out, re.M)
    assert "(4 image(s) indexed, 0 pending)" in r.out
    assert "demo model" not in r.err  # the tiny test model is no demo model

    plain = polar("search", "fido's hat at the beach", "--plain")
    assert plain.code == 0
    assert "rewritten: fido's hat at the beach" in plain.out and "concepts: none" in plain.out
    assert len(re.findall(r"^\s+\d+\s+-?[0-9.]+\s+scene\d\.jpg", plain.out, re.M)) == 4


def test_search_says_when_the_demo_model_serves(polar, monkeypatch):
    from app.cli.http import SearchResult

    monkeypatch.setattr(SearchResult, "demo_model", property(lambda _self: True))
    r = polar("search", "a hat on the beach")
    assert r.code == 0, r.err
    assert "note: the small synthetic demo model is serving" in r.err
    assert "not real photos" in r.err


def fido_photos(tmp_path: Path, n: int = 3, seed: int = 100) -> Path:
    photos = tmp_path / f"fido{seed}"
    photos.mkdir()
    for i in range(n):
        (photos / f"fido{i}.jpg").write_bytes(noisy_jpeg(seed=seed + i))
    return photos


def test_concept_list_show_rename_category_add_delete(polar, api_client, tmp_path):
    assert "no concepts yet" in polar("concept", "list").out
    assert (
        polar("concept", "create", "Fido", "--category", "hat", str(fido_photos(tmp_path))).code
        == 0
    )

    listed = polar("concept", "list")
    assert listed.code == 0, listed.err
    assert re.search(r"^Fido\s+ready\s+1\s+3\s+hat", listed.out, re.M)

    shown = polar("concept", "show", "fido")  # any case, as queries match names
    assert shown.code == 0, shown.err
    assert "Fido: ready" in shown.out and "  photos (3):" in shown.out
    with api_client.app.state.container.session_factory() as s:
        concept = s.query(Concept).one()
    assert len(re.findall(rf"http://\S+/concepts/{concept.id}/examples/\S+/file", shown.out)) == 3
    verbose = polar("concept", "show", concept.id, "--verbose")
    assert f"  id: {concept.id}" in verbose.out and "placeholder" in verbose.out

    r = polar("concept", "rename", "Fido", "Rex")
    assert r.code == 0 and "renamed Fido to Rex (nothing retrains)" in r.out
    r = polar("concept", "category", "Rex", "dog")
    assert r.code == 0, r.err
    assert "Rex: category dog; retraining as version 2" in r.out
    assert "training Rex: 100% (succeeded)" in r.err

    # More photos: local files and a library image.
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "beach.jpg").write_bytes(noisy_jpeg(seed=500))
    assert polar("upload", str(lib), "--wait").code == 0
    image_id = images_in_db(api_client)["beach.jpg"].id
    r = polar(
        "concept", "add", "rex", str(fido_photos(tmp_path, 1, seed=300)), "--image-id", image_id
    )
    assert r.code == 0, r.err
    assert "Rex: 5 photo(s) now; retraining as version 3" in r.out
    assert "Rex: ready" in r.out

    # Deleting needs --yes off a terminal; a wrong name lists the known ones.
    r = polar("concept", "delete", "Rex")
    assert r.code == 2 and "without --yes" in r.err
    r = polar("concept", "delete", "Fido", "--yes")
    assert r.code == 1 and "no concept named 'Fido' (yours: Rex)" in r.err
    r = polar("concept", "delete", "Rex", "--yes")
    assert r.code == 0 and "deleted Rex" in r.out
    with api_client.app.state.container.session_factory() as s:
        assert s.query(Concept).count() == 0


def test_concept_commands_report_refusals(polar, api_client, tmp_path):
    photos = fido_photos(tmp_path)
    assert polar("concept", "create", "Fido", str(photos)).code == 0
    assert polar("concept", "create", "Rex", str(fido_photos(tmp_path, 3, seed=200))).code == 0
    r = polar("concept", "rename", "Fido", "REX")
    assert r.code == 1 and "(duplicate_concept_name)" in r.err
    r = polar("concept", "add", "Fido", str(photos))
    assert r.code == 1 and "(no_new_photos)" in r.err
    r = polar("concept", "add", "Fido", "--image-id", "00000000-0000-4000-8000-000000000000")
    assert r.code == 1 and "image not found" in r.err
    r = polar("concept", "add", "Fido")
    assert r.code == 2 and "no photos to add" in r.err
    r = polar("concept", "show", "Nobody")
    assert r.code == 1 and "no concept named 'Nobody'" in r.err
    with api_client.app.state.container.session_factory() as s:
        versions = sorted((c.name, c.version) for c in s.query(Concept))
    assert versions == [("Fido", 1), ("Rex", 1)]


def test_concept_create_refusal_is_an_error(polar, api_client, tmp_path):
    (tmp_path / "one.jpg").write_bytes(noisy_jpeg(seed=1))
    r = polar("concept", "create", "Fido", str(tmp_path / "one.jpg"))
    assert r.code == 1
    assert "(too_few_photos)" in r.err
    with api_client.app.state.container.session_factory() as s:
        assert s.query(Concept).count() == 0


def test_collect_images_orders_dedupes_and_skips(tmp_path):
    lib = write_library(tmp_path)
    images, skipped = collect_images([lib, lib / "a.jpg"], recursive=True)
    names = [p.relative_to(lib).as_posix() for p in images]
    assert names == ["a.jpg", "b.png", "sub/c.jpg", "sub/deeper/d.JPEG"]
    assert skipped == [lib / "notes.txt"]
    with pytest.raises(FileNotFoundError):
        collect_images([tmp_path / "nope"], recursive=False)


# -- index ----------------------------------------------------------------------------------


def test_index_status_and_rebuild_through_the_cli(polar, api_client, tmp_path):
    lib = write_library(tmp_path)
    assert polar("upload", str(lib), "--wait").code == 0
    r = polar("index")
    assert r.code == 0, r.err
    assert "images: 2 (2 searchable, 0 pending)" in r.out
    assert "regions (five-both): 2 of 2" in r.out
    # A layout the stored crops do not have: the rebuild embeds them again.
    with api_client.app.state.container.session_factory() as s:
        s.query(Image).update({Image.region_layout: None, Image.region_embeddings: None})
        s.commit()
    assert "regions (five-both): 0 of 2" in polar("index").out
    r = polar("index", "--rebuild")
    assert r.code == 0, r.err
    assert re.search(r"rebuild job: \S+ \(queued\)", r.out)
    assert "rebuilding: 100% (succeeded)" in r.err
    assert r.out.rstrip().endswith("regions (five-both): 2 of 2")
    with api_client.app.state.container.session_factory() as s:
        assert all(s.scalars(select(Image.region_embeddings)).all())


def test_concept_photos_mark_and_unmark(polar, api_client, tmp_path, monkeypatch):
    from app.services import calibration

    lib = tmp_path / "lib"
    lib.mkdir()
    for i in range(6):
        (lib / f"p{i}.jpg").write_bytes(noisy_jpeg(seed=700 + i))
    assert polar("upload", str(lib), "--wait").code == 0
    ids = {name: row.id for name, row in images_in_db(api_client).items()}
    taught = [ids["p0.jpg"], ids["p1.jpg"], ids["p2.jpg"]]
    monkeypatch.setattr(calibration, "ALBUM_CUTOFF", -1e9)  # every library photo in the album
    r = polar("concept", "create", "Fido", str(fido_photos(tmp_path)))
    assert r.code == 0, r.err
    r = polar("concept", "add", "Fido", *[a for i in taught for a in ("--image-id", i)])
    assert r.code == 0, r.err
    r = polar("concept", "photos", "fido", "--order", "confidence")
    assert r.code == 0, r.err
    assert "Fido: 6 photo(s)" in r.out
    assert all(re.search(rf"{i}\s+\S*p\d\.jpg\s+\(.*taught from\)", r.out) for i in taught)
    r = polar("concept", "mark", "Fido", ids["p5.jpg"], "--not")
    assert r.code == 0, r.err
    assert f"{ids['p5.jpg']}: not Fido" in r.out and "retraining as version 3" in r.out
    assert ids["p5.jpg"] not in polar("concept", "photos", "Fido").out
    r = polar("concept", "mark", "Fido", ids["p5.jpg"], "--not")
    assert r.code == 0 and "retraining" not in r.out
    r = polar("concept", "unmark", "Fido", ids["p5.jpg"])
    assert r.code == 0 and "mark taken back" in r.out
    assert ids["p5.jpg"] in polar("concept", "photos", "Fido").out
    r = polar("concept", "unmark", "Fido", ids["p5.jpg"])
    assert r.code == 1 and "no mark" in r.err
    r = polar("concept", "mark", "Fido", "00000000-0000-4000-8000-000000000000")
    assert r.code == 1 and "not found" in r.err
