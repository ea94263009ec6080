"""Research variants of POLAR training, written as options here before any change to app.ml.

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
import torch.nn.functional as F

from app.ml.adapter import ConceptAdapter
from app.ml.model import ClipBundle
from app.ml.text import (
    PooledAttention,
    TextTower,
    block_tail,
    head_out,
    pool_indices,
    pooled_attention,
    prefix_states,
    rank_delta,
    text_tower,
    truncate,
)
from app.ml.tokens import pick_token
from app.ml.train import TEMPLATES, init_factors, placeholder_phrase, training_texts


def frozen_rows(tower: TextTower, tokens: torch.Tensor) -> PooledAttention:
    """Everything of a text batch that POLAR cannot change: the last block's pooled attention."""
    with torch.no_grad():
        tokens = truncate(tower, tokens)
        x, mask = prefix_states(tower, tokens)  # (B, L, d)
        return pooled_attention(tower.last, x, pool_indices(tower, tokens), mask)


def updated_features(
    tower: TextTower, att: PooledAttention, a: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """Unnormalised features under V + B·Â, (B, D); differentiable in a and b."""
    a_hat = (a / a.norm())[None]  # (1, d)
    o = att.o + rank_delta(att.u, a_hat, b[None])  # (B, d)
    return head_out(tower, block_tail(tower.last, att, o))


def keep_texts(bundle: ClipBundle, token: str, category: str | None, others: int) -> list[str]:
    """Templates without this concept: the bare category, and `others` foreign placeholders."""
    vocab = text_tower(bundle.model).token_embedding.num_embeddings
    taken = {token, "sks"}
    phrases = [category] if category else []
    for _ in range(others):
        foreign = pick_token(bundle.tokenizer, vocab, taken, "distinct")
        taken.add(foreign)
        phrases.append(placeholder_phrase(foreign, category))
    if token != "sks":
        phrases.append(placeholder_phrase("sks", category))
    return [t.replace("*", p) for p in phrases for t in TEMPLATES]


def train_selective(
    bundle: ClipBundle,
    image_embeddings: torch.Tensor,
    token: str,
    category: str | None,
    *,
    lam: float,
    steps: int = 500,
    lr: float = 1e-3,
    seed: int = 0,
    keep: float = 1.0,
    others: int = 2,
    library: torch.Tensor | None = None,
    contrast: float = 0.0,
    temperature: float = 0.05,
) -> ConceptAdapter:
    """POLAR with the keep term (weight `keep`) and an optional library-contrastive term."""
    tower = text_tower(bundle.model)
    dtype, dev = tower.dtype, bundle.device
    target = F.normalize(image_embeddings.to(dev, dtype), dim=-1)  # (N, D)
    texts = training_texts(token, category, target.shape[0], seed)
    pos = frozen_rows(tower, bundle.tokenizer(texts).to(dev))
    neg_texts = keep_texts(bundle, token, category, others) if keep > 0 else []
    neg = frozen_rows(tower, bundle.tokenizer(neg_texts).to(dev)) if neg_texts else None
    base = None
    if neg is not None:
        with torch.no_grad():
            base = F.normalize(head_out(tower, block_tail(tower.last, neg, neg.o)), dim=-1)
    lib = None if library is None else F.normalize(library.to(dev, dtype), dim=-1)  # (M, D)
    a, b = init_factors(tower.width, seed, dtype, dev)
    opt = torch.optim.Adam([a, b], lr=lr)

    def objective() -> torch.Tensor:
        f = F.normalize(updated_features(tower, pos, a, b), dim=-1)  # (N, D)
        loss = (f - target).pow(2).mean() + lam * b.pow(2).mean()
        if neg is not None and base is not None:
            g = F.normalize(updated_features(tower, neg, a, b), dim=-1)
            loss = loss + keep * (g - base).pow(2).mean()
        if lib is not None and contrast > 0:
            loss = loss + contrast * _library_nce(f, target, lib, temperature)
        return loss

    for _ in range(steps):
        loss = objective()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = float(objective())
    return ConceptAdapter(
        b=b.detach().to("cpu", torch.float32),
        a=a.detach().to("cpu", torch.float32),
        fingerprint=bundle.fingerprint,
        token=token,
        category=category,
        lam=lam,
        steps=steps,
        lr=lr,
        final_loss=final,
    )


def _library_nce(
    f: torch.Tensor, target: torch.Tensor, library: torch.Tensor, temperature: float
) -> torch.Tensor:
    """InfoNCE: each text's own photo against the library images as negatives."""
    positive = (f * target).sum(-1, keepdim=True)  # (N, 1)
    logits = torch.cat([positive, f @ library.T], dim=1) / temperature  # (N, 1 + M)
    labels = torch.zeros(f.shape[0], dtype=torch.long, device=f.device)
    return F.cross_entropy(logits, labels)


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
