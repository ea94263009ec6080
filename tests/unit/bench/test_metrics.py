"""Retrieval metrics on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from app.bench.metrics import (
    average_precision,
    caption_recall,
    gt_ranks,
    query_metrics,
    retrieval_metrics,
)


def test_ranks_of_several_ground_truths() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    assert gt_ranks(scores, [3, 1]).tolist() == [2, 4]


def test_ties_count_against_the_ground_truth() -> None:
    scores = np.array([0.5, 0.5, 0.5])
    assert gt_ranks(scores, [1]).tolist() == [3]  # a constant scorer gets the worst rank
    assert gt_ranks(scores, [0, 1]).tolist() == [2, 3]  # tied ground truths take turns


def test_untruncated_average_precision() -> None:
    # ground truths at ranks 1, 3 and 6: AP = (1/1 + 2/3 + 3/6) / 3
    assert average_precision(np.array([1, 3, 6])) == pytest.approx((1 + 2 / 3 + 0.5) / 3)


def test_query_metrics_mrr_and_recall() -> None:
    scores = np.arange(12, dtype=float)[::-1]  # item i ranks i + 1
    m = query_metrics(scores, [6, 11])
    assert m["mrr"] == pytest.approx(1 / 7)
    assert (m["r@1"], m["r@5"], m["r@10"]) == (0.0, 0.0, 1.0)
    assert m["map"] == pytest.approx((1 / 7 + 2 / 12) / 2)


def test_retrieval_metrics_average_over_queries() -> None:
    scores = np.array([[0.9, 0.1, 0.0], [0.1, 0.2, 0.9]])
    m = retrieval_metrics(scores, [[0], [1]])
    assert m["mrr"] == pytest.approx((1 + 0.5) / 2)
    assert m["r@1"] == pytest.approx(0.5)
    assert m["queries"] == 2


def test_caption_recall_counts_own_image_only() -> None:
    images = np.eye(3, dtype=np.float32)
    captions = np.array([[0.9, 0.1, 0.0], [0.5, 0.2, 0.9], [0.1, 0.0, 0.3]])  # = scores
    assert caption_recall(captions, images, k=1) == pytest.approx(2 / 3)
    assert caption_recall(captions, images, k=2) == pytest.approx(2 / 3)
    assert caption_recall(captions, images, k=3) == 1.0
    assert caption_recall(np.zeros((3, 3)), images, k=2) == 0.0  # ties count against
