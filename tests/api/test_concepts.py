"""/concepts through HTTP on SQLite and PostgreSQL, and the train_concept job handler.

Training runs for real, on a tiny random open_clip model installed as the serving model
(the app's ModelLoader.install), so a concept trains in well under a second.
"""

from __future__ import annotations

import functools
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
from fastapi.testclient import TestClient
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from PIL import Image
from sqlalchemy import func, select, update

from app.config import ModelSettings, Settings
from app.main import create_app
from app.ml.adapter import ConceptAdapter
from app.ml.encode import encode_images
from app.ml.model import ClipBundle, bundle_from_model, demo_checkpoint_path
from app.models import Adapter, Concept, ConceptExample, Job
from app.models import Image as ImageRow
from app.services import job_runs, training
from app.services.job_runs import JobContext
from tests.db_fixtures import ApiUser, create_api_user, image_bytes
from tests.fakes import RecordingQueue, use_queue

TINY = ModelSettings(
    name="tiny-concepts", pretrained="random-0", device="cpu", fallback_to_demo=False
)
DONE = ("succeeded", "failed")


@functools.cache
def tiny_model() -> ClipBundle:
    """A random CLIP with 32 px images and a 32-wide text tower (trains in milliseconds)."""
    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32)
    text = CLIPTextCfg(context_length=77, width=32, heads=4, layers=2)
    model = CLIP(embed_dim=24, vision_cfg=vision, text_cfg=text)
    preprocess = open_clip.image_transform(32, is_train=False)
    return bundle_from_model(model, preprocess, name=TINY.name, pretrained=TINY.pretrained)


@pytest.fixture(scope="session")
def tiny_bundle() -> ClipBundle:
    return tiny_model()


def tiny_app(settings: Settings) -> Any:
    """An app on `settings` whose searches and jobs use the tiny model."""
    app = create_app(settings)
    app.state.container.model.install(tiny_model())
    return app


@pytest.fixture
def tiny_settings(db_settings: Settings) -> Settings:
    """db_settings serving the tiny model, 30 training steps."""
    db_settings.model = TINY.model_copy()
    db_settings.training.steps = 30
    db_settings.training.token_mode = "shared"  # most tests read the token; one tests "distinct"
    return db_settings


@pytest.fixture
def client(tiny_settings: Settings) -> Iterator[TestClient]:
    with TestClient(tiny_app(tiny_settings)) as c:
        yield c


@pytest.fixture
def user(client: TestClient) -> ApiUser:
    return create_api_user(client, "alice")


@pytest.fixture
def manual_jobs(client: TestClient) -> list[str]:
    """Jobs are only recorded, not run; the test runs them itself (see run_now)."""
    return use_queue(client, RecordingQueue()).job_ids


# -- helpers -----------------------------------------------------------------------------------


def photo(i: int, fmt: str = "PNG") -> bytes:
    """A distinct small image per index."""
    return image_bytes(fmt, (40, 36), ((i * 53) % 256, (i * 97) % 256, (i * 29 + 80) % 256))


def photos(n: int, start: int = 0) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"p{i}.png", photo(i), "image/png")) for i in range(start, start + n)]


def create(
    client: TestClient, user: ApiUser, name: str = "Fido", category: str | None = "dog", **kw: Any
):
    data = {"name": name} | ({"category": category} if category is not None else {})
    return client.post(
        "/concepts", data=data, files=kw.get("files", photos(4)), headers=user.headers
    )


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    return body["error"]


def wait_job(client: TestClient, user: ApiUser, job_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/jobs/{job_id}", headers=user.headers).json()
        if job["state"] in DONE or time.monotonic() > deadline:
            return job
        time.sleep(0.05)


def run_now(client: TestClient, job_id: str) -> None:
    app: Any = client.app
    job_runs.run_job(job_id, app.state.container.jobs)


def count(client: TestClient, model: Any, *where: Any) -> int:
    app: Any = client.app
    with app.state.container.session_factory() as s:
        return s.scalar(select(func.count()).select_from(model).where(*where))


def stored_files(client: TestClient) -> list[Path]:
    app: Any = client.app
    root = app.state.container.settings.data_dir
    return sorted(
        p.relative_to(root)
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).parts[0] in ("originals", "thumbs")
    )


def get(client: TestClient, user: ApiUser, concept_id: str) -> dict:
    r = client.get(f"/concepts/{concept_id}", headers=user.headers)
    assert r.status_code == 200, r.text
    return r.json()


def trained(client: TestClient, user: ApiUser, **kw: Any) -> dict:
    """A concept created and trained to `ready`."""
    r = create(client, user, **kw)
    assert r.status_code == 202, r.text
    assert wait_job(client, user, r.json()["job"]["id"])["state"] == "succeeded"
    return get(client, user, r.json()["concept"]["id"])


def context(client: TestClient, job_id: str) -> JobContext:
    """A JobContext for calling the handler directly, as a second delivery of the job would."""
    app: Any = client.app
    with app.state.container.session_factory() as s:
        job = s.get(Job, job_id)
        return JobContext(
            job.id,
            job.user_id,
            job.kind,
            dict(job.payload),
            app.state.container.jobs,
            lambda _f: None,
        )


