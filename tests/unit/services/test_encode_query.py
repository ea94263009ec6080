"""How the search encodes a query that names concepts: stacking modes and photo fusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from app.config import SearchSettings
from app.ml.encode import encode_texts
from app.ml.train import train_adapter
from app.services.model import ServingModel
from app.services.search import encode_query
from tests.unit.ml.conftest import tiny_clip


@pytest.fixture(scope="module")
def setup():
    bundle = tiny_clip(5)
    g = torch.Generator().manual_seed(1)
    ads = [
        train_adapter(
            bundle,
            F.normalize(torch.randn(4, bundle.embed_dim, generator=g), dim=-1),
            tok,
            "dog",
            lam=0.0,
            steps=30,
            lr=1e-2,
        )
        for tok in ("sks", "httr")
    ]
    return ServingModel(bundle, "tiny", None), ads


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


TEXT = "sks dog and httr dog on the sofa"


def test_no_concepts_is_the_base_encoding(setup):
    serving, _ = setup
    q = encode_query(serving, "a dog", [], [], SearchSettings())
    assert np.array_equal(q, encode_texts(serving.bundle, ["a dog"]))


def test_parameter_stacking_is_the_exact_sum(setup):
    serving, ads = setup
    q = encode_query(
        serving, TEXT, ads, [None, None], SearchSettings(stack="parameters", photo_weight=0)
    )
    assert np.allclose(q, encode_texts(serving.bundle, [TEXT], ads), atol=1e-6)


def test_embedding_stacking_sums_single_concept_encodings(setup):
    serving, ads = setup
    cfg = SearchSettings(stack="embeddings", multi_photo_weight=0, multi_context_weight=0)
    q = encode_query(serving, TEXT, ads, [None, None], cfg)
    parts = [encode_texts(serving.bundle, [TEXT], [a]) for a in ads]
    assert np.allclose(q, unit(parts[0] + parts[1]), atol=1e-6)
    assert not np.allclose(q, encode_texts(serving.bundle, [TEXT], ads), atol=1e-4)


def test_several_concepts_fuse_each_ones_photos_and_the_plain_context(setup):
    serving, ads = setup
    d = serving.bundle.embed_dim
    m0, m1 = unit(np.ones(d, np.float32)), unit(np.arange(d, dtype=np.float32))
    cfg = SearchSettings(stack="embeddings", multi_photo_weight=1.0, multi_context_weight=0.5)
    q = encode_query(serving, TEXT, ads, [m0, m1], cfg)
    p0 = unit(unit(encode_texts(serving.bundle, [TEXT], [ads[0]])) + m0)
    p1 = unit(unit(encode_texts(serving.bundle, [TEXT], [ads[1]])) + m1)
    expect = unit(unit(p0 + p1) + 0.5 * encode_texts(serving.bundle, [TEXT]))
    assert np.allclose(q, expect, atol=1e-6)
    # A concept without photos contributes its text part alone.
    q_missing = encode_query(serving, TEXT, ads, [m0, None], cfg)
    p1_text = unit(encode_texts(serving.bundle, [TEXT], [ads[1]]))
    assert np.allclose(
        q_missing, unit(unit(p0 + p1_text) + 0.5 * encode_texts(serving.bundle, [TEXT])), atol=1e-6
    )


def test_photo_fusion_adds_the_weighted_photo_mean(setup):
    serving, ads = setup
    mean = unit(np.arange(serving.bundle.embed_dim, dtype=np.float32))
    plain = encode_query(serving, TEXT, ads[:1], [], SearchSettings(photo_weight=0))
    fused = encode_query(serving, TEXT, ads[:1], [mean], SearchSettings(photo_weight=0.5))
    assert np.allclose(fused, unit(plain + 0.5 * mean), atol=1e-6)
    assert float(fused[0] @ mean) > float(plain[0] @ mean)
    assert np.isclose(np.linalg.norm(fused), 1.0)
