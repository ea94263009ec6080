"""POST /embed/text: the vector search ranks with, concepts applied, for other applications."""

from __future__ import annotations

import numpy as np
import pytest

from app.models import Image
from tests.api.test_search import _add_concept, library  # noqa: F401
from tests.model_fixtures import tiny_serving  # noqa: F401


def test_embedding_is_the_vector_search_ranks_with(api_client, library, tiny_serving):  # noqa: F811
    user, _ = library
    cid = _add_concept(api_client, user.id, tiny_serving, "Fido", "hat")
    r = api_client.post("/embed/text", json={"q": "Fido at the beach"}, headers=user.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["personalized"] is True and body["rewritten"] != "Fido at the beach"
    assert body["model"] == tiny_serving.fingerprint.model_id
    assert body["dim"] == tiny_serving.embed_dim == len(body["embedding"])
    assert body["concepts"][0]["id"] == cid and body["concepts"][0]["applied"] is True
    q = np.asarray(body["embedding"], np.float32)
    assert np.linalg.norm(q) == pytest.approx(1.0, abs=1e-5)
    # Search's scores are exactly the cosines with this vector (before any crop re-ranking).
    api_client.app.state.container.settings.search.concept_region_weight = 0.0
    hits = api_client.get(
        "/search", params={"q": "Fido at the beach", "k": 6}, headers=user.headers
    ).json()
    assert hits["rewritten"] == body["rewritten"]
    with api_client.app.state.container.session_factory() as s:
        emb = {i.id: np.frombuffer(i.embedding, np.float32) for i in s.query(Image).all()}
    for h in hits["hits"]:
        assert h["score"] == pytest.approx(float(emb[h["image"]["id"]] @ q), abs=1e-5)
    plain = api_client.post(
        "/embed/text", json={"q": "Fido at the beach", "personalize": False}, headers=user.headers
    ).json()
    assert plain["personalized"] is False and plain["concepts"] == []
    assert not np.allclose(plain["embedding"], body["embedding"])


def test_other_users_concepts_never_apply(api_client, library, make_user, tiny_serving):  # noqa: F811
    user, _ = library
    other = make_user(api_client)
    foreign = _add_concept(api_client, other.id, tiny_serving, "Rex", "dog")
    r = api_client.post("/embed/text", json={"q": "Rex"}, headers=user.headers)
    assert r.status_code == 200 and r.json()["personalized"] is False
    r = api_client.post(
        "/embed/text", json={"q": "x", "concept_ids": [foreign]}, headers=user.headers
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


@pytest.mark.usefixtures("library")
@pytest.mark.parametrize(
    ("body", "code"),
    [({"q": "   "}, "empty_query"), ({"q": "x " * 80}, "query_too_long"), ({}, None)],
)
def test_bad_queries_get_422(api_client, library, body, code):  # noqa: F811
    user, _ = library
    r = api_client.post("/embed/text", json=body, headers=user.headers)
    assert r.status_code == 422, r.text
    if code:
        assert r.json()["error"]["code"] == code


def test_needs_a_key(api_client):
    assert api_client.post("/embed/text", json={"q": "x"}).status_code == 401
