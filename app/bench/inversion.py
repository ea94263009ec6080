"""Textual-inversion baseline: learn the placeholder's input embedding, the text tower frozen.

Same photos, same regression loss and the same Adam step budget as POLAR; only one (d,) input
vector per concept is trained, so the model itself (and general retention) never changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from app.ml.model import ClipBundle
from app.ml.text import TextTower, pool_indices, project, run_blocks, text_tower, truncate
from app.ml.train import training_texts


def token_id(bundle: ClipBundle, token: str) -> int:
    """The vocabulary id of a single-BPE placeholder token."""
    ids = bundle.tokenizer([token])[0]  # (C,) start, token, end, zero padding
    used = ids[ids != 0]
    if used.numel() != 3:
        raise ValueError(f"placeholder {token!r} is not a single token")
    return int(used[1])


def forward_with_vectors(
    tower: TextTower, tokens: torch.Tensor, vectors: Mapping[int, torch.Tensor]
) -> torch.Tensor:
    """Unnormalised text features, (B, D), with the input embedding of some token ids replaced."""
    tokens = truncate(tower, tokens)
    x = tower.token_embedding(tokens).to(tower.dtype)  # (B, L, d)
    for tid, vec in vectors.items():
        hit = (tokens == tid).unsqueeze(-1)  # (B, L, 1)
        x = torch.where(hit, vec.to(x.dtype), x)
    length = tokens.shape[1]
    x = x + tower.positional_embedding[:length].to(tower.dtype)
    mask = None if tower.attn_mask is None else tower.attn_mask[:length, :length]
    x = tower.ln_final(run_blocks(tower.blocks, x, mask))  # (B, L, d)
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    return project(tower, x[rows, pool_indices(tower, tokens)])


def train_inversion(
    bundle: ClipBundle,
    image_embeddings: torch.Tensor,
    token: str,
    category: str | None,
    *,
    steps: int = 500,
    lr: float = 1e-3,
    seed: int = 0,
) -> torch.Tensor:
    """The learned input embedding of `token`, (d,), fitted like POLAR (templates, MSE, Adam)."""
    tower = text_tower(bundle.model)
    target = F.normalize(image_embeddings.to(bundle.device, tower.dtype), dim=-1)  # (N, D)
    texts = training_texts(token, category, target.shape[0], seed)
    tokens = bundle.tokenizer(texts).to(bundle.device)  # (N, C)
    tid = token_id(bundle, token)
    with torch.no_grad():
        init = tower.token_embedding.weight[tid].detach().clone()  # start from the token itself
    vec = init.to(tower.dtype).requires_grad_(True)
    opt = torch.optim.Adam([vec], lr=lr)
    for _ in range(steps):
        f = forward_with_vectors(tower, tokens, {tid: vec})
        loss = (F.normalize(f, dim=-1) - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)  # = loss.backward(), which torch leaves unannotated
        opt.step()
    return vec.detach()


def encode_with_vectors(
    bundle: ClipBundle, texts: Sequence[str], vectors: Mapping[int, torch.Tensor], batch: int = 256
) -> np.ndarray:
    """L2-normalised text embeddings, (N, D) float32, with learned token embeddings in place."""
    tower = text_tower(bundle.model)
    out = [np.zeros((0, bundle.embed_dim), dtype=np.float32)]
    for start in range(0, len(texts), batch):
        tokens = bundle.tokenizer(list(texts[start : start + batch])).to(bundle.device)
        with torch.inference_mode():
            f = forward_with_vectors(tower, tokens, vectors)
            out.append(F.normalize(f.float(), dim=-1).cpu().numpy())
    return np.concatenate(out)
