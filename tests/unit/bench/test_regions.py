"""The region sweep (app.bench.regions) and the ranking helpers it shares with the service's
benchmark method (app.bench.service)."""

from __future__ import annotations

import numpy as np
import pytest

from app.bench.regions import summarize, sweep_scores
from app.bench.service import place_on_top, top_candidates


def test_top_candidates_and_place_on_top() -> None:
    scores = np.array([0.5, 0.9, 0.1, 0.7, 0.3], dtype=np.float32)
    assert top_candidates(scores, 2).tolist() == [1, 3]
    assert top_candidates(scores, 0).tolist() == [1, 3, 0, 4, 2]
    assert top_candidates(scores, 99).tolist() == [1, 3, 0, 4, 2]
    out = place_on_top(scores, np.array([1, 3]), np.array([-5.0, -4.0], dtype=np.float32))
    assert np.argsort(-out).tolist() == [3, 1, 0, 4, 2]  # re-ordered, still above the rest
    assert out[[0, 4, 2]].tolist() == scores[[0, 4, 2]].tolist()  # the rest keep their scores
    every = place_on_top(scores, np.arange(5), scores[::-1].copy())
    np.testing.assert_allclose(every, scores[::-1])  # nothing left to stay above: no shift


def test_sweep_scores_aggregates_parts() -> None:
    base = np.zeros((1, 3), dtype=np.float32)
    matches = [np.array([[1.0, 0.6, 0.0], [0.0, 0.6, 1.0]], dtype=np.float32)]  # (K=2, N=3)
    mean = sweep_scores(base, matches, "mean", 1.0, 0)
    low = sweep_scores(base, matches, "min", 1.0, 0)
    np.testing.assert_allclose(mean[0], [0.5, 0.6, 0.5])
    np.testing.assert_allclose(low[0], [0.0, 0.6, 0.0])
    base = np.array([[0.3, 0.0, 0.2]], dtype=np.float32)
    top2 = sweep_scores(base, matches, "mean", 10.0, 2)  # image 1 is not a candidate
    assert np.argsort(-top2[0]).tolist() == [0, 2, 1]


def test_summarize_means_over_seeds_and_ranks_the_choice() -> None:
    def seed(s: int, choice: float, other: float) -> dict[str, object]:
        row = {"context": {"mrr": 0.8}, "multi": {"mrr": 0.4}}
        return {
            "bench_seed": s,
            "grid": {
                "multi": {
                    "five60/mean/8/c200": {"mrr": choice, "r@1": 0.5},
                    "grid3_50/min/1/c0": {"mrr": other, "r@1": 0.5},
                },
                "context": {"five60/mean/8/c200": {"mrr": 0.7, "r@1": 0.5}},
            },
            "polar_multi_ctx": row | {"retention_drop": 0.01 * s},
            "polar_multi_crops": row,
        }

    out = summarize([seed(0, 0.6, 0.9), seed(1, 0.8, 0.3)])
    assert out["grid"]["multi"]["five60/mean/8/c200"]["mrr"] == pytest.approx(0.7)
    assert out["choice"]["rank_of"] == [1, 2]  # 0.7 beats 0.6 on the mean
    assert out["choice"]["multi_mrr_per_seed"] == [0.6, 0.8]
    assert out["polar_multi_ctx"]["ratio"] == pytest.approx(0.5)
    assert out["polar_multi_ctx"]["retention_drop"] == pytest.approx(0.005)
