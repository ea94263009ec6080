"""Region embeddings at index time, /index status and rebuild, and multi-concept re-ranking."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import select, update

from app.config import SearchSettings
from app.ml.encode import encode_images
from app.ml.region_pool import encode_with_regions
from app.ml.regions import (
    LAYOUTS,
    embed_with_regions,
    encode_regions,
    region_match,
    region_method,
    split_regions,
    unpack_regions,
)
from app.models import Adapter, Concept, ConceptExample, Image, Job, JobState
from app.services.embedding import decode_side
from app.services.recipe import region_weights
from app.services.search import encode_query_parts
from tests.api.test_search import (
    _add_concept,
    library,  # noqa: F401
    upload,
    wait_jobs,
)
from tests.db_fixtures import noisy_jpeg
from tests.model_fixtures import tiny_serving  # noqa: F401

FIVE = len(LAYOUTS["five"])


def _decoded(seed: int, bundle: Any, *, crops: bool) -> PILImage.Image:
    """The uploaded picture `seed` as the embedding job decodes it for a pass: a JPEG draft at
    the whole pass's side (the model's input) or the crops' (twice it)."""
    im = PILImage.open(io.BytesIO(noisy_jpeg(seed=seed)))
    side = decode_side(bundle, crops=crops)
    im.draft("RGB", (side, side))
    return im.convert("RGB")


def _rows(client: Any) -> dict[str, Image]:
    with client.app.state.container.session_factory() as s:
        rows = s.scalars(select(Image)).all()
        for r in rows:
            _ = r.region_embeddings  # deferred column: load it before the session closes
        return {r.id: r for r in rows}


def test_embedding_stores_the_crops_and_pooled_regions_of_each_image(
    api_client,
    library,  # noqa: F811
    tiny_serving,  # noqa: F811
):
    """The default region method, both: the crops, then the regions pooled from one pass."""
    _, ids = library
    rows = _rows(api_client)
    assert sorted(rows) == sorted(ids)
    d = tiny_serving.embed_dim
    for seed, image_id in enumerate(ids):
        row = rows[image_id]
        assert row.region_layout == "five-both"
        regions = unpack_regions(row.region_embeddings, d)
        assert regions.shape == (2 * FIVE, d)
        # The stored crops are the layout's crops of the uploaded picture (float16 storage),
        # the pooled regions those of the picture's one pass.
        picture = _decoded(seed, tiny_serving, crops=False)
        expected = encode_regions(tiny_serving, [_decoded(seed, tiny_serving, crops=True)], "five")[
            0
        ]
        np.testing.assert_allclose(regions[:FIVE], expected, atol=2e-3)
        pooled = encode_with_regions(tiny_serving, [picture], LAYOUTS["five"])[1][0]
        np.testing.assert_allclose(regions[FIVE:], pooled, atol=2e-3)
        assert np.abs(regions[:FIVE] - regions[FIVE:]).max() > 0.05  # two different kinds
        whole = np.frombuffer(row.embedding, np.float32)
        np.testing.assert_allclose(whole, encode_images(tiny_serving, [picture])[0], atol=1e-5)


def test_auto_stores_the_method_of_the_towers_family(api_client, make_user, tiny_serving):  # noqa: F811
    """POLAR_SEARCH__REGION_METHOD=auto (the default): a ViT stores five late regions with its
    whole embedding (the demo model, a ModifiedResNet, both kinds: tests/unit/ml)."""
    cfg = api_client.app.state.container.settings.search
    cfg.region_method = "auto"
    assert SearchSettings().region_method == "auto"
    user = make_user(api_client)
    ids = upload(api_client, user, range(2))
    wait_jobs(api_client)
    rows = _rows(api_client)
    assert {rows[i].region_layout for i in ids} == {"five-late"}
    for i in ids:
        assert unpack_regions(rows[i].region_embeddings, tiny_serving.embed_dim).shape[0] == FIVE
    status = api_client.get("/index", headers=user.headers).json()
    assert status["region_layout"] == "five-late" and status["with_regions"] == 2


