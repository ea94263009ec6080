"""Retention score (app/services/retention.py) on a tiny random CLIP and synthetic caption sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from app.config import ModelSettings
from app.ml.adapter import ConceptAdapter
from app.ml.encode import encode_texts
from app.ml.model import ClipBundle, bundle_from_model
from app.services import retention
from app.services.model import ServingModel
from app.services.retention import RetentionSet

CAPTIONS = tuple(
    f"a {c} {o} {p}"
    for c in ("red", "blue", "green", "white", "black", "small")
    for o in ("dog", "car", "cup", "house", "tree")
    for p in ("at the beach",)
)  # 30 distinct captions


@pytest.fixture(scope="module")
def bundle() -> ClipBundle:
    torch.manual_seed(1)
    vision = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32)
    text = CLIPTextCfg(context_length=77, width=32, heads=4, layers=2)
    model = CLIP(embed_dim=24, vision_cfg=vision, text_cfg=text)
    return bundle_from_model(
        model, open_clip.image_transform(32, is_train=False), name="tiny-ret", pretrained="r1"
    )


def adapter(bundle: ClipBundle, b_norm: float, seed: int = 0) -> ConceptAdapter:
    """A rank-1 update with ‖B‖ = b_norm (0: the update changes nothing)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(bundle.text_width, generator=g)
    b = torch.randn(bundle.text_width, generator=g)
    b = b / b.norm() * b_norm
    return ConceptAdapter(
        b=b, a=a, fingerprint=bundle.fingerprint, token="sks", category=None,
        lam=0.1, steps=1, lr=1e-3, final_loss=0.0,
    )  # fmt: skip


@pytest.fixture
def rset(bundle: ClipBundle) -> RetentionSet:
    """Images whose embeddings are the base model's caption embeddings: base R@10 = 1."""
    emb = encode_texts(bundle, CAPTIONS)
    return RetentionSet(CAPTIONS, emb, bundle.fingerprint.model_id)


@pytest.fixture(autouse=True)
def fresh_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retention, "_base_cache", {})
    monkeypatch.setattr(retention, "_sets", {})


# -- recall ------------------------------------------------------------------------------------


def test_recall_at_k_counts_the_own_image_in_the_top_k():
    eye = np.eye(12, dtype=np.float32)
    assert retention.recall_at_k(eye, eye, k=1) == 1.0
    # Caption i is closest to image (i+1) % 12, then to its own: its own ranks 2nd.
    shifted = (np.roll(eye, 1, axis=1) + 0.5 * eye).astype(np.float32)
    assert retention.recall_at_k(shifted, eye, k=1) == 0.0
    assert retention.recall_at_k(shifted, eye, k=2) == 1.0


def test_recall_ties_count_against_the_caption():
    text = np.ones((12, 4), np.float32) / 2  # every image scores the same for every caption
    assert retention.recall_at_k(text, text.copy(), k=10) == 0.0
    assert retention.recall_at_k(text, text.copy(), k=12) == 1.0


# -- the retention set file --------------------------------------------------------------------


def test_retention_set_round_trips(tmp_path: Path, rset: RetentionSet):
    path = tmp_path / "retention.npz"
    rset.save(path)
    back = RetentionSet.load(path)
    assert back.captions == rset.captions and back.model_id == rset.model_id
    np.testing.assert_allclose(back.image_embeddings, rset.image_embeddings, atol=1e-6)
    assert back.digest == RetentionSet.load(path).digest


_M = np.array("tiny-ret/r1@0")


@pytest.mark.parametrize(
    "arrays",
    [
        {"captions": np.array(["a", "b"]), "image_embeddings": np.ones((3, 4)), "model_id": _M},
        {"captions": np.array(["a"]), "image_embeddings": np.ones((1, 4))},  # no model_id
        {"captions": np.array(["a"]), "image_embeddings": np.full((1, 4), np.nan), "model_id": _M},
        {"captions": np.array([], dtype=str), "image_embeddings": np.ones((0, 4)), "model_id": _M},
    ],
)
def test_malformed_retention_sets_are_refused(tmp_path: Path, arrays: dict):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError):
        RetentionSet.load(path)


# -- the paper's caption R@10 ------------------------------------------------------------------


def test_a_zero_update_keeps_everything(bundle, rset):
    result = retention.caption_retention(bundle, adapter(bundle, 0.0), rset, max_drop=0.0)
    assert result.method == "caption_r@10" and result.n == 30
    assert result.base == 1.0 and result.adapted == 1.0 and result.score == 1.0
    assert not result.flagged


def test_a_large_update_loses_retrieval_and_is_flagged(bundle, rset):
    result = retention.caption_retention(bundle, adapter(bundle, 50.0), rset, max_drop=0.03)
    assert result.base == 1.0 and result.adapted < 0.9
    assert result.score == pytest.approx(result.adapted / result.base)
    assert result.flagged
    assert result.as_metrics() == {
        "retention_method": "caption_r@10",
        "retention_base": 1.0,
        "retention_adapted": pytest.approx(result.adapted),
        "retention_captions": 30,
    }


def test_flagging_is_the_absolute_drop_against_the_setting(bundle, rset):
    big = adapter(bundle, 50.0)
    drop = retention.caption_retention(bundle, big, rset, max_drop=1.0)
    loss = drop.base - drop.adapted
    assert loss > 0
    assert retention.caption_retention(bundle, big, rset, max_drop=loss - 0.01).flagged
    assert not retention.caption_retention(bundle, big, rset, max_drop=loss + 0.01).flagged


