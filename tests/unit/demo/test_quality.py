"""Quality metrics on tiny inputs, and the evaluation plumbing on an untrained model."""

from __future__ import annotations

import numpy as np
import pytest

from app.demo import quality
from app.demo.world import World


def test_gt_ranks_count_ties_against_the_ground_truth() -> None:
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.2, 0.1], [0.0, 0.0, 0.0]])
    gt = np.array([0, 1, 2])
    assert quality.gt_ranks(scores, gt).tolist() == [1, 2, 3]


def test_recall_mrr_and_accuracy() -> None:
    scores = np.array(
        [
            [0.9, 0.1, 0.5, 0.0],  # gt 0 at rank 1
            [0.2, 0.3, 0.1, 0.4],  # gt 1 at rank 2
            [0.5, 0.6, 0.7, 0.8],  # gt 2 at rank 2
            [0.9, 0.8, 0.7, 0.6],  # gt 3 at rank 4
        ]
    )
    gt = np.arange(4)
    assert quality.recall_at_k(scores, gt, 1) == 0.25
    assert quality.recall_at_k(scores, gt, 2) == 0.75
    assert quality.recall_at_k(scores, gt, 4) == 1.0
    assert quality.mean_reciprocal_rank(scores, gt) == pytest.approx((1 + 0.5 + 0.5 + 0.25) / 4)
    assert quality.accuracy(scores, np.array([0, 3, 3, 0])) == 1.0


def test_top1_in_accepts_any_allowed_column_and_rejects_ties() -> None:
    scores = np.array([[0.1, 0.9, 0.3], [0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.9, 0.0, 0.1]])
    allowed = [{1}, {0}, {0, 1}, {1, 2}]
    assert quality.top1_in(scores, allowed) == 0.5  # rows 0 and 2


def test_constant_scores_score_nothing() -> None:
    scores = np.zeros((5, 5))
    assert quality.recall_at_k(scores, np.arange(5), 4) == 0.0


def test_format_table_marks_targets() -> None:
    table = quality.format_table({"caption_r@10": 0.9, "scene_accuracy": 0.5, "x": 0.1})
    assert "ok" in table.splitlines()[1] and "BELOW" in table.splitlines()[2]


def test_evaluate_runs_on_an_untrained_model() -> None:
    import open_clip

    open_clip.add_model_config(quality.CONFIG_DIR)
    model, _, preprocess = open_clip.create_model_and_transforms(quality.MODEL_NAME)
    model.eval()
    pool = quality.eval_pool(24)
    metrics = quality.evaluate(model, preprocess, open_clip.get_tokenizer("polar-demo"), pool)
    assert metrics["pool_images"] == 24
    for name in ("caption_r@10", "scene_accuracy", "category_accuracy", "color_accuracy"):
        assert 0.0 <= metrics[name] <= 1.0
    assert metrics["caption_r@1"] <= metrics["caption_r@5"] <= metrics["caption_r@10"]


@pytest.mark.slow
def test_shipped_checkpoint_meets_the_quality_targets() -> None:
    model, preprocess, tokenizer = quality.load_demo_model(quality.DEFAULT_CHECKPOINT)
    metrics = quality.evaluate(model, preprocess, tokenizer, quality.eval_pool(300))
    for name, target in quality.TARGETS.items():
        assert metrics[name] >= target, (name, metrics[name])


def test_shape_metrics_are_reported() -> None:
    import open_clip

    open_clip.add_model_config(quality.CONFIG_DIR)
    model, _, preprocess = open_clip.create_model_and_transforms(quality.MODEL_NAME)
    model.eval()
    tokenizer = open_clip.get_tokenizer("polar-demo")
    metrics = quality.evaluate(model, preprocess, tokenizer, quality.eval_pool(24))
    for name in ("shape_accuracy", "shape_twin_separation", "colors_twin_separation"):
        assert 0.0 <= metrics[name] <= 1.0
    sep = quality.twin_separation(model, preprocess, World(0), n=4)
    assert set(sep) == {f"{k}_twin_separation" for k in ("colors", "pattern", "shape")}
    assert all(v in (0.0, 0.25, 0.5, 0.75, 1.0) for v in sep.values())  # fractions of 4


def test_a_model_that_sees_shapes_scores_shape_accuracy_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """_shape_accuracy picks the variant whose prompt scores highest: with text and image
    embeddings that encode the variant exactly it is right every time; a swap breaks it."""
    from app.demo.world import VARIANT_NAMES

    pool = quality.eval_pool(60)
    objs = [ex.objects[0].instance for ex in pool if len(ex.objects) == 1]
    img = np.stack([np.eye(3)[o.variant] for o in objs])
    prompts: dict[str, int] = {}
    for cat, names in VARIANT_NAMES.items():
        for v, n in enumerate(names):
            prompts[f"a photo of a {n} {cat}"] = v

    def fake_texts(_m: object, _t: object, texts: list[str]) -> np.ndarray:
        return np.stack([np.eye(3)[prompts[t]] for t in texts])

    monkeypatch.setattr(quality, "encode_texts", fake_texts)
    assert quality._shape_accuracy(None, None, img, objs) == 1.0
    assert quality._shape_accuracy(None, None, img[:, [1, 2, 0]], objs) == 0.0
