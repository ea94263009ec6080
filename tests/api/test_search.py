"""/search through HTTP, on SQLite and PostgreSQL, with a tiny random CLIP serving."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import torch

from app.ml.train import train_adapter
from app.models import Adapter, Concept, Image, Job, JobState
from tests.db_fixtures import noisy_jpeg
from tests.model_fixtures import tiny_serving  # noqa: F401


def wait_jobs(client: Any, timeout: float = 60.0) -> None:
    """Until no job is queued or running (the embedded runner works in the background)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with client.app.state.container.session_factory() as s:
            states = [j.state for j in s.query(Job).all()]
        if all(st in (JobState.SUCCEEDED, JobState.FAILED) for st in states):
            assert JobState.FAILED not in states, "a job failed"
            return
        time.sleep(0.05)
    raise AssertionError("jobs did not finish")


def upload(client: Any, user: Any, seeds: range) -> list[str]:
    files = [("files", (f"p{i}.jpg", noisy_jpeg(seed=i), "image/jpeg")) for i in seeds]
    r = client.post("/images", files=files, headers=user.headers)
    assert r.status_code == 202, r.text
    return [i["id"] for i in r.json()["images"]]


@pytest.fixture
def library(api_client, make_user, tiny_serving):  # noqa: F811, ARG001 (installs the model)
    user = make_user(api_client)
    ids = upload(api_client, user, range(6))
    wait_jobs(api_client)
    return user, ids


def test_plain_search_ranks_every_image_by_cosine(api_client, library, tiny_serving):  # noqa: F811
    user, ids = library
    r = api_client.get("/search", params={"q": "a photo of a hat", "k": 10}, headers=user.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["personalized"] is False and body["concepts"] == []
    assert body["rewritten"] == "a photo of a hat"
    assert body["model"] == tiny_serving.fingerprint.model_id
    assert body["indexed"] == 6 and body["pending"] == 0
    hits = body["hits"]
    assert sorted(h["image"]["id"] for h in hits) == sorted(ids)
    assert [h["rank"] for h in hits] == list(range(1, 7))
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    # The scores are the cosine of the stored embeddings with the encoded query.
    from app.ml.encode import encode_texts

    q = encode_texts(tiny_serving, ["a photo of a hat"])[0]
    with api_client.app.state.container.session_factory() as s:
        emb = {i.id: np.frombuffer(i.embedding, np.float32) for i in s.query(Image).all()}
    for h in hits:
        assert h["score"] == pytest.approx(float(emb[h["image"]["id"]] @ q), abs=1e-5)


def test_pages_are_slices_of_one_ranking(api_client, library):
    user, _ = library
    full = api_client.get("/search", params={"q": "snow", "k": 6}, headers=user.headers).json()
    page = api_client.get(
        "/search", params={"q": "snow", "k": 2, "offset": 2}, headers=user.headers
    ).json()
    assert [h["image"]["id"] for h in page["hits"]] == [h["image"]["id"] for h in full["hits"][2:4]]
    assert [h["rank"] for h in page["hits"]] == [3, 4]


@pytest.mark.usefixtures("library")
def test_other_users_see_nothing(api_client, make_user):
    other = make_user(api_client, "mallory")
    r = api_client.get("/search", params={"q": "anything"}, headers=other.headers)
    assert r.status_code == 200
    assert r.json()["hits"] == [] and r.json()["indexed"] == 0


def test_deleted_image_leaves_the_results_at_once(api_client, library):
    user, ids = library
    api_client.get("/search", params={"q": "x"}, headers=user.headers)  # warm the cache
    assert api_client.delete(f"/images/{ids[0]}", headers=user.headers).status_code == 204
    body = api_client.get("/search", params={"q": "x", "k": 10}, headers=user.headers).json()
    assert ids[0] not in [h["image"]["id"] for h in body["hits"]]
    assert body["indexed"] == 5


def test_index_file_is_persisted_and_a_corrupt_one_is_rebuilt(api_client, library):
    user, _ = library
    before = api_client.get("/search", params={"q": "x"}, headers=user.headers).json()
    files = list(api_client.app.state.container.settings.data_dir.glob("index/*/*.faiss"))
    assert len(files) == 1
    files[0].write_bytes(b"garbage")
    cache = api_client.app.state.container.index_cache
    cache._entries.clear()  # as if another process: only the file and the database remain
    after = api_client.get("/search", params={"q": "x"}, headers=user.headers).json()
    assert [h["image"]["id"] for h in after["hits"]] == [h["image"]["id"] for h in before["hits"]]


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"q": ""}, "empty_query"),
        ({"q": "   "}, "empty_query"),
        ({"q": "hat " * 80}, "query_too_long"),
        ({"q": "x" * 2000}, "query_too_long"),
        ({"q": "hat", "k": 0}, None),
        ({"q": "hat", "k": 10_000}, "invalid_k"),
        ({"q": "hat", "offset": -1}, None),
        # Nothing visible: zero-width space, joiner and a bidi mark were searched for.
        ({"q": "\u200b\u200b"}, "empty_query"),
        ({"q": " \u200d \u200e\u2060 "}, "empty_query"),
        # Integers are written in digits: pydantic's lax mode took these.
        ({"q": "hat", "k": "5.0"}, None),
        ({"q": "hat", "k": "1e1"}, None),
        ({"q": "hat", "offset": "1_0"}, None),
        ({"q": "hat", "k": " 5"}, None),
    ],
)
def test_bad_queries_get_422_with_the_error_shape(api_client, library, params, code):
    user, _ = library
    r = api_client.get("/search", params=params, headers=user.headers)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["message"]
    if code:
        assert err["code"] == code