def test_the_base_recall_is_computed_once_per_model(bundle, rset, monkeypatch):
    base_calls = []
    real = retention.encode_texts

    def counting(b, texts, adapters=()):
        if not adapters:
            base_calls.append(len(texts))
        return real(b, texts, adapters)

    monkeypatch.setattr(retention, "encode_texts", counting)
    for seed in range(3):
        retention.caption_retention(bundle, adapter(bundle, 5.0, seed), rset, max_drop=0.03)
    assert base_calls == [30]


def test_a_set_of_another_width_is_refused(bundle):
    other = RetentionSet(("a", "b"), np.eye(2, 8, dtype=np.float32), bundle.fingerprint.model_id)
    with pytest.raises(ValueError, match="8-d"):
        retention.caption_retention(bundle, adapter(bundle, 1.0), other, max_drop=0.03)


# -- the text-only proxy -----------------------------------------------------------------------


def test_proxy_on_the_shipped_generic_captions(bundle):
    captions = retention.generic_captions()
    assert len(captions) >= 200 and len(set(captions)) == len(captions)
    assert not any("sks" in c.split() for c in captions)
    same = retention.proxy_retention(bundle, adapter(bundle, 0.0), max_drop=0.03)
    assert same.method == "text_cosine" and same.n == len(captions)
    assert same.score == pytest.approx(1.0, abs=1e-5) and not same.flagged
    moved = retention.proxy_retention(bundle, adapter(bundle, 50.0), max_drop=0.03)
    assert moved.score < 0.97 and moved.flagged
    assert moved.adapted == moved.score and moved.base == 1.0


# -- which method a serving model gets ---------------------------------------------------------


def serving_with_checkpoint(
    bundle: ClipBundle, tmp_path: Path
) -> tuple[ServingModel, ModelSettings]:
    checkpoint = tmp_path / "weights.safetensors"
    checkpoint.write_bytes(b"stand-in")
    cfg = ModelSettings(name="tiny-ret", pretrained=str(checkpoint), device="cpu")
    return ServingModel(bundle, f"tiny-ret/{checkpoint}", None), cfg


def test_a_shipped_set_of_this_model_is_used(bundle, rset, tmp_path):
    serving, cfg = serving_with_checkpoint(bundle, tmp_path)
    rset.save(tmp_path / "retention.npz")
    result = retention.measure_retention(serving, cfg, adapter(bundle, 50.0), max_drop=0.03)
    assert result.method == "caption_r@10" and result.n == 30


def test_without_a_set_the_proxy_is_used(bundle, tmp_path):
    serving, cfg = serving_with_checkpoint(bundle, tmp_path)
    assert retention.measure_retention(
        serving, cfg, adapter(bundle, 1.0), max_drop=0.03
    ).method == ("text_cosine")
    hub = ModelSettings(name="ViT-B-32", pretrained="openai")
    assert retention.retention_set_path(ServingModel(bundle, "ViT-B-32/openai", None), hub) is None


def test_a_set_built_with_another_model_is_ignored(bundle, rset, tmp_path):
    serving, cfg = serving_with_checkpoint(bundle, tmp_path)
    RetentionSet(rset.captions, rset.image_embeddings, "other/model@123").save(
        tmp_path / "retention.npz"
    )
    result = retention.measure_retention(serving, cfg, adapter(bundle, 1.0), max_drop=0.03)
    assert result.method == "text_cosine"


def test_the_demo_fallback_looks_next_to_the_demo_checkpoint(bundle, rset, tmp_path, monkeypatch):
    demo = tmp_path / "polar-demo" / "weights.safetensors"
    demo.parent.mkdir()
    demo.write_bytes(b"stand-in")
    rset.save(demo.parent / "retention.npz")
    monkeypatch.setattr(retention, "demo_checkpoint_path", lambda: demo)
    serving = ServingModel(bundle, "ViT-B-32/openai", "no network")
    cfg = ModelSettings(name="ViT-B-32", pretrained="openai")
    assert retention.retention_set_path(serving, cfg) == demo.parent / "retention.npz"
    result = retention.measure_retention(serving, cfg, adapter(bundle, 1.0), max_drop=0.03)
    assert result.method == "caption_r@10"


def test_the_demo_set_builder_writes_a_set_the_service_uses(bundle, tmp_path):
    from app.demo.retention_set import build

    built = build(bundle, n=12, start=1000, seed=0)
    assert len(built.captions) == 12 and built.image_embeddings.shape == (12, bundle.embed_dim)
    assert built.model_id == bundle.fingerprint.model_id
    assert len(set(built.captions)) > 1 and all(isinstance(c, str) and c for c in built.captions)
    np.testing.assert_allclose(np.linalg.norm(built.image_embeddings, axis=1), 1.0, atol=1e-5)
    assert build(bundle, n=12, start=1000, seed=0).digest == built.digest  # deterministic
    serving, cfg = serving_with_checkpoint(bundle, tmp_path)
    built.save(tmp_path / "retention.npz")
    result = retention.measure_retention(serving, cfg, adapter(bundle, 1.0), max_drop=0.03)
    assert result.method == "caption_r@10" and result.n == 12