@pytest.mark.usefixtures("tiny_serving")
def test_regions_off_stores_none_and_index_says_so(api_client, make_user):
    api_client.app.state.container.settings.search.regions = "none"
    user = make_user(api_client)
    upload(api_client, user, range(3))
    wait_jobs(api_client)
    rows = _rows(api_client)
    assert all(r.region_embeddings is None and r.region_layout is None for r in rows.values())
    assert all(r.embedding is not None for r in rows.values())
    body = api_client.get("/index", headers=user.headers).json()
    assert body["region_layout"] == "none"
    assert (body["images"], body["embedded"], body["pending"], body["with_regions"]) == (3, 3, 0, 0)


def test_rebuild_fills_missing_regions_and_is_idempotent_while_open(api_client, library):  # noqa: F811
    user, ids = library
    before = {i: r.region_embeddings for i, r in _rows(api_client).items()}
    with api_client.app.state.container.session_factory() as s:
        s.execute(update(Image).values(region_embeddings=None, region_layout=None))
        s.commit()
    status = api_client.get("/index", headers=user.headers).json()
    assert status["model"] and status["region_layout"] == "five-both"
    assert (status["images"], status["embedded"], status["with_regions"]) == (6, 6, 0)
    assert status["rebuild_job"] is None
    r = api_client.post("/index/rebuild", headers=user.headers)
    assert r.status_code == 202, r.text
    assert r.json()["created"] is True and r.json()["job"]["kind"] == "rebuild_index"
    wait_jobs(api_client)
    after = api_client.get("/index", headers=user.headers).json()
    assert after["with_regions"] == 6 and after["pending"] == 0
    rows = _rows(api_client)
    for i in ids:  # the same picture gives the same crops again
        np.testing.assert_array_equal(
            np.frombuffer(rows[i].region_embeddings, np.float16),
            np.frombuffer(before[i], np.float16),
        )
    # An open rebuild is returned, not duplicated.
    with api_client.app.state.container.session_factory() as s:
        job = Job(user_id=user.id, kind="rebuild_index", state=JobState.QUEUED.value, payload={})
        s.add(job)
        s.commit()
        open_id = job.id
    again = api_client.post("/index/rebuild", headers=user.headers)
    assert again.status_code == 200
    assert again.json() == {**again.json(), "created": False}
    assert again.json()["job"]["id"] == open_id
    assert api_client.get("/index", headers=user.headers).json()["rebuild_job"]["id"] == open_id


@pytest.mark.usefixtures("library")
def test_index_is_per_user_and_needs_a_key(api_client, make_user):
    other = make_user(api_client, "bob")
    body = api_client.get("/index", headers=other.headers).json()
    assert (body["images"], body["embedded"], body["with_regions"]) == (0, 0, 0)
    assert api_client.get("/index").status_code == 401
    assert api_client.post("/index/rebuild").status_code == 401


def _two_concepts(client: Any, user: Any, bundle: Any) -> None:
    a = _add_concept(client, user.id, bundle, "Fido", "hat")
    b = _add_concept(client, user.id, bundle, "Rex", "ball")
    # distinct tokens, as the service trains them
    with client.app.state.container.session_factory() as s:
        s.execute(update(Concept).where(Concept.id == b).values(token="tok"))
        s.commit()
    assert a != b