def test_too_long_query_says_the_context_length(api_client, library):
    user, _ = library
    r = api_client.get("/search", params={"q": "hat " * 80}, headers=user.headers)
    assert "77" in r.json()["error"]["message"]


def test_search_needs_a_key(api_client):
    assert api_client.get("/search", params={"q": "x"}).status_code == 401


def _add_concept(client: Any, user_id: str, bundle: Any, name: str, category: str) -> str:
    emb = torch.nn.functional.normalize(torch.randn(5, bundle.embed_dim), dim=-1)
    adapter = train_adapter(bundle, emb, "sks", category, lam=0.01, steps=30)
    with client.app.state.container.session_factory() as s:
        c = Concept(
            user_id=user_id, name=name, name_key=name.casefold(), category=category,
            token="sks", state="ready", version=1,
        )  # fmt: skip
        s.add(c)
        s.flush()
        s.add(Adapter(concept_id=c.id, version=1, weights=adapter.to_bytes(),
                      model_id=bundle.fingerprint.model_id))  # fmt: skip
        s.commit()
        return c.id


def test_concept_names_personalise_the_query(api_client, library, tiny_serving):  # noqa: F811
    user, _ = library
    cid = _add_concept(api_client, user.id, tiny_serving, "Fido", "hat")
    mine = api_client.get(
        "/search", params={"q": "fido's hat on the beach", "k": 6}, headers=user.headers
    ).json()
    assert mine["personalized"] is True
    assert mine["rewritten"] == "sks hat's hat on the beach"
    assert mine["concepts"] == [
        {"id": cid, "name": "Fido", "version": 1, "mentioned": True, "applied": True}
    ]
    plain = api_client.get(
        "/search",
        params={"q": "fido's hat on the beach", "k": 6, "personalize": "false"},
        headers=user.headers,
    ).json()
    assert plain["personalized"] is False and plain["concepts"] == []
    assert plain["rewritten"] == "fido's hat on the beach"
    assert [h["score"] for h in mine["hits"]] != [h["score"] for h in plain["hits"]]
    # Each search is counted by whether a concept was applied (GET and POST alike).
    api_client.post("/search", json={"q": "a hat", "concept_ids": [cid]}, headers=user.headers)
    metrics = api_client.get("/metrics").text
    assert 'polar_searches_total{personalized="true"} 2.0' in metrics
    assert 'polar_searches_total{personalized="false"} 1.0' in metrics


