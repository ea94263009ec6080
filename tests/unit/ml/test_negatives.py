"""The negative term ("not Fido" photos): exact, free when absent, and it moves the concept away."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from app.ml.encode import encode_texts
from app.ml.selective import train_selective
from app.ml.train import ReferenceObjective, away_from, train_adapter, train_adapter_reference
from tests.unit.ml.conftest import tiny_clip

KW = {"lam": 0.0, "steps": 120, "lr": 1e-2, "seed": 0}


@pytest.fixture(scope="module")
def bundle():
    return tiny_clip(3)


def _unit(bundle, n, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, bundle.embed_dim, generator=g), dim=-1)


def _same(x, y):
    return torch.equal(x.a, y.a) and torch.equal(x.b, y.b) and x.final_loss == y.final_loss


@pytest.mark.parametrize("trainer", [train_adapter, train_selective])
def test_without_negatives_the_result_is_todays_trainer_bit_for_bit(bundle, trainer):
    photos = _unit(bundle, 5, 0)
    today = trainer(bundle, photos, "sks", "hat", **KW)
    assert _same(today, trainer(bundle, photos, "sks", "hat", negatives=None, **KW))
    empty = torch.zeros(0, bundle.embed_dim)
    assert _same(today, trainer(bundle, photos, "sks", "hat", negatives=empty, **KW))
    rejected = _unit(bundle, 3, 9)
    weight0 = trainer(bundle, photos, "sks", "hat", negatives=rejected, negative_weight=0.0, **KW)
    assert _same(today, weight0)


@pytest.mark.parametrize("trainer", [train_adapter, train_selective])
def test_negatives_move_the_concepts_text_away_from_them(bundle, trainer):
    photos = _unit(bundle, 5, 0)
    # Look-alikes: close to the photos, as a person's "not Fido" marks are.
    rejected = F.normalize(photos[:3] + 0.6 * _unit(bundle, 3, 7), dim=-1)
    plain = trainer(bundle, photos, "sks", "hat", **KW)
    pushed = trainer(bundle, photos, "sks", "hat", negatives=rejected, negative_weight=0.5, **KW)
    text = ["a photo of sks hat"]
    before = torch.from_numpy(encode_texts(bundle, text, [plain]))[0]
    after = torch.from_numpy(encode_texts(bundle, text, [pushed]))[0]
    assert float(after @ rejected.mean(0)) < float(before @ rejected.mean(0))
    # ... relative to the concept's own photos too: the margin between them grows.
    margin_before = float(before @ photos.mean(0) - before @ rejected.mean(0))
    margin_after = float(after @ photos.mean(0) - after @ rejected.mean(0))
    assert margin_after > margin_before


def test_the_shifted_target_is_the_objective_with_the_negative_term(bundle):
    """The loss with the term written out (autograd through open_clip's forward) has the same
    gradient as the shifted-target loss the trainers minimise."""
    photos, rejected, nu = _unit(bundle, 5, 0), _unit(bundle, 4, 5), 0.3
    tokens = bundle.tokenizer(["a photo of sks hat"] * 5)
    ref = ReferenceObjective(bundle, tokens, photos, lam=0.0)
    shifted = ReferenceObjective(bundle, tokens, away_from(photos, rejected, nu), lam=0.0)
    g = torch.Generator().manual_seed(1)
    d = ref.update.a.shape[0]
    a, b = torch.randn(d, generator=g), 0.05 * torch.randn(d, generator=g)

    def written_out(a, b):
        f = F.normalize(ref.features(a, b), dim=-1)  # (N, D)
        pos = (f - photos).pow(2).mean()
        neg = (f[:, None, :] - rejected[None]).pow(2).mean()
        return pos - nu * neg

    def grads(fn):
        aa, bb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        return torch.autograd.grad(fn(aa, bb), (aa, bb))

    for x, y in zip(grads(written_out), grads(shifted), strict=True):
        assert torch.allclose(x, y, atol=1e-6, rtol=1e-4)


def test_fast_and_reference_trainers_agree_with_negatives(bundle):
    photos, rejected = _unit(bundle, 5, 0), _unit(bundle, 3, 4)
    kw = KW | {"steps": 30, "negatives": rejected, "negative_weight": 0.4}
    fast = train_adapter(bundle, photos, "sks", "hat", **kw)
    ref = train_adapter_reference(bundle, photos, "sks", "hat", **kw)
    assert torch.allclose(fast.b, ref.b, atol=1e-4)


def test_bad_negatives_are_refused(bundle):
    photos = _unit(bundle, 5, 0)
    with pytest.raises(ValueError, match="negatives must be"):
        train_adapter(
            bundle, photos, "sks", "hat", lam=0.0, negatives=torch.ones(2, 3), negative_weight=1.0
        )
    with pytest.raises(ValueError, match=">= 0"):
        away_from(photos, photos, -1.0)
