"""The open_clip text tower seen as parts, so the last block can be run functionally."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import LayerScale, ResidualAttentionBlock, TextTransformer
from torch import nn


@dataclass(frozen=True)
class TextTower:
    """References (never copies) to the modules of a CLIP or CustomTextCLIP text encoder."""

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor  # (C, d)
    blocks: nn.ModuleList  # ResidualAttentionBlock × layers, batch-first
    attn_mask: torch.Tensor | None  # (C, C) additive causal mask, None when bidirectional
    ln_final: nn.Module
    text_projection: torch.Tensor | nn.Linear | None  # (d, D) matrix, Linear or nothing
    pool_type: str  # "argmax" | "eos" | "first" | "last"
    eos_id: int | None  # used by pool_type "eos"
    heads: int
    width: int  # d
    embed_dim: int  # D
    context_length: int

    @property
    def last(self) -> ResidualAttentionBlock:
        """The block whose V projection POLAR updates."""
        block = self.blocks[-1]
        assert isinstance(block, ResidualAttentionBlock)
        return block

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the tower (that of its weights)."""
        dtype: torch.dtype = self.last.attn.in_proj_weight.dtype
        return dtype

    @property
    def can_truncate(self) -> bool:
        """True when positions after the pooled token cannot change the pooled output."""
        return self.attn_mask is not None and self.pool_type in ("argmax", "eos", "first")


def text_tower(model: nn.Module) -> TextTower:
    """Find the text encoder of an open_clip model (`model.transformer` or `model.text`)."""
    text = getattr(model, "text", None)
    src: Any  # open_clip modules are typed loosely (attributes resolve to Tensor | Module)
    if isinstance(text, TextTransformer):
        if text.cls_emb is not None or text.use_pad_mask:
            raise NotImplementedError("text towers with a CLS token or pad mask are not supported")
        src = text
        pool_type, eos_id = text.pool_type, text.eos_id
    elif hasattr(model, "transformer") and hasattr(model, "token_embedding"):
        src = model
        pool_type = str(getattr(model, "text_pool_type", "argmax"))
        eos_id = getattr(model, "text_eos_id", None)
    else:
        raise NotImplementedError(f"unsupported text tower in {type(model).__name__}")
    transformer = src.transformer
    blocks = transformer.resblocks
    if not all(isinstance(b, ResidualAttentionBlock) for b in blocks):
        raise NotImplementedError("only default open_clip residual attention blocks are supported")
    if not getattr(transformer, "batch_first", True) or hasattr(blocks[-1], "ln_1_kv"):
        raise NotImplementedError("the last text block must be batch-first self-attention")
    if pool_type not in ("argmax", "eos", "first", "last"):
        raise NotImplementedError(f"text pool_type {pool_type!r} is not supported")
    for ls in (blocks[-1].ls_1, blocks[-1].ls_2):
        # Layer scale must be linear for the decomposition used by training.
        if not isinstance(ls, nn.Identity | LayerScale):
            raise NotImplementedError(f"unsupported layer-scale module {type(ls).__name__}")
    proj = src.text_projection
    width = int(transformer.width)
    if isinstance(proj, nn.Linear):
        embed_dim = proj.out_features
    elif proj is None:
        embed_dim = width
    else:
        embed_dim = int(proj.shape[1])
    return TextTower(
        token_embedding=src.token_embedding,
        positional_embedding=src.positional_embedding,
        blocks=blocks,
        attn_mask=src.attn_mask,
        ln_final=src.ln_final,
        text_projection=proj,
        pool_type=pool_type,
        eos_id=None if eos_id is None else int(eos_id),
        heads=int(blocks[-1].attn.num_heads),
        width=width,
        embed_dim=embed_dim,
        context_length=int(src.positional_embedding.shape[0]),
    )


def pool_indices(tower: TextTower, tokens: torch.Tensor) -> torch.Tensor:
    """Index of the pooled (end-of-text) position of each sequence, (B,) int64."""
    b, length = tokens.shape
    if tower.pool_type == "argmax":
        return tokens.argmax(dim=-1)
    if tower.pool_type == "eos":
        assert tower.eos_id is not None
        return torch.eq(tokens, tower.eos_id).int().argmax(dim=-1)
    if tower.pool_type == "first":
        return torch.zeros(b, dtype=torch.long, device=tokens.device)
    return torch.full((b,), length - 1, dtype=torch.long, device=tokens.device)


def truncate(tower: TextTower, tokens: torch.Tensor) -> torch.Tensor:
    """Drop the columns after the last pooled token of the batch (exact under a causal mask)."""
    if not tower.can_truncate:
        return tokens
    keep = int(pool_indices(tower, tokens).max()) + 1
    return tokens[:, :keep]


