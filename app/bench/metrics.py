"""Retrieval metrics over the whole pool (numpy only): mRR, R@k, untruncated AP.

Ties count against the ground truth: a non-matching image with the same score as a ground-truth
image ranks before it, so a constant scorer gets no credit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RECALL_KS = (1, 5, 10)


def gt_ranks(scores: np.ndarray, gt: Sequence[int]) -> np.ndarray:
    """1-based ranks of one query's ground-truth images, ascending, (G,)."""
    assert scores.ndim == 1 and len(gt) > 0
    idx = np.unique(np.asarray(gt, dtype=np.int64))
    is_gt = np.zeros(scores.shape[0], dtype=bool)
    is_gt[idx] = True
    others = np.sort(scores[~is_gt])  # ascending, for searchsorted
    gt_scores = np.sort(scores[idx])[::-1]  # best ground truth first
    beaten_by = others.size - np.searchsorted(others, gt_scores, side="left")  # others >= score
    return beaten_by + np.arange(1, idx.size + 1)


def average_precision(ranks: np.ndarray) -> float:
    """Untruncated AP of one query from its ascending ground-truth ranks."""
    hits = np.arange(1, ranks.size + 1)
    return float((hits / ranks).mean())


def query_metrics(scores: np.ndarray, gt: Sequence[int]) -> dict[str, float]:
    """RR, R@k (a ground truth in the top k) and AP of one query."""
    ranks = gt_ranks(scores, gt)
    out = {"mrr": 1.0 / float(ranks[0])}
    for k in RECALL_KS:
        out[f"r@{k}"] = float(ranks[0] <= k)
    out["map"] = average_precision(ranks)
    return out


def retrieval_metrics(scores: np.ndarray, gts: Sequence[Sequence[int]]) -> dict[str, float]:
    """Means over queries of query_metrics; scores (Q, N), one ground-truth list per query."""
    assert scores.ndim == 2 and scores.shape[0] == len(gts)
    if not gts:
        return {}
    rows = [query_metrics(scores[i], gt) for i, gt in enumerate(gts)]
    return {key: float(np.mean([r[key] for r in rows])) for key in rows[0]} | {
        "queries": float(len(rows))
    }


def caption_recall(caption_emb: np.ndarray, image_emb: np.ndarray, k: int = 10) -> float:
    """Caption -> own image R@k: caption i's ground truth is image i (retention metric)."""
    assert caption_emb.shape[0] == image_emb.shape[0]
    scores = caption_emb @ image_emb.T  # (N, N)
    own = np.diag(scores)[:, None]
    ranks = (scores >= own).sum(axis=1)  # ties count against the caption's own image
    return float((ranks <= k).mean())