# -- create ------------------------------------------------------------------------------------


def test_create_trains_to_ready_with_metrics_and_retention(client, user):
    r = create(client, user, files=photos(5))
    assert r.status_code == 202, r.text
    concept, job = r.json()["concept"], r.json()["job"]
    assert (concept["name"], concept["category"], concept["state"]) == ("Fido", "dog", "training")
    assert (concept["version"], concept["token"], concept["placeholder"]) == (1, "sks", "sks dog")
    assert concept["example_count"] == 5 and concept["job_id"] == job["id"]
    assert concept["metrics"] is None and concept["retention_score"] is None
    assert job["kind"] == "train_concept"

    done = wait_job(client, user, job["id"])
    assert (done["state"], done["progress"], done["error"]) == ("succeeded", 1.0, None)
    got = get(client, user, concept["id"])
    assert (got["state"], got["version"], got["job_id"]) == ("ready", 1, job["id"])
    m = got["metrics"]
    assert m["n_photos"] == 5 and m["steps"] == 30
    # The tiny model has no recipe of its own (polar.json): the paper's objective, its λ.
    assert (m["recipe"], m["keep_weight"], m["lr"], m["lam"]) == ("paper", 0.0, 1e-3, 0.1)
    assert m["model_id"].startswith("tiny-concepts/random-0@")
    assert m["final_loss"] > 0 and m["train_seconds"] > 0
    # The tiny model ships no retention set: the text-only proxy is used, and says so.
    assert m["retention_method"] == "text_cosine" and m["retention_captions"] >= 200
    assert 0.0 < got["retention_score"] <= 1.0
    assert got["retention_score"] == pytest.approx(m["retention_adapted"])
    assert got["retention_flagged"] == (1.0 - got["retention_score"] > 0.03)

    with client.app.state.container.session_factory() as s:
        [row] = s.scalars(select(Adapter).where(Adapter.concept_id == concept["id"])).all()
        adapter = ConceptAdapter.from_bytes(row.weights)
        assert row.version == 1 and row.model_id == m["model_id"]
        assert (adapter.token, adapter.category, adapter.steps) == ("sks", "dog", 30)
        assert float(adapter.b.norm()) > 0  # it learned something
        examples = s.scalars(select(ConceptExample)).all()
        assert len(examples) == 5
        assert {e.embedding_model for e in examples} == {m["model_id"]}
        assert all(len(e.embedding) == 24 * 4 for e in examples)


def test_create_without_category_uses_the_bare_token(client, user):
    got = trained(client, user, category=None)
    assert (got["category"], got["placeholder"], got["state"]) == (None, "sks", "ready")


def test_duplicate_photos_in_one_request_count_once(client, user):
    files = [*photos(3), ("files", ("again.png", photo(0), "image/png"))]
    r = create(client, user, files=files)
    assert r.status_code == 202
    assert r.json()["concept"]["example_count"] == 3


@pytest.mark.parametrize("taken", ["Fido", "fido", "  FIDO  "])
def test_duplicate_name_is_409_and_stores_nothing(client, user, taken):
    assert create(client, user, "Fido").status_code == 202
    before = stored_files(client)
    assert before  # the comparison below means something
    err = assert_error(
        create(client, user, taken, files=photos(3, 10)), 409, "duplicate_concept_name"
    )
    assert "Fido" in err["message"] or "fido" in err["message"].lower()
    assert count(client, Concept) == 1 and count(client, Job) == 1
    assert stored_files(client) == before


def test_same_name_for_two_users_is_fine(client, user):
    bob = create_api_user(client, "bob")
    assert create(client, user, "Fido").status_code == 202
    assert create(client, bob, "Fido").status_code == 202


@pytest.mark.parametrize(
    ("files", "code", "got"),
    [
        (photos(2), "too_few_photos", 2),
        (photos(14), "too_many_photos", 14),
        ([*photos(2), ("files", ("dup.png", photo(1), "image/png"))], "too_few_photos", 2),
    ],
)
def test_photo_count_outside_the_range_is_422_naming_it(client, user, files, code, got):
    err = assert_error(create(client, user, files=files), 422, code)
    assert "3 to 13" in err["message"]
    assert err["detail"] == {"min_photos": 3, "max_photos": 13, "got": got}
    assert count(client, Concept) == 0 and count(client, ConceptExample) == 0
    assert stored_files(client) == []


def test_photo_bounds_come_from_settings(tiny_settings):
    tiny_settings.training.min_photos, tiny_settings.training.max_photos = 2, 3
    with TestClient(tiny_app(tiny_settings)) as c:
        u = create_api_user(c)
        assert create(c, u, files=photos(2)).status_code == 202
        err = assert_error(create(c, u, "Rex", files=photos(4, 5)), 422, "too_many_photos")
        assert "2 to 3" in err["message"]


