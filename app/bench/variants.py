"""Research variants of POLAR training for the benchmark (the keep term now lives in app.ml).

`train_selective` is POLAR's objective plus a "keep" term: on texts that do not contain the
concept's token the updated model must give the base model's embedding,
    L = mean((n(f'(t_i)) - y_i)²) + λ·mean(B²) + μ·mean((n(f'(u_j)) - n(f(u_j)))²),
so the update learns to fire on its own token only (n = L2 normalisation). The keep texts are
the training templates with the placeholder phrase swapped for its bare category word and for
other (unused) placeholder tokens — no data beyond what POLAR already has. Optional: an InfoNCE
term against the user's library embeddings (negatives), weight ν and temperature τ.

The function is exact: Q and K of the last block are untouched, so every text's attention at the
pooled row is computed once and only V's rank-1 change runs per step (app.ml.text helpers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from app.ml.adapter import ConceptAdapter
from app.ml.model import ClipBundle
from app.ml.selective import train_selective

__all__ = ["selective_trainer", "train_selective"]


def selective_trainer(keep: float = 1.0, others: int = 2) -> Callable[..., ConceptAdapter]:
    """A train_adapter-compatible trainer with fixed variant options."""

    def trainer(
        bundle: ClipBundle,
        image_embeddings: torch.Tensor,
        token: str,
        category: str | None,
        **kwargs: Any,
    ) -> ConceptAdapter:
        return train_selective(
            bundle, image_embeddings, token, category, keep=keep, others=others, **kwargs
        )

    return trainer
