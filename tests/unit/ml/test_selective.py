"""The keep-term trainer (the service default): exact objective, selective firing, plumbing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from app.ml.encode import encode_texts
from app.ml.selective import keep_texts, train_selective
from app.ml.train import train_adapter
from tests.unit.ml.conftest import tiny_clip


@pytest.fixture(scope="module")
def bundle():
    return tiny_clip(3)


def _photos(bundle, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, bundle.embed_dim, generator=g), dim=-1)


def test_keep_zero_is_the_plain_objective(bundle):
    photos = _photos(bundle)
    plain = train_adapter(bundle, photos, "sks", "hat", lam=0.01, steps=40, lr=3e-3)
    keep0 = train_selective(bundle, photos, "sks", "hat", lam=0.01, steps=40, lr=3e-3, keep=0.0)
    assert torch.allclose(plain.a, keep0.a, atol=1e-5)
    assert torch.allclose(plain.b, keep0.b, atol=1e-5)


def test_keep_term_protects_texts_without_the_concept(bundle):
    photos = _photos(bundle)
    kw = {"lam": 0.0, "steps": 150, "lr": 1e-2}
    loose = train_selective(bundle, photos, "sks", "hat", keep=0.0, **kw)
    kept = train_selective(bundle, photos, "sks", "hat", keep=3.0, **kw)
    texts = ["a photo of a hat", "a hat on the beach", "this photo shows a hat"]
    base = encode_texts(bundle, texts)

    def drift(adapter):
        return float((encode_texts(bundle, texts, [adapter]) * base).sum(-1).mean())

    assert drift(kept) > drift(loose)  # closer to the base model where the concept is absent
    # ... while the concept's own phrase still moves toward its photos.
    own = encode_texts(bundle, ["a photo of sks hat"], [kept])[0]
    before = encode_texts(bundle, ["a photo of sks hat"])[0]
    target = photos.mean(0).numpy()
    assert own @ target > before @ target


def test_keep_texts_name_the_category_and_foreign_tokens_but_not_the_concept(bundle):
    texts = keep_texts(bundle, "httr", "hat", others=2)
    assert len(texts) == 13 * 4  # bare category, two foreign tokens, and sks
    assert not any("httr" in t for t in texts)
    assert any("sks hat" in t for t in texts)


def test_progress_and_metadata(bundle):
    seen = []
    adapter = train_selective(
        bundle, _photos(bundle), "sks", None, lam=0.0, steps=7, keep=1.0,
        progress=lambda step, steps, _loss: seen.append((step, steps)),
    )  # fmt: skip
    assert seen[-1] == (7, 7) and len(seen) == 7
    assert adapter.steps == 7 and adapter.category is None
    assert adapter.fingerprint == bundle.fingerprint


@pytest.mark.parametrize("bad", [torch.zeros(0, 24), torch.zeros(3, 5), torch.full((2, 24), 1e999)])
def test_bad_photo_embeddings_are_refused(bundle, bad):
    with pytest.raises(ValueError):
        train_selective(bundle, bad, "sks", "hat", lam=0.0, steps=2)