def test_create_without_files_is_422(client, user):
    r = client.post("/concepts", data={"name": "Fido"}, headers=user.headers)
    assert "got 0" in assert_error(r, 422, "too_few_photos")["message"]


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("   ", "invalid_concept_name"),
        ("x" * 65, "invalid_concept_name"),
        ("!!! ...", "invalid_concept_name"),
        ("tab\there", "invalid_concept_name"),
    ],
)
def test_bad_names_are_422_and_store_nothing(client, user, name, code):
    assert_error(create(client, user, name), 422, code)
    assert count(client, Concept) == 0 and stored_files(client) == []


def test_empty_name_is_422(client, user):
    r = create(client, user, "")
    assert r.status_code == 422 and r.json()["error"]["code"] in (
        "invalid_concept_name",
        "validation_failed",
    )


def test_names_up_to_64_characters_and_unicode_are_fine(client, user):
    r = create(client, user, "É" * 64)
    assert r.status_code == 202 and r.json()["concept"]["name"] == "É" * 64
    assert (
        create(client, user, "  Mr. Whiskers  ", files=photos(3, 10)).json()["concept"]["name"]
        == "Mr. Whiskers"
    )


def test_bad_category_is_422(client, user):
    assert_error(create(client, user, category="x" * 41), 422, "invalid_category")
    assert_error(create(client, user, category="..."), 422, "invalid_category")
    assert count(client, Concept) == 0


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"", 422, "invalid_image"),
        (b"not an image at all", 422, "invalid_image"),
        (photo(0, "PNG")[:60], 422, "invalid_image"),
    ],
)
def test_invalid_photo_rejects_the_request(client, user, data, status, code):
    files = [*photos(3), ("files", ("bad.png", data, "image/png"))]
    err = assert_error(create(client, user, files=files), status, code)
    assert err["detail"]["files"][0]["index"] == 3
    assert err["detail"]["files"][0]["filename"] == "bad.png"
    assert count(client, Concept) == 0 and count(client, Job) == 0
    assert stored_files(client) == []


def test_unsupported_photo_format_is_415(client, user):
    ico = image_bytes("ICO", (16, 16))
    files = [*photos(3), ("files", ("a.ico", ico, "image/x-icon"))]
    assert_error(create(client, user, files=files), 415, "unsupported_media")
    assert stored_files(client) == []


def test_concepts_need_a_key(client):
    assert_error(client.get("/concepts"), 401, "unauthorized")
    assert_error(client.post("/concepts", data={"name": "x"}), 401, "unauthorized")


# -- list and get ------------------------------------------------------------------------------


@pytest.mark.usefixtures("manual_jobs")
def test_list_is_paginated_oldest_first_and_per_user(client, user):
    bob = create_api_user(client, "bob")
    ids = [
        create(client, user, f"c{i}", files=photos(3, 3 * i)).json()["concept"]["id"]
        for i in range(5)
    ]
    create(client, bob, "bobs", files=photos(3, 50))
    seen, cursor, pages = [], None, 0
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        r = client.get("/concepts", params=params, headers=user.headers)
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["items"]) <= 2
        seen += [c["id"] for c in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids and pages == 3
    first = client.get("/concepts", headers=user.headers).json()["items"][0]
    assert first == get(client, user, ids[0])
    assert first["job_id"] is not None and first["example_count"] == 3


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 201}, {"cursor": "garbage!"}])
def test_bad_pagination_is_422(client, user, params):
    r = client.get("/concepts", params=params, headers=user.headers)
    assert r.status_code == 422 and r.json()["error"]["code"] in (
        "validation_failed",
        "invalid_cursor",
    )


@pytest.mark.usefixtures("manual_jobs")
def test_foreign_and_unknown_ids_are_the_same_404(client, user):
    bob = create_api_user(client, "bob")
    cid = create(client, bob, "Rex").json()["concept"]["id"]
    unknown = "00000000-0000-4000-8000-000000000000"
    answers = []
    for target in (cid, unknown):
        for method, path, kw in [
            ("GET", f"/concepts/{target}", {}),
            ("PATCH", f"/concepts/{target}", {"json": {"name": "Mine"}}),
            ("POST", f"/concepts/{target}/examples", {"files": photos(1, 40)}),
            ("DELETE", f"/concepts/{target}", {}),
        ]:
            r = client.request(method, path, headers=user.headers, **kw)
            answers.append(assert_error(r, 404, "not_found"))
    assert all(a == {"code": "not_found", "message": "concept not found"} for a in answers)
    assert get(client, bob, cid)["name"] == "Rex"  # untouched


# -- patch -------------------------------------------------------------------------------------