def embed(tower: TextTower, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token + position embeddings and the matching causal mask for a (B, L) batch."""
    length = tokens.shape[1]
    x = tower.token_embedding(tokens).to(tower.dtype)  # (B, L, d)
    x = x + tower.positional_embedding[:length].to(tower.dtype)
    mask = None if tower.attn_mask is None else tower.attn_mask[:length, :length]
    return x, mask


def run_blocks(
    blocks: nn.ModuleList | list[nn.Module], x: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Run open_clip blocks unchanged, (B, L, d) -> (B, L, d)."""
    for block in blocks:
        x = block(x, attn_mask=mask)
    return x


def prefix_states(
    tower: TextTower, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Input of the last block: everything before it, (B, L, d), and the mask used."""
    x, mask = embed(tower, tokens)
    return run_blocks(list(tower.blocks)[:-1], x, mask), mask


def project(tower: TextTower, x: torch.Tensor) -> torch.Tensor:
    """Text projection of pooled rows, (B, d) -> (B, D)."""
    proj = tower.text_projection
    if proj is None:
        return x
    if isinstance(proj, nn.Linear):
        projected: torch.Tensor = proj(x)
        return projected
    return x @ proj


@dataclass(frozen=True)
class PooledAttention:
    """The last block's attention at the pooled row, under the base Q and K."""

    x: torch.Tensor  # (B, d) residual stream entering the last block
    u: torch.Tensor  # (B, H, d) per-head attention-weighted LN'd inputs Σ_j P_h[p, j] ln_1(x_j)
    o: torch.Tensor  # (B, d) base attention output before out_proj, V bias included


def pooled_attention(
    block: ResidualAttentionBlock, x: torch.Tensor, pool: torch.Tensor, mask: torch.Tensor | None
) -> PooledAttention:
    """Attention probabilities of the pooled rows and what they weight; Q, K never change."""
    b, length, d = x.shape
    heads = block.attn.num_heads
    dh = d // heads
    rows = torch.arange(b, device=x.device)
    h = block.ln_1(x)  # (B, L, d)
    w, bias = block.attn.in_proj_weight, block.attn.in_proj_bias  # (3d, d), (3d,)
    bq, bk, bv = (None, None, None) if bias is None else bias.chunk(3)
    q = F.linear(h[rows, pool], w[:d], bq).view(b, heads, 1, dh)  # (B, H, 1, dh)
    k = F.linear(h, w[d : 2 * d], bk).view(b, length, heads, dh).transpose(1, 2)  # (B, H, L, dh)
    v = F.linear(h, w[2 * d :], bv).view(b, length, heads, dh).transpose(1, 2)  # (B, H, L, dh)
    scores = (q @ k.transpose(-1, -2)) / dh**0.5  # (B, H, 1, L)
    if mask is not None:
        scores = scores + mask.to(scores.dtype)[pool][:, None, None, :]
    p = scores.softmax(dim=-1)  # (B, H, 1, L)
    o = (p @ v).reshape(b, d)  # (B, d)
    u = (p @ h[:, None]).squeeze(2)  # (B, H, d)
    return PooledAttention(x=x[rows, pool], u=u, o=o)


def rank_delta(u: torch.Tensor, a_hat: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Change of the attention output from V' = V + Σ_k B_k Â_k, (B, d).

    u (B, H, d); a_hat (K, d) unit rows; b (K, d). Per head h the output moves by
    Σ_j P_h[p, j] Σ_k B_k[h] (Â_k · h_j) = Σ_k B_k[h] (Â_k · u_h): exact, the V bias is
    untouched and stays in the base output.
    """
    bsz, heads, d = u.shape
    s = torch.einsum("nhd,kd->nkh", u, a_hat)  # (B, K, H)
    bh = b.view(b.shape[0], heads, d // heads)  # (K, H, dh)
    return torch.einsum("nkh,khe->nhe", s, bh).reshape(bsz, d)


def block_tail(
    block: ResidualAttentionBlock, att: PooledAttention, o: torch.Tensor
) -> torch.Tensor:
    """Rest of the last block at the pooled rows given its attention output, (B, d)."""
    r: torch.Tensor = att.x + block.ls_1(block.attn.out_proj(o))
    out: torch.Tensor = r + block.ls_2(block.mlp(block.ln_2(r)))
    return out


def encode_tokens(
    tower: TextTower,
    tokens: torch.Tensor,
    a_hat: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unnormalised text features, (B, D); with (K, d) factors the last V is V + Σ B_k Â_k.

    Without factors the open_clip blocks run unchanged (the base model, bit for bit).
    """
    tokens = truncate(tower, tokens)
    pool = pool_indices(tower, tokens)
    x, mask = prefix_states(tower, tokens)  # (B, L, d)
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    if a_hat is None or b is None or a_hat.shape[0] == 0:
        # Same op order as open_clip (final norm over all rows, then pool).
        x = tower.ln_final(tower.last(x, attn_mask=mask))
        return project(tower, x[rows, pool])
    att = pooled_attention(tower.last, x, pool, mask)
    o = att.o + rank_delta(att.u, a_hat.to(att.u), b.to(att.u))
    return head_out(tower, block_tail(tower.last, att, o))


def head_out(tower: TextTower, x: torch.Tensor) -> torch.Tensor:
    """Final norm and projection of pooled rows, (B, d) -> (B, D)."""
    return project(tower, tower.ln_final(x))