def _expected(client: Any, bundle: Any, rewritten: str, cfg: SearchSettings) -> dict[str, float]:
    """The re-ranking score of every image, computed from the stored rows."""
    with client.app.state.container.session_factory() as s:
        adapters = [
            client.app.state.container.adapter_cache.get(a)
            for a in s.scalars(select(Adapter).join(Concept).order_by(Concept.name))
        ]
        assert not s.scalars(select(ConceptExample)).all()  # no photos: parts are text only
    rows = _rows(client)
    serving = client.app.state.container.model.get()
    enc = encode_query_parts(serving, rewritten, adapters, [None] * len(adapters), cfg)
    assert enc.parts is not None and enc.parts.shape == (2, bundle.embed_dim)
    ids = list(rows)
    whole = np.stack([np.frombuffer(rows[i].embedding, np.float32) for i in ids])
    stored = [
        split_regions(unpack_regions(rows[i].region_embeddings, bundle.embed_dim),
                      rows[i].region_layout)
        for i in ids
    ]  # fmt: skip
    base = whole @ enc.vector[0]
    if cfg.regions == "none":
        return dict(zip(ids, base.tolist(), strict=True))
    # Each kind the method stores, at its own weight; an image without it matched whole.
    kinds = {
        "crops": cfg.region_weight,
        "pooled": cfg.pooled_region_weight,
        "late": cfg.late_region_weight,
    }
    method = region_method(bundle, cfg.region_method)
    kinds = {k: w for k, w in kinds.items() if k == method or (method == "both" and k != "late")}
    empty = np.zeros((0, bundle.embed_dim), np.float32)

    def rows(r: dict[str, np.ndarray], kind: str) -> np.ndarray:
        # A kind the image lacks: the kind it has stands in; no regions: the whole image.
        return r.get(kind, r.get("crops", r.get("pooled", r.get("late", empty))))

    scores = base.copy()
    for kind, weight in kinds.items():
        scores += weight * region_match(enc.parts, whole, [rows(r, kind) for r in stored])
    return dict(zip(ids, scores.tolist(), strict=True))


@pytest.mark.parametrize("regions", ["five", "none"])
def test_two_concept_queries_are_reranked_by_crops(api_client, library, tiny_serving, regions):  # noqa: F811
    user, _ = library
    _two_concepts(api_client, user, tiny_serving)
    cfg = api_client.app.state.container.settings.search
    cfg.regions = regions
    body = api_client.get(
        "/search", params={"q": "Fido and Rex on the beach", "k": 6}, headers=user.headers
    ).json()
    assert [c["applied"] for c in body["concepts"]] == [True, True]
    assert body["reranked"] is (regions == "five")
    expected = _expected(api_client, tiny_serving, body["rewritten"], cfg)
    got = {h["image"]["id"]: h["score"] for h in body["hits"]}
    assert got == pytest.approx(expected, abs=2e-4)
    assert [h["score"] for h in body["hits"]] == sorted(got.values(), reverse=True)
    # Pages stay slices of the same re-ranked order.
    page = api_client.get(
        "/search", params={"q": "Fido and Rex on the beach", "k": 2, "offset": 2},
        headers=user.headers,
    ).json()  # fmt: skip
    assert [h["image"]["id"] for h in page["hits"]] == [h["image"]["id"] for h in body["hits"][2:4]]


def test_one_concept_queries_are_reranked_by_crops(api_client, library, tiny_serving):  # noqa: F811
    user, _ = library
    _add_concept(api_client, user.id, tiny_serving, "Fido", "hat")
    params = {"q": "Fido on the beach", "k": 6}
    body = api_client.get("/search", params=params, headers=user.headers).json()
    assert body["reranked"] is True
    search_settings = api_client.app.state.container.settings.search
    search_settings.concept_region_weight = 0.0  # POLAR_SEARCH__CONCEPT_REGION_WEIGHT=0
    body = api_client.get("/search", params=params, headers=user.headers).json()
    rows = _rows(api_client)
    with api_client.app.state.container.session_factory() as s:
        adapter = api_client.app.state.container.adapter_cache.get(s.scalars(select(Adapter)).one())
    serving = api_client.app.state.container.model.get()
    q = encode_query_parts(serving, body["rewritten"], [adapter], [None], search_settings)
    assert region_weights(q, search_settings, "both") == {} and body["reranked"] is False
    for h in body["hits"]:
        whole = np.frombuffer(rows[h["image"]["id"]].embedding, np.float32)
        assert h["score"] == pytest.approx(float(whole @ q.vector[0]), abs=1e-5)