def test_rename_needs_no_retraining(client, user):
    c = trained(client, user)
    r = client.patch(f"/concepts/{c['id']}", json={"name": "Rex"}, headers=user.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["job"] is None
    assert (body["concept"]["name"], body["concept"]["version"]) == ("Rex", 1)
    assert body["concept"]["state"] == "ready" and body["concept"]["metrics"] == c["metrics"]
    # Changing only the case of its own name is not a collision.
    r = client.patch(f"/concepts/{c['id']}", json={"name": "REX"}, headers=user.headers)
    assert r.status_code == 200 and r.json()["concept"]["name"] == "REX"
    assert count(client, Job) == 1


@pytest.mark.usefixtures("manual_jobs")
def test_rename_onto_another_concept_is_409(client, user):
    create(client, user, "Fido")
    other = create(client, user, "Rex", files=photos(3, 10)).json()["concept"]
    r = client.patch(f"/concepts/{other['id']}", json={"name": " fido "}, headers=user.headers)
    assert_error(r, 409, "duplicate_concept_name")
    assert get(client, user, other["id"])["name"] == "Rex"


def test_new_category_retrains_as_a_new_version(client, user):
    c = trained(client, user)
    r = client.patch(f"/concepts/{c['id']}", json={"category": "puppy"}, headers=user.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["concept"]["version"] == 2 and body["concept"]["placeholder"] == "sks puppy"
    assert body["job"] is not None and body["concept"]["job_id"] == body["job"]["id"]
    assert wait_job(client, user, body["job"]["id"])["state"] == "succeeded"
    got = get(client, user, c["id"])
    assert (got["state"], got["version"], got["category"]) == ("ready", 2, "puppy")
    with client.app.state.container.session_factory() as s:
        rows = s.scalars(select(Adapter).order_by(Adapter.version)).all()
        assert [r.version for r in rows] == [1, 2]
        assert ConceptAdapter.from_bytes(rows[1].weights).category == "puppy"
    # null drops the category (another version); the same category again retrains nothing.
    r = client.patch(f"/concepts/{c['id']}", json={"category": None}, headers=user.headers)
    assert r.json()["concept"]["placeholder"] == "sks" and r.json()["concept"]["version"] == 3
    r = client.patch(f"/concepts/{c['id']}", json={"category": None}, headers=user.headers)
    assert r.json()["job"] is None and r.json()["concept"]["version"] == 3


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({}, "validation_failed"),
        ({"colour": "red"}, "validation_failed"),
        ({"name": ""}, "invalid_concept_name"),
        ({"name": "y" * 65}, "invalid_concept_name"),
        ({"category": "z" * 41}, "invalid_category"),
    ],
)
@pytest.mark.usefixtures("manual_jobs")
def test_bad_patch_is_422_and_changes_nothing(client, user, body, code):
    c = create(client, user).json()["concept"]
    assert_error(client.patch(f"/concepts/{c['id']}", json=body, headers=user.headers), 422, code)
    got = get(client, user, c["id"])
    assert (got["name"], got["category"], got["version"]) == ("Fido", "dog", 1)


# -- more photos -------------------------------------------------------------------------------


def test_more_photos_train_a_new_version_on_all_of_them(client, user):
    c = trained(client, user, files=photos(4))
    r = client.post(f"/concepts/{c['id']}/examples", files=photos(3, 20), headers=user.headers)
    assert r.status_code == 202, r.text
    body = r.json()
    assert (body["concept"]["version"], body["concept"]["state"]) == (2, "training")
    assert body["concept"]["example_count"] == 7 and body["job"]["kind"] == "train_concept"
    assert wait_job(client, user, body["job"]["id"])["state"] == "succeeded"
    got = get(client, user, c["id"])
    assert (got["state"], got["version"], got["metrics"]["n_photos"]) == ("ready", 2, 7)
    with client.app.state.container.session_factory() as s:
        versions = s.scalars(select(ConceptExample.version_added)).all()
        assert sorted(versions) == [1] * 4 + [2] * 3


@pytest.mark.usefixtures("manual_jobs")
def test_more_photos_beyond_the_maximum_is_422(client, user):
    c = create(client, user, files=photos(10)).json()["concept"]
    before = stored_files(client)
    assert before  # the comparison below means something
    r = client.post(f"/concepts/{c['id']}/examples", files=photos(4, 30), headers=user.headers)
    err = assert_error(r, 422, "too_many_photos")
    assert "3 to 13" in err["message"] and err["detail"]["got"] == 14
    assert get(client, user, c["id"])["version"] == 1 and count(client, ConceptExample) == 10
    assert stored_files(client) == before
    # Already-known photos do not count twice.
    r = client.post(
        f"/concepts/{c['id']}/examples", files=photos(3, 0) + photos(3, 30), headers=user.headers
    )
    assert r.status_code == 202 and r.json()["concept"]["example_count"] == 13


@pytest.mark.usefixtures("manual_jobs")
def test_only_known_photos_is_422(client, user):
    c = create(client, user, files=photos(3)).json()["concept"]
    r = client.post(f"/concepts/{c['id']}/examples", files=photos(2), headers=user.headers)
    assert_error(r, 422, "no_new_photos")
    assert get(client, user, c["id"])["version"] == 1


@pytest.mark.usefixtures("manual_jobs")
def test_bad_extra_photo_stores_nothing(client, user):
    c = create(client, user).json()["concept"]
    before = stored_files(client)
    assert before  # the comparison below means something
    files = [*photos(1, 30), ("files", ("x.png", b"nope", "image/png"))]
    r = client.post(f"/concepts/{c['id']}/examples", files=files, headers=user.headers)
    assert_error(r, 422, "invalid_image")
    assert stored_files(client) == before and count(client, ConceptExample) == 4