def test_post_applies_explicit_concepts_and_filters(api_client, library, tiny_serving):  # noqa: F811
    user, _ = library
    cid = _add_concept(api_client, user.id, tiny_serving, "Fido", "hat")
    r = api_client.post(
        "/search",
        json={"q": "a hat", "k": 6, "concept_ids": [cid], "filters": {"mime": ["image/png"]}},
        headers=user.headers,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["hits"] == []  # every image is a JPEG
    assert body["concepts"][0]["mentioned"] is False and body["concepts"][0]["applied"] is True
    r = api_client.post(
        "/search", json={"q": "a hat", "filters": {"mime": ["image/jpeg"]}}, headers=user.headers
    )
    assert len(r.json()["hits"]) == 6


def test_post_with_a_foreign_concept_is_404(api_client, library, make_user, tiny_serving):  # noqa: F811
    user, _ = library
    other = make_user(api_client, "bob")
    foreign = _add_concept(api_client, other.id, tiny_serving, "Rex", "dog")
    r = api_client.post("/search", json={"q": "x", "concept_ids": [foreign]}, headers=user.headers)
    missing = api_client.post(
        "/search", json={"q": "x", "concept_ids": ["nope"]}, headers=user.headers
    )
    assert r.status_code == missing.status_code == 404
    assert r.json() == missing.json()


def test_untrained_concept_is_searched_as_text_with_a_warning(api_client, library):
    user, _ = library
    with api_client.app.state.container.session_factory() as s:
        s.add(Concept(user_id=user.id, name="Luna", name_key="luna", token="sks",
                      state="training", version=1))  # fmt: skip
        s.commit()
    body = api_client.get("/search", params={"q": "Luna on snow"}, headers=user.headers).json()
    assert body["rewritten"] == "Luna on snow"
    assert body["personalized"] is False
    assert any("Luna" in w and "training" in w for w in body["warnings"])


def exif_jpeg(seed: int, taken: str, offset: str | None = None) -> bytes:
    """A JPEG whose EXIF says when it was taken ("2019:07:04 10:00:00")."""
    import io

    from PIL import Image as PILImage

    img = PILImage.open(io.BytesIO(noisy_jpeg(seed=seed)))
    exif = PILImage.Exif()
    sub = exif.get_ifd(0x8769)
    sub[0x9003] = taken
    if offset is not None:
        sub[0x9011] = offset
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    return buf.getvalue()


def test_photos_carry_when_they_were_taken_and_search_filters_by_it(
    api_client,
    make_user,
    tiny_serving,  # noqa: F811, ARG001 (installs the model)
):
    user = make_user(api_client)
    files = [
        ("files", ("exif.jpg", exif_jpeg(1, "2019:07:04 10:00:00"), "image/jpeg")),
        ("files", ("exif-tz.jpg", exif_jpeg(2, "2019:07:04 10:00:00", "+02:00"), "image/jpeg")),
        ("files", ("file-time.jpg", noisy_jpeg(seed=3), "image/jpeg")),
    ]
    file_time_ms = 1_500_000_000_000  # 2017-07-14T02:40:00Z
    # EXIF wins over the file time; the file time is used where EXIF says nothing.
    r = api_client.post(
        "/images",
        files=files,
        data={"modified_at": [str(file_time_ms)] * 3},
        headers=user.headers,
    )
    assert r.status_code == 202, r.text
    taken = {i["filename"]: i["taken_at"] for i in r.json()["images"]}
    assert taken == {
        "exif.jpg": "2019-07-04T10:00:00Z",
        "exif-tz.jpg": "2019-07-04T08:00:00Z",
        "file-time.jpg": "2017-07-14T02:40:00Z",
    }
    # Neither EXIF nor a file time: the upload time.
    r = api_client.post(
        "/images",
        files=[("files", ("now.jpg", noisy_jpeg(seed=4), "image/jpeg"))],
        headers=user.headers,
    )
    now = r.json()["images"][0]
    assert now["taken_at"] == now["created_at"]
    wait_jobs(api_client)

    def names(filters: dict[str, Any]) -> set[str]:
        r = api_client.post(
            "/search", json={"q": "a photo", "k": 10, "filters": filters}, headers=user.headers
        )
        assert r.status_code == 200, r.text
        return {h["image"]["filename"] for h in r.json()["hits"]}

    assert names({"taken_before": "2018-01-01"}) == {"file-time.jpg"}
    assert names({"taken_after": "2019-01-01", "taken_before": "2020-01-01"}) == {
        "exif.jpg",
        "exif-tz.jpg",
    }
    assert names({"taken_after": "2019-07-04T09:00:00Z", "taken_before": "2020-01-01"}) == {
        "exif.jpg"
    }
    assert names({"created_before": "2018-01-01"}) == set()  # upload time is another filter


@pytest.mark.parametrize(
    "modified_at", [["1", "2"], ["-5"], ["253402300800000"], ["soon"]], ids=str
)
def test_bad_file_times_are_422_and_store_nothing(api_client, make_user, modified_at):
    user = make_user(api_client)
    r = api_client.post(
        "/images",
        files=[("files", ("a.jpg", noisy_jpeg(seed=1), "image/jpeg"))],
        data={"modified_at": modified_at},
        headers=user.headers,
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "validation_failed"
    with api_client.app.state.container.session_factory() as s:
        assert s.query(Image).count() == 0