def test_deleted_candidates_drop_out_of_the_reranking(api_client, library, tiny_serving):  # noqa: F811
    user, ids = library
    _two_concepts(api_client, user, tiny_serving)
    assert api_client.delete(f"/images/{ids[0]}", headers=user.headers).status_code == 204
    body = api_client.get(
        "/search", params={"q": "Fido and Rex on the beach", "k": 6}, headers=user.headers
    ).json()
    assert sorted(h["image"]["id"] for h in body["hits"]) == sorted(ids[1:])


@pytest.mark.parametrize("method", ["crops", "both"])
def test_whole_embeddings_land_before_any_crop(api_client, make_user, tiny_serving, method):  # noqa: F811
    """Every image is searchable before the crop pass starts (with both, re-ranked by its
    pooled regions too); progress only moves forward."""
    from app.services.embedding import embed_pending
    from app.services.job_runs import JobContext

    cfg = api_client.app.state.container.settings.search
    cfg.regions, cfg.region_method = "none", method  # upload without regions first
    user = make_user(api_client)
    ids = upload(api_client, user, range(40, 75))  # 35 images: two batches per pass
    wait_jobs(api_client)
    cfg.regions = "five"
    with api_client.app.state.container.session_factory() as s:  # as after a model switch
        s.execute(update(Image).values(embedding_model="old-model"))
        s.commit()
    final = "five" if method == "crops" else "five-both"
    seen: list[tuple[float, int, int, int]] = []

    def progress(fraction: float) -> None:
        with api_client.app.state.container.session_factory() as s:
            rows = s.execute(select(Image.embedding_model, Image.region_layout)).all()
        current = sum(m == tiny_serving.fingerprint.model_id for m, _ in rows)
        pooled = sum(r == "five-pooled" for _, r in rows)
        seen.append((fraction, current, pooled, sum(r == final for _, r in rows)))

    ctx = JobContext("job", user.id, "rebuild_index", {}, api_client.app.state.container.jobs,
                     progress)  # fmt: skip
    assert embed_pending(ctx, None, ctx.serving()) == 35
    fractions = [f for f, *_ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    first_crop = next(n for n, (*_, crops) in enumerate(seen) if crops)
    # all whole embeddings were in before the first crop, with their pooled regions for both
    assert seen[first_crop - 1][1:3] == (35, 0 if method == "crops" else 35)
    # Whole pass: 35 of 35 + 5 x 35 encodes => the whole pass is 1/6 of the work.
    assert seen[first_crop - 1][0] == pytest.approx(1 / 6)
    assert seen[-1][1:] == (35, 0, 35)
    assert sorted(ids) == sorted(_rows(api_client))


def test_a_model_switch_drops_the_old_models_crops(api_client, library, tiny_serving):  # noqa: F811
    user, _ = library
    good = {i: r.region_embeddings for i, r in _rows(api_client).items()}
    junk = np.zeros((FIVE, tiny_serving.embed_dim), np.float16).tobytes()
    with api_client.app.state.container.session_factory() as s:
        s.execute(update(Image).values(embedding_model="old-model", region_embeddings=junk))
        s.commit()
    assert api_client.get("/index", headers=user.headers).json()["with_regions"] == 0
    assert api_client.post("/index/rebuild", headers=user.headers).status_code == 202
    wait_jobs(api_client)
    rows = _rows(api_client)
    assert {i: r.region_embeddings for i, r in rows.items()} == good
    assert {r.embedding_model for r in rows.values()} == {tiny_serving.fingerprint.model_id}


def test_large_jpegs_are_decoded_at_a_reduced_scale(tmp_path):
    from app.services.embedding import _open_rgb, decode_side
    from app.storage import ImageStore
    from tests.model_fixtures import tiny_clip

    exif = PILImage.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    buf = io.BytesIO()
    PILImage.new("RGB", (2400, 1600), (200, 30, 30)).save(buf, "JPEG", exif=exif.tobytes())
    store = ImageStore(tmp_path)
    path = tmp_path / "big.jpg"
    path.write_bytes(buf.getvalue())
    full = _open_rgb(store, "big.jpg")
    small = _open_rgb(store, "big.jpg", 448)
    assert full is not None and small is not None
    assert full.size == (1600, 2400)  # EXIF orientation applied
    assert small.size == (800, 1200)  # 1/2: the smallest JPEG scale keeping both sides >= 448
    assert np.asarray(small)[400, 400].tolist() == pytest.approx([200, 30, 30], abs=6)
    assert decode_side(tiny_clip(0)) == 2 * 32  # twice the model's input side


def test_candidates_without_crops_are_matched_whole_and_named_in_a_warning(
    api_client,
    library,  # noqa: F811
    tiny_serving,  # noqa: F811
):
    user, ids = library
    _two_concepts(api_client, user, tiny_serving)
    q = {"q": "Fido and Rex on the beach", "k": 6}
    assert not api_client.get("/search", params=q, headers=user.headers).json()["warnings"]
    with api_client.app.state.container.session_factory() as s:
        s.execute(
            update(Image)
            .where(Image.id.in_(ids[:2]))
            .values(region_embeddings=None, region_layout=None)
        )
        s.commit()
    body = api_client.get("/search", params=q, headers=user.headers).json()
    assert body["reranked"] is True
    assert any(
        w.startswith("2 of the 6 re-ranked images lack region embeddings") for w in body["warnings"]
    )
    expected = _expected(
        api_client, tiny_serving, body["rewritten"], api_client.app.state.container.settings.search
    )
    assert {h["image"]["id"]: h["score"] for h in body["hits"]} == pytest.approx(expected, abs=2e-4)


def test_pooled_regions_come_with_the_whole_embedding(api_client, make_user, tiny_serving):  # noqa: F811
    """POLAR_SEARCH__REGION_METHOD=pooled: one pass per image stores both, keyed five-pooled."""
    api_client.app.state.container.settings.search.region_method = "pooled"
    user = make_user(api_client)
    ids = upload(api_client, user, range(3))
    wait_jobs(api_client)
    rows = _rows(api_client)
    d = tiny_serving.embed_dim
    for seed, image_id in enumerate(ids):
        row = rows[image_id]
        assert row.region_layout == "five-pooled"
        picture = _decoded(seed, tiny_serving, crops=False)
        whole, regions = encode_with_regions(tiny_serving, [picture], LAYOUTS["five"])
        np.testing.assert_allclose(unpack_regions(row.region_embeddings, d), regions[0], atol=2e-3)
        np.testing.assert_allclose(np.frombuffer(row.embedding, np.float32), whole[0], atol=1e-5)
        # the whole embedding is the one the crops method stores too
        np.testing.assert_allclose(whole, encode_images(tiny_serving, [picture]), atol=1e-5)
    body = api_client.get("/index", headers=user.headers).json()
    assert (body["region_layout"], body["with_regions"]) == ("five-pooled", 3)


def test_late_regions_come_with_the_whole_embedding(api_client, make_user, tiny_serving):  # noqa: F811
    """POLAR_SEARCH__REGION_METHOD=late: one pass per image (plus the last block re-run per
    box) stores the whole embedding and five late regions, keyed five-late, from the whole
    pass's picture; a two-concept query is re-ranked by them; another method makes them stale."""
    cfg = api_client.app.state.container.settings.search
    cfg.region_method = "late"
    user = make_user(api_client)
    ids = upload(api_client, user, range(3))
    wait_jobs(api_client)
    rows = _rows(api_client)
    d = tiny_serving.embed_dim
    for seed, image_id in enumerate(ids):
        row = rows[image_id]
        assert row.region_layout == "five-late"
        picture = _decoded(seed, tiny_serving, crops=False)
        whole, regions = embed_with_regions(tiny_serving, [picture], "five", "late")
        np.testing.assert_allclose(unpack_regions(row.region_embeddings, d), regions[0], atol=2e-3)
        np.testing.assert_allclose(np.frombuffer(row.embedding, np.float32), whole[0], atol=1e-5)
        np.testing.assert_allclose(whole, encode_images(tiny_serving, [picture]), atol=1e-5)
    body = api_client.get("/index", headers=user.headers).json()
    assert (body["region_layout"], body["with_regions"]) == ("five-late", 3)
    _two_concepts(api_client, user, tiny_serving)
    body = api_client.get(
        "/search", params={"q": "Fido and Rex on the beach", "k": 3}, headers=user.headers
    ).json()
    assert body["reranked"] is True and not body["warnings"]
    expected = _expected(api_client, tiny_serving, body["rewritten"], cfg)
    assert {h["image"]["id"]: h["score"] for h in body["hits"]} == pytest.approx(expected, abs=2e-4)
    cfg.region_method = "pooled"  # another method: stale
    status = api_client.get("/index", headers=user.headers).json()
    assert (status["region_layout"], status["with_regions"]) == ("five-pooled", 0)


def test_a_switch_to_late_re_embeds_the_regions_by_a_rebuild(api_client, make_user, tiny_serving):  # noqa: F811
    """crops -> late: the stored crops go stale; a rebuild stores the late regions of the whole
    pass's picture (the region pass, not the first pass, makes them here)."""
    cfg = api_client.app.state.container.settings.search
    cfg.region_method = "crops"
    user = make_user(api_client)
    ids = upload(api_client, user, range(2))
    wait_jobs(api_client)
    cfg.region_method = "late"
    assert api_client.get("/index", headers=user.headers).json()["with_regions"] == 0
    assert api_client.post("/index/rebuild", headers=user.headers).status_code == 202
    wait_jobs(api_client)
    rows = _rows(api_client)
    for seed, image_id in enumerate(ids):
        assert rows[image_id].region_layout == "five-late"
        picture = _decoded(seed, tiny_serving, crops=False)
        late = embed_with_regions(tiny_serving, [picture], "five", "late")[1][0]
        stored = unpack_regions(rows[image_id].region_embeddings, tiny_serving.embed_dim)
        np.testing.assert_allclose(stored, late, atol=2e-3)
    assert api_client.get("/index", headers=user.headers).json()["with_regions"] == 2


def test_a_change_of_region_method_makes_the_regions_stale(api_client, library, tiny_serving):  # noqa: F811
    user, ids = library  # embedded with both kinds
    cfg = api_client.app.state.container.settings.search
    both = {i: r.region_embeddings for i, r in _rows(api_client).items()}
    cfg.region_method = "pooled"
    status = api_client.get("/index", headers=user.headers).json()
    assert status["region_layout"] == "five-pooled"
    assert (status["embedded"], status["pending"], status["with_regions"]) == (6, 0, 0)
    assert api_client.post("/index/rebuild", headers=user.headers).status_code == 202
    wait_jobs(api_client)
    assert api_client.get("/index", headers=user.headers).json()["with_regions"] == 6
    rows = _rows(api_client)
    assert {r.region_layout for r in rows.values()} == {"five-pooled"}
    half = len(both[ids[0]]) // 2  # the pooled rows both stored are kept, not encoded again
    assert all(rows[i].region_embeddings == both[i][half:] for i in ids)
    # Two-concept queries re-rank with the pooled regions.
    _two_concepts(api_client, user, tiny_serving)
    body = api_client.get(
        "/search", params={"q": "Fido and Rex on the beach", "k": 6}, headers=user.headers
    ).json()
    assert body["reranked"] is True and not body["warnings"]
    expected = _expected(api_client, tiny_serving, body["rewritten"], cfg)
    assert {h["image"]["id"]: h["score"] for h in body["hits"]} == pytest.approx(expected, abs=2e-4)
    cfg.region_method = "crops"  # and on: stale again
    status = api_client.get("/index", headers=user.headers).json()
    assert (status["region_layout"], status["with_regions"]) == ("five", 0)


def test_a_switch_to_both_keeps_the_stored_crops(api_client, make_user, tiny_serving):  # noqa: F811
    """crops -> both: a rebuild adds the pooled regions and encodes no crop again."""
    cfg = api_client.app.state.container.settings.search
    cfg.region_method = "crops"
    user = make_user(api_client)
    ids = upload(api_client, user, range(3))
    wait_jobs(api_client)
    d = tiny_serving.embed_dim
    # Mark the stored crops: were they encoded again, the mark would be gone.
    mark = np.zeros((FIVE, d), np.float32)
    mark[:, 0] = 1.0
    with api_client.app.state.container.session_factory() as s:
        s.execute(update(Image).values(region_embeddings=mark.astype(np.float16).tobytes()))
        s.commit()
    cfg.region_method = "both"
    assert api_client.get("/index", headers=user.headers).json()["with_regions"] == 0
    assert api_client.post("/index/rebuild", headers=user.headers).status_code == 202
    wait_jobs(api_client)
    rows = _rows(api_client)
    for seed, image_id in enumerate(ids):
        assert rows[image_id].region_layout == "five-both"
        regions = unpack_regions(rows[image_id].region_embeddings, d)
        np.testing.assert_array_equal(regions[:FIVE], mark)
        picture = _decoded(seed, tiny_serving, crops=False)
        pooled = encode_with_regions(tiny_serving, [picture], LAYOUTS["five"])[1][0]
        np.testing.assert_allclose(regions[FIVE:], pooled, atol=2e-3)
    assert api_client.get("/index", headers=user.headers).json()["with_regions"] == 3


def test_a_switch_from_both_to_crops_repacks_without_decoding(
    api_client,
    make_user,
    tiny_serving,  # noqa: F811
    monkeypatch,
):
    """both -> crops: every crop is stored already, so the rebuild re-packs the rows and reads
    no image file (a decode per photo would be wasted)."""
    from app.services import embedding

    cfg = api_client.app.state.container.settings.search
    cfg.region_method = "both"
    user = make_user(api_client)
    ids = upload(api_client, user, range(3))
    wait_jobs(api_client)
    before = {i: r.region_embeddings for i, r in _rows(api_client).items()}
    opened: list[object] = []
    monkeypatch.setattr(embedding, "_open_rgb", lambda *a, **_: opened.append(a))
    cfg.region_method = "crops"
    assert api_client.get("/index", headers=user.headers).json()["with_regions"] == 0
    assert api_client.post("/index/rebuild", headers=user.headers).status_code == 202
    wait_jobs(api_client)
    assert opened == []
    rows = _rows(api_client)
    d = tiny_serving.embed_dim
    for image_id in ids:
        assert rows[image_id].region_layout == "five"
        np.testing.assert_array_equal(
            unpack_regions(rows[image_id].region_embeddings, d),
            unpack_regions(before[image_id], d)[:FIVE],
        )
    assert api_client.get("/index", headers=user.headers).json()["with_regions"] == 3


def test_candidates_with_one_kind_of_regions_are_matched_on_it_for_both(
    api_client,
    library,  # noqa: F811
    tiny_serving,  # noqa: F811
):
    """Method both, two images still holding crops only (embedded before the switch): their
    crops stand in for the pooled regions they lack, and a warning counts them."""
    user, ids = library
    _two_concepts(api_client, user, tiny_serving)
    rows = _rows(api_client)
    with api_client.app.state.container.session_factory() as s:
        for i in ids[:2]:
            crops_only = rows[i].region_embeddings[: len(rows[i].region_embeddings) // 2]
            s.execute(
                update(Image)
                .where(Image.id == i)
                .values(region_embeddings=crops_only, region_layout="five")
            )
        s.commit()
    body = api_client.get(
        "/search", params={"q": "Fido and Rex on the beach", "k": 6}, headers=user.headers
    ).json()
    assert any(w.startswith("2 of the 6 re-ranked") for w in body["warnings"])
    cfg = api_client.app.state.container.settings.search
    expected = _expected(api_client, tiny_serving, body["rewritten"], cfg)
    assert {h["image"]["id"]: h["score"] for h in body["hits"]} == pytest.approx(expected, abs=2e-4)