@pytest.mark.usefixtures("manual_jobs")
def test_examples_without_files_is_422(client, user):
    c = create(client, user).json()["concept"]
    r = client.post(f"/concepts/{c['id']}/examples", headers=user.headers)
    assert "image_ids" in assert_error(r, 422, "validation_failed")["message"]


# -- delete ------------------------------------------------------------------------------------


def test_delete_cascades_and_keeps_files_others_use(client, user):
    c = trained(client, user, files=photos(3))
    # The library holds the same content as photo 0: that file must survive.
    shared = client.post(
        "/images", files=[("files", ("lib.png", photo(0), "image/png"))], headers=user.headers
    )
    assert shared.status_code == 202
    before = stored_files(client)
    assert before  # the comparison below means something
    r = client.delete(f"/concepts/{c['id']}", headers=user.headers)
    assert r.status_code == 204 and r.content == b""
    assert_error(client.get(f"/concepts/{c['id']}", headers=user.headers), 404, "not_found")
    assert count(client, ConceptExample) == 0 and count(client, Adapter) == 0
    after = stored_files(client)
    assert len(after) == len(before) - 4  # two photos: original + thumbnail each
    with client.app.state.container.session_factory() as s:
        kept = s.scalar(select(ImageRow.storage_path))
    assert (client.app.state.container.settings.data_dir / kept).is_file()
    assert_error(client.delete(f"/concepts/{c['id']}", headers=user.headers), 404, "not_found")
    # The name is free again.
    assert create(client, user, files=photos(3, 60)).status_code == 202


# -- the training job --------------------------------------------------------------------------


@pytest.mark.usefixtures("manual_jobs")
def test_running_the_job_twice_leaves_one_adapter(client, user):
    r = create(client, user).json()
    run_now(client, r["job"]["id"])
    first = get(client, user, r["concept"]["id"])
    assert first["state"] == "ready"
    training.train_concept(context(client, r["job"]["id"]))  # a redelivered task
    assert count(client, Adapter) == 1
    again = get(client, user, r["concept"]["id"])
    assert (again["state"], again["metrics"]) == ("ready", first["metrics"])


@pytest.mark.usefixtures("manual_jobs")
def test_rerun_after_the_adapter_was_stored_finishes_the_concept(client, user):
    r = create(client, user).json()
    run_now(client, r["job"]["id"])
    # A crash between storing the adapter and the state change: the rerun only finishes.
    with client.app.state.container.session_factory() as s:
        s.execute(update(Concept).values(state="training", metrics=None))
        s.commit()
    training.train_concept(context(client, r["job"]["id"]))
    got = get(client, user, r["concept"]["id"])
    assert got["state"] == "ready" and got["metrics"]["n_photos"] == 4
    assert count(client, Adapter) == 1


@pytest.mark.usefixtures("manual_jobs")
def test_an_older_job_never_overwrites_a_newer_version(client, user):
    r = create(client, user).json()
    cid, v1_job = r["concept"]["id"], r["job"]["id"]
    v2 = client.post(f"/concepts/{cid}/examples", files=photos(2, 30), headers=user.headers)
    v2_job = v2.json()["job"]["id"]
    run_now(client, v1_job)  # superseded before it ran: does nothing
    assert get(client, user, cid)["state"] == "training"
    run_now(client, v2_job)
    run_now(client, v1_job)  # even run again afterwards
    got = get(client, user, cid)
    assert (got["state"], got["version"], got["metrics"]["n_photos"]) == ("ready", 2, 6)
    assert got["job_id"] == v2_job
    with client.app.state.container.session_factory() as s:
        assert s.scalars(select(Adapter.version)).all() == [2]


@pytest.mark.usefixtures("manual_jobs")
def test_an_older_version_finishing_late_stores_its_adapter_but_not_the_state(
    client, user, monkeypatch
):
    r = create(client, user).json()
    cid = r["concept"]["id"]
    real_fit = training._fit

    def fit_then_new_version(*args: Any) -> Any:
        fitted = real_fit(*args)
        # While v1 was training, the user added photos.
        client.post(f"/concepts/{cid}/examples", files=photos(2, 30), headers=user.headers)
        return fitted

    monkeypatch.setattr(training, "_fit", fit_then_new_version)
    run_now(client, r["job"]["id"])
    got = get(client, user, cid)
    assert (got["state"], got["version"], got["metrics"]) == ("training", 2, None)
    with client.app.state.container.session_factory() as s:
        assert s.scalars(select(Adapter.version)).all() == [1]


@pytest.mark.usefixtures("manual_jobs")
def test_failure_marks_the_concept_failed(client, user):
    r = create(client, user).json()
    with client.app.state.container.session_factory() as s:
        path = s.scalars(select(ConceptExample.storage_path)).first()
    (client.app.state.container.settings.data_dir / path).unlink()
    run_now(client, r["job"]["id"])
    job = client.get(f"/jobs/{r['job']['id']}", headers=user.headers).json()
    assert job["state"] == "failed" and job["error"]["code"] == "file_missing"
    got = get(client, user, r["concept"]["id"])
    assert got["state"] == "failed" and got["metrics"]["error"]["code"] == "file_missing"
    assert count(client, Adapter) == 0


