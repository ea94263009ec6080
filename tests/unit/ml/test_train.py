"""Training: the fast path is the exact POLAR objective (loss, gradients, parameters)."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch

from app.ml.adapter import ConceptAdapter
from app.ml.fast import FastObjective
from app.ml.model import ClipBundle, bundle_from_model
from app.ml.text import text_tower
from app.ml.train import (
    TEMPLATES,
    Adam,
    ReferenceObjective,
    init_factors,
    pick_concept_token,
    placeholder_phrase,
    train_adapter,
    train_adapter_reference,
    training_texts,
)


def _objectives(
    bundle: ClipBundle, n: int, seed: int, lam: float = 0.2
) -> tuple[FastObjective, ReferenceObjective, torch.Tensor, torch.Tensor]:
    """Both objectives on the same data, and a point (a, b) away from the B = 0 start."""
    tower = text_tower(bundle.model)
    g = torch.Generator().manual_seed(seed)
    target = torch.nn.functional.normalize(torch.randn(n, bundle.embed_dim, generator=g), dim=-1)
    target = target.to(tower.dtype)
    tokens = bundle.tokenizer(training_texts("sks", "dog", n, seed))
    a = torch.randn(tower.width, generator=g).to(tower.dtype).requires_grad_(True)
    b = (0.3 * torch.randn(tower.width, generator=g)).to(tower.dtype).requires_grad_(True)
    fast = FastObjective.build(tower, tokens, target, lam)
    return fast, ReferenceObjective(bundle, tokens, target, lam), a, b


def _reference_grads(
    ref: ReferenceObjective, a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    loss = ref(a, b)
    ga, gb = torch.autograd.grad(loss, (a, b))
    return loss.detach(), ga, gb


@pytest.mark.parametrize("name", ["clip64", "custom64"])
def test_fast_loss_and_grads_equal_open_clip_forward_float64(
    name: str, request: pytest.FixtureRequest
) -> None:
    bundle = request.getfixturevalue(name)
    fast, ref, a, b = _objectives(bundle, n=7, seed=3)
    loss, ga, gb = fast.loss_and_grads(a, b)
    ref_loss, ref_ga, ref_gb = _reference_grads(ref, a, b)
    assert ref_ga.abs().max() > 1e-4 and ref_gb.abs().max() > 1e-4  # a non-trivial point
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(ga, ref_ga, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(gb, ref_gb, rtol=1e-8, atol=1e-12)
    # The hand-written backward also equals autograd through the fast forward itself.
    auto_ga, auto_gb = torch.autograd.grad(fast(a, b), (a, b))
    torch.testing.assert_close(ga, auto_ga, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(gb, auto_gb, rtol=1e-10, atol=1e-14)


def test_fast_grads_match_in_float32(clip32: ClipBundle) -> None:
    fast, ref, a, b = _objectives(clip32, n=5, seed=4)
    loss, ga, gb = fast.loss_and_grads(a, b)
    ref_loss, ref_ga, ref_gb = _reference_grads(ref, a, b)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    scale = max(ref_ga.abs().max(), ref_gb.abs().max())
    assert (ga - ref_ga).abs().max() <= 1e-5 * scale
    assert (gb - ref_gb).abs().max() <= 1e-5 * scale


@pytest.mark.slow
@pytest.mark.real_size
def test_fast_grads_equal_open_clip_forward_on_vit_b_32() -> None:
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    model.visual = None  # only the text tower matters; halves the float64 copy
    bundle = bundle_from_model(model.double(), preprocess, name="ViT-B-32", pretrained="random")
    fast, ref, a, b = _objectives(bundle, n=5, seed=5, lam=0.1)
    loss, ga, gb = fast.loss_and_grads(a, b)
    ref_loss, ref_ga, ref_gb = _reference_grads(ref, a, b)
    assert ref_gb.abs().max() > 1e-6
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(ga, ref_ga, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(gb, ref_gb, rtol=1e-7, atol=1e-12)


def test_fast_and_reference_trainers_reach_the_same_parameters(
    clip32: ClipBundle, unit_rows
) -> None:
    y = unit_rows(5, clip32.embed_dim, 6)
    fast = train_adapter(clip32, y, "sks", "dog", lam=0.1, steps=80)
    ref = train_adapter_reference(clip32, y, "sks", "dog", lam=0.1, steps=80)
    assert fast.b.abs().max() > 0.01  # it actually trained
    assert (fast.a - ref.a).abs().max() <= 1e-5
    assert (fast.b - ref.b).abs().max() <= 1e-5
    assert fast.final_loss == pytest.approx(ref.final_loss, rel=1e-5)


def test_training_lowers_the_loss_and_pulls_text_to_images(clip32: ClipBundle, unit_rows) -> None:
    from app.ml.encode import encode_texts

    y = unit_rows(4, clip32.embed_dim, 7)
    seen: list[tuple[int, int, float]] = []
    adapter = train_adapter(
        clip32, y, "sks", "ball", lam=0.01, steps=150, lr=1e-2, progress=lambda *p: seen.append(p)
    )
    texts = training_texts("sks", "ball", 4, 0)
    before = (encode_texts(clip32, texts) * y.numpy()).sum(1).mean()
    after = (encode_texts(clip32, texts, [adapter]) * y.numpy()).sum(1).mean()
    assert after > before + 0.1
    assert seen[-1][:2] == (150, 150) and [s for s, _, _ in seen] == sorted({s for s, _, _ in seen})
    assert adapter.final_loss < seen[0][2]
    assert (adapter.steps, adapter.lam, adapter.lr, adapter.token) == (150, 0.01, 1e-2, "sks")
    assert adapter.fingerprint == clip32.fingerprint
    back = ConceptAdapter.from_bytes(adapter.to_bytes())
    assert torch.equal(back.a, adapter.a) and torch.equal(back.b, adapter.b)


def test_training_is_deterministic_per_seed(clip32: ClipBundle, unit_rows) -> None:
    y = unit_rows(3, clip32.embed_dim, 8)
    one = train_adapter(clip32, y, "sks", None, lam=0.1, steps=20, seed=1)
    two = train_adapter(clip32, y, "sks", None, lam=0.1, steps=20, seed=1)
    other = train_adapter(clip32, y, "sks", None, lam=0.1, steps=20, seed=2)
    assert torch.equal(one.a, two.a) and torch.equal(one.b, two.b)
    assert not torch.equal(one.a, other.a)


def test_init_is_lora_style() -> None:
    a, b = init_factors(512, 0, torch.float32, torch.device("cpu"))
    assert torch.equal(b, torch.zeros(512))
    bound = 1 / 512**0.5  # kaiming_uniform(a=√5) on fan_in = d
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound


def test_bad_image_embeddings_are_rejected(clip32: ClipBundle) -> None:
    with pytest.raises(ValueError, match="image_embeddings"):
        train_adapter(clip32, torch.zeros(3, clip32.embed_dim + 1), "sks", None, lam=0.1, steps=1)
    with pytest.raises(ValueError, match="image_embeddings"):
        train_adapter(clip32, torch.zeros(0, clip32.embed_dim), "sks", None, lam=0.1, steps=1)


def test_templates_and_placeholder() -> None:
    assert len(TEMPLATES) == 13 and len(set(TEMPLATES)) == 13
    assert all(t.count("*") == 1 for t in TEMPLATES)
    assert placeholder_phrase("sks", "hat") == "sks hat"
    assert placeholder_phrase("sks", None) == "sks"
    texts = training_texts("sks", "hat", 13, 0)
    assert sorted(texts) == sorted(t.replace("*", "sks hat") for t in TEMPLATES)
    longer = training_texts("sks", "hat", 15, 0)
    assert longer[:13] == texts and longer[13:] == texts[:2]
    assert training_texts("sks", "hat", 13, 1) != texts


def test_pick_concept_token(clip32: ClipBundle) -> None:
    assert pick_concept_token(clip32, {"sks"}, "shared") == "sks"
    first = pick_concept_token(clip32, set(), "distinct")
    assert first == pick_concept_token(clip32, set(), "distinct")  # deterministic
    second = pick_concept_token(clip32, {first}, "distinct")
    assert second != first and second != "sks"
    tok = clip32.tokenizer
    for word in (first, second):
        assert len(tok.encode(word)) == 1  # type: ignore[attr-defined]
        assert not set(word) & set("aeiouy")
    with pytest.raises(ValueError, match="mode"):
        pick_concept_token(clip32, set(), "other")


def test_cached_model_constants_follow_in_place_weight_changes(clip64: ClipBundle) -> None:
    bundle = bundle_from_model(
        copy.deepcopy(clip64.model), clip64.preprocess, name="tiny", pretrained="copy"
    )
    fast, ref, a, b = _objectives(bundle, n=4, seed=9)
    before = fast(a, b)
    with torch.no_grad():
        text_tower(bundle.model).last.mlp.c_proj.weight.mul_(1.5)
    fast, ref, a, b = _objectives(bundle, n=4, seed=9)
    torch.testing.assert_close(fast(a, b), ref(a, b), rtol=1e-10, atol=1e-14)
    assert abs(float(fast(a, b).detach() - before.detach())) > 1e-6


def test_adam_matches_torch_optim_adam_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(0)
    ours = [torch.randn(64, generator=g), torch.zeros(64)]
    theirs = [p.clone().requires_grad_(True) for p in ours]
    opt, ref = Adam(ours, lr=1e-3), torch.optim.Adam(theirs, lr=1e-3, foreach=False)
    for _ in range(50):
        grads = [torch.randn(64, generator=g) for _ in ours]
        opt.step(grads)
        for p, gr in zip(theirs, grads, strict=True):
            p.grad = gr
        ref.step()
    assert all(torch.equal(x, y.detach()) for x, y in zip(ours, theirs, strict=True))