@pytest.mark.usefixtures("manual_jobs")
def test_failure_of_an_old_version_leaves_the_new_one_alone(client, user, monkeypatch):
    r = create(client, user).json()
    cid = r["concept"]["id"]
    client.patch(f"/concepts/{cid}", json={"category": "cat"}, headers=user.headers)

    def broken(*_args: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(training, "_read_plan", broken)
    run_now(client, r["job"]["id"])
    assert get(client, user, cid)["state"] == "training"  # v2 is still to come


@pytest.mark.usefixtures("manual_jobs")
def test_deleted_concept_fails_its_job_cleanly(client, user):
    r = create(client, user).json()
    client.delete(f"/concepts/{r['concept']['id']}", headers=user.headers)
    run_now(client, r["job"]["id"])
    job = client.get(f"/jobs/{r['job']['id']}", headers=user.headers).json()
    assert job["state"] == "failed" and job["error"]["code"] == "concept_deleted"


@pytest.mark.usefixtures("manual_jobs")
def test_cached_embeddings_are_recomputed_when_the_model_changed(client, user, tiny_bundle):
    r = create(client, user, files=photos(3)).json()
    with client.app.state.container.session_factory() as s:
        s.execute(
            update(ConceptExample).values(
                embedding=np.ones(24, np.float32).tobytes(), embedding_model="old/model@1"
            )
        )
        s.commit()
    run_now(client, r["job"]["id"])
    expected = encode_images(
        tiny_bundle, [Image.open(io.BytesIO(photo(i))).convert("RGB") for i in range(3)]
    )
    with client.app.state.container.session_factory() as s:
        rows = s.scalars(select(ConceptExample).order_by(ConceptExample.created_at)).all()
        got = {r.sha256: np.frombuffer(r.embedding, np.float32) for r in rows}
        assert {r.embedding_model for r in rows} == {tiny_bundle.fingerprint.model_id}
    for vec in got.values():
        assert np.abs(expected - vec).max(axis=1).min() < 1e-5  # one photo's fresh embedding


def test_paper_objective_uses_the_models_calibrated_lambda(tiny_settings, make_user):
    tiny_settings.training.keep_weight = 0.0
    with TestClient(tiny_app(tiny_settings)) as c:
        u = make_user(c)
        r = create(c, u, files=photos(5))
        assert wait_job(c, u, r.json()["job"]["id"])["state"] == "succeeded"
        m = get(c, u, r.json()["concept"]["id"])["metrics"]
    assert m["keep_weight"] == 0.0 and m["lam"] == pytest.approx(0.1)  # the tiny model's default


def test_distinct_token_mode_gives_each_concept_its_own_token(tiny_settings):
    tiny_settings.training.token_mode = "distinct"
    with TestClient(tiny_app(tiny_settings)) as c:
        u = create_api_user(c)
        a = trained(c, u, name="Fido")
        b = trained(c, u, name="Rex", files=photos(3, 10))
        assert "sks" not in (a["token"], b["token"]) and a["token"] != b["token"]
        assert a["placeholder"] == f"{a['token']} dog"
        # A new version keeps the concept's token.
        r = c.patch(f"/concepts/{a['id']}", json={"category": "hound"}, headers=u.headers)
        assert wait_job(c, u, r.json()["job"]["id"])["state"] == "succeeded"
        assert get(c, u, a["id"])["token"] == a["token"]


# -- the real demo model -----------------------------------------------------------------------


@pytest.mark.slow
def test_demo_model_learns_a_world_instance(db_settings: Settings):
    """Five photos of one synthetic-world instance → ready, with the caption-set retention."""
    from app.demo.world import World

    checkpoint = demo_checkpoint_path()
    assert checkpoint.is_file(), f"the demo checkpoint is missing: {checkpoint}"
    db_settings.model = ModelSettings(name="polar-demo", pretrained=str(checkpoint), device="cpu")
    world = World(0)
    fido = world.instance(0, "ball")
    files = []
    for i, scene in enumerate(["beach", "snow", "grass", "kitchen", "forest"]):
        buf = io.BytesIO()
        world.render(scene, [fido], world.rng("instances", 1000 + i)).save(buf, "PNG")
        files.append(("files", (f"fido{i}.png", buf.getvalue(), "image/png")))
    with TestClient(create_app(db_settings)) as c:
        u = create_api_user(c)
        r = c.post(
            "/concepts", data={"name": "Fido", "category": "ball"}, files=files, headers=u.headers
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["job"]["id"]
        assert wait_job(c, u, job_id, timeout=300)["state"] == "succeeded"
        got = get(c, u, r.json()["concept"]["id"])
        assert got["state"] == "ready" and got["metrics"]["n_photos"] == 5
        assert got["metrics"]["retention_method"] == "caption_r@10"
        assert got["retention_score"] is not None and got["retention_score"] > 0.5
        assert got["metrics"]["final_loss"] > 0
        training.train_concept(context(c, job_id))  # delivered twice
        assert count(c, Adapter) == 1


# -- photos: listed, served, and taken from the library -----------------------------------------


def library(client: TestClient, user: ApiUser, n: int, start: int = 100) -> list[str]:
    """Upload n library images; their ids."""
    r = client.post("/images", files=photos(n, start), headers=user.headers)
    assert r.status_code == 202, r.text
    return [i["id"] for i in r.json()["images"]]


def test_photos_are_listed_with_thumbnails_and_files(client, user):
    c = trained(client, user, files=photos(3))
    r = client.get(f"/concepts/{c['id']}/examples", headers=user.headers)
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert len(items) == 3 and {i["version_added"] for i in items} == {1}
    first = items[0]
    assert first["thumbnail_url"] == f"/concepts/{c['id']}/examples/{first['id']}/thumbnail"
    thumb = client.get(first["thumbnail_url"], headers=user.headers)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(thumb.content)).size == (40, 36)
    original = client.get(first["file_url"], headers=user.headers)
    assert original.status_code == 200 and original.headers["content-type"] == "image/png"
    assert {photo(i) for i in range(3)} >= {original.content}


def test_foreign_and_unknown_photo_ids_are_the_same_404(client, user):
    bob = create_api_user(client, "bob")
    theirs = trained(client, bob, name="Rex", files=photos(3))
    mine = trained(client, user, files=photos(3, 10))
    their_photo = client.get(f"/concepts/{theirs['id']}/examples", headers=bob.headers).json()
    my_photo = client.get(f"/concepts/{mine['id']}/examples", headers=user.headers).json()
    tid, mid = their_photo["items"][0]["id"], my_photo["items"][0]["id"]
    unknown = "00000000-0000-4000-8000-000000000000"
    concept_404 = [
        f"/concepts/{theirs['id']}/examples",
        f"/concepts/{unknown}/examples",
    ]
    for path in concept_404:
        err = assert_error(client.get(path, headers=user.headers), 404, "not_found")
        assert err == {"code": "not_found", "message": "concept not found"}
    photo_404 = [
        f"/concepts/{theirs['id']}/examples/{tid}/thumbnail",
        f"/concepts/{mine['id']}/examples/{tid}/thumbnail",  # their photo under my concept
        f"/concepts/{mine['id']}/examples/{unknown}/file",
        f"/concepts/{theirs['id']}/examples/{mid}/file",
    ]
    answers = [client.get(p, headers=user.headers) for p in photo_404]
    assert len({(a.status_code, a.content) for a in answers}) == 1, [a.text for a in answers]
    assert_error(answers[0], 404, "not_found")


def test_a_concept_from_library_images_shares_their_files(client, user):
    ids = library(client, user, 3)
    files_before = stored_files(client)
    r = client.post(
        "/concepts",
        data={"name": "Fido", "category": "dog", "image_ids": ids},
        headers=user.headers,
    )
    assert r.status_code == 202, r.text
    assert r.json()["concept"]["example_count"] == 3
    assert wait_job(client, user, r.json()["job"]["id"])["state"] == "succeeded"
    assert stored_files(client) == files_before  # nothing copied
    cid = r.json()["concept"]["id"]
    assert get(client, user, cid)["state"] == "ready"
    with client.app.state.container.session_factory() as s:
        paths = {e.storage_path for e in s.scalars(select(ConceptExample))}
        assert paths == set(s.scalars(select(ImageRow.storage_path)))
    # Deleting the library images keeps the concept's photos (and the other way round).
    for image_id in ids:
        assert client.delete(f"/images/{image_id}", headers=user.headers).status_code == 204
    assert stored_files(client) == files_before
    assert client.delete(f"/concepts/{cid}", headers=user.headers).status_code == 204
    assert stored_files(client) == []


def test_uploads_and_library_images_mix_and_count_once(client, user):
    ids = library(client, user, 2)
    # p100 again as an upload: the same content as ids[0], so three distinct photos in all.
    files = [("files", ("again.png", photo(100), "image/png")), *photos(1, 7)]
    r = client.post(
        "/concepts",
        data={"name": "Fido", "image_ids": ids},
        files=files,
        headers=user.headers,
    )
    assert r.status_code == 202, r.text
    assert r.json()["concept"]["example_count"] == 3


@pytest.mark.usefixtures("manual_jobs")
def test_repeats_do_not_count_against_the_maximum(client, user):
    """The maximum is of distinct photos, like the minimum: 16 ids naming 3 images, or the same
    upload 14 times, were refused as too many."""
    ids = library(client, user, 4)
    r = client.post(
        "/concepts", data={"name": "Fido", "image_ids": ids[:3] * 5 + ids[:1]}, headers=user.headers
    )
    assert r.status_code == 202, r.text
    assert r.json()["concept"]["example_count"] == 3
    cid = r.json()["concept"]["id"]
    r = client.post(
        f"/concepts/{cid}/examples", data={"image_ids": [ids[3]] * 14}, headers=user.headers
    )
    assert r.status_code == 202, r.text
    assert r.json()["concept"]["example_count"] == 4
    same = [("files", (f"s{i}.png", photo(200), "image/png")) for i in range(14)]
    r = client.post(
        "/concepts", data={"name": "Rex"}, files=same + photos(2, 300), headers=user.headers
    )
    assert r.status_code == 202, r.text
    assert r.json()["concept"]["example_count"] == 3


@pytest.mark.usefixtures("manual_jobs")
def test_this_is_fido_adds_library_images_as_a_new_version(client, user):
    c = create(client, user, files=photos(3)).json()["concept"]
    ids = library(client, user, 2)
    r = client.post(f"/concepts/{c['id']}/examples", data={"image_ids": ids}, headers=user.headers)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["concept"]["version"] == 2 and body["concept"]["example_count"] == 5
    listed = client.get(f"/concepts/{c['id']}/examples", headers=user.headers).json()["items"]
    assert [i["version_added"] for i in listed] == [1, 1, 1, 2, 2]
    # The same library images again: nothing new.
    again = client.post(
        f"/concepts/{c['id']}/examples", data={"image_ids": ids}, headers=user.headers
    )
    assert_error(again, 422, "no_new_photos")


@pytest.mark.usefixtures("manual_jobs")
def test_unknown_or_foreign_library_images_are_404_and_change_nothing(client, user):
    bob = create_api_user(client, "bob")
    theirs = library(client, bob, 1, start=200)
    mine = library(client, user, 3)
    c = create(client, user, files=photos(3)).json()["concept"]
    unknown = "00000000-0000-4000-8000-000000000000"
    answers = []
    for bad in (theirs[0], unknown):
        r = client.post(
            "/concepts",
            data={"name": "Rex", "image_ids": [*mine[:2], bad]},
            headers=user.headers,
        )
        answers.append(assert_error(r, 404, "not_found"))
        r = client.post(
            f"/concepts/{c['id']}/examples", data={"image_ids": [bad]}, headers=user.headers
        )
        answers.append(assert_error(r, 404, "not_found"))
    # Each answer names the id the caller sent, and nothing else differs.
    assert answers[0]["detail"] == {"image_ids": [theirs[0]]}
    assert answers[2]["detail"] == {"image_ids": [unknown]}
    assert {a["message"].split(": ")[0] for a in answers} == {"image not found"}
    assert count(client, Concept) == 1
    assert get(client, user, c["id"])["version"] == 1


def test_library_photo_counts_are_checked_like_uploads(client, user):
    ids = library(client, user, 2)
    r = client.post("/concepts", data={"name": "Fido", "image_ids": ids}, headers=user.headers)
    assert "got 2" in assert_error(r, 422, "too_few_photos")["message"]
    too_long = "x" * 65
    r = client.post(
        "/concepts", data={"name": "Fido", "image_ids": [*ids, too_long]}, headers=user.headers
    )
    assert_error(r, 422, "validation_failed")
    assert count(client, Concept) == 0


# -- how well a concept stands out from the library ----------------------------------------------


def test_a_trained_concept_says_how_it_stands_out_from_the_library(client, user):
    alone = trained(client, user, name="Solo")
    assert alone["metrics"]["separation"] == {"checked": 0, "lookalikes": 0, "margin": None}

    library = [("files", (f"l{i}.png", photo(100 + i), "image/png")) for i in range(6)]
    library.append(("files", ("same.png", photo(1), "image/png")))  # one of Fido's own photos
    r = client.post("/images", files=library, headers=user.headers)
    assert r.status_code == 202
    assert wait_job(client, user, r.json()["job"]["id"])["state"] == "succeeded"
    fido = trained(client, user, name="Fido", files=photos(4))
    sep = fido["metrics"]["separation"]
    assert sep["checked"] == 6  # its own photo in the library is no rival
    assert 0 <= sep["lookalikes"] <= 6 and isinstance(sep["margin"], float)
    # The words say the same as the numbers, never the numbers' names.
    from app.cli.main import _separation_words

    words = _separation_words(sep["checked"], sep["lookalikes"])
    assert ("above all" in words) == (sep["lookalikes"] == 0) and "margin" not in words
    assert _separation_words(0, 0) == "no other library photos to compare it with yet"
    # Photos that rank as high may be more photos of it: the words never say "none looks like
    # it" (read backwards with ten untaught photos of Fido in the library) nor call them rivals.
    none = _separation_words(31, 0)
    assert "looks like it" not in none and "stands out" not in none
    assert none.startswith("its searches rank the photos it was taught from above all 31 other")
    assert "other photos of it included" in none
    some = _separation_words(31, 4)
    assert some.startswith("4 of the 31 other library photos checked rank as high as the photos")
    assert "photos of it, or look-alikes" in some and "look like it" not in some
    assert _separation_words(31, 1).startswith("1 of the 31 other library photos checked ranks")


def test_the_general_quality_line_reads_the_right_way_round():
    from types import SimpleNamespace

    from app.cli.main import _quality_words

    concept = SimpleNamespace(
        state="ready", metrics={}, example_count=5, retention_score=0.97, retention_flagged=False
    )
    line = _quality_words(concept)[-1]  # type: ignore[arg-type]
    assert "unaffected" not in line, line  # "unaffected (kept: 97%)" contradicted itself
    assert line == (
        "searches that name it keep 97% of general search quality; searches that do not name it "
        "are unchanged"
    )
