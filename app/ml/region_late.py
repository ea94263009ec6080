"""Region embeddings of a ViT image tower by re-running its last blocks on each box's tokens.

Between the two region methods of `app.ml.regions`: "crops" re-encodes each crop (one forward
pass per box) and "pooled" (app.ml.region_pool) restricts only the last block's CLS attention
to the box (nearly free, but on a ViT its regions misled the re-ranking). Here the tower runs
once, up to block L - k; then for each box the last k blocks run again on the CLS token and the
box's patch tokens only (the layer's output at those cells, each keeping what its position
embedding put into it), and ln_post and proj make the box's embedding. k = L is a "token crop"
(the crop of the patch grid, not of the pixels); k = 1 is exactly "pooled".

`own_cls`: each box also gets its own CLS token from the first block on, which in the shared
blocks attends only to itself and the box's cells (one extra token per box in the shared pass,
with its own attention row; the image's own tokens never see them, so the whole-image
embedding is unchanged), so what the CLS token gathers before the last k blocks is the box's
alone; the patch tokens below block L - k have still seen the whole image. With it, k = 0 and
k = 1 give the same embedding (in the last block only the CLS row matters).

The "late" region method (app.ml.regions) runs `late_blocks`: own CLS tokens and k = 1, chosen
on polar-demo-vit's validation seeds (bench/vit_late.py; docs/BENCHMARKS.md, "Late regions").

A box holds the cells whose centre lies inside it (app.ml.region_pool.cell_masks); the full box
reproduces the whole-image embedding. Cost per box: about k/L x (cells in the box / all cells)
of a forward pass, plus one token in each shared block with `own_cls`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, Transformer, VisionTransformer
from PIL import Image

from app.ml.model import ClipBundle
from app.ml.region_pool import (
    _frame_transforms,
    _vit_pool,
    _vit_supported,
    cell_masks,
    visible_frame,
)
from app.ml.text import text_tower

Box = tuple[float, float, float, float]  # left, top, right, bottom as fractions of the image


def supports_late(bundle: ClipBundle) -> bool:
    """Whether this model's regions can be made by late blocks: an open_clip ViT pooling its
    CLS token whose blocks are plain self-attention blocks (one packed in-projection, taking an
    attention mask), with Resize + CenterCrop preprocessing."""
    visual = getattr(bundle.model, "visual", None)
    return (
        isinstance(visual, VisionTransformer)
        and _vit_supported(visual)
        and all(_plain_block(b) for b in visual.transformer.resblocks)
        and _frame_transforms(bundle.preprocess) is not None
    )


def _plain_block(blk: torch.nn.Module) -> bool:
    attn = getattr(blk, "attn", None)
    return (
        type(blk) is ResidualAttentionBlock
        and isinstance(attn, torch.nn.MultiheadAttention)
        and attn._qkv_same_embed_dim
        and attn.bias_k is None
        and not attn.add_zero_attn
    )


def depth(bundle: ClipBundle) -> int:
    """The number of blocks of a ViT image tower."""
    visual = bundle.model.visual
    assert isinstance(visual, VisionTransformer)
    return len(visual.transformer.resblocks)


def _embed(visual: VisionTransformer, pixels: torch.Tensor) -> torch.Tensor:
    """The tokens entering the first block, (B, 1 + H*W, width), batch first."""
    x = visual.conv1(pixels)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    out: torch.Tensor = visual.ln_pre(x)
    return out


def _run(
    tr: Transformer, blocks: Sequence[torch.nn.Module], x: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """x (B, T, C) through `blocks` of `tr`, with an additive attention mask ((T, T) or
    (B * heads, T, T)) or none."""
    if not tr.batch_first:
        x = x.transpose(0, 1)
    for blk in blocks:
        x = blk(x, attn_mask=mask)
    return x if tr.batch_first else x.transpose(0, 1)


def _bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where attention is allowed, -inf elsewhere."""
    return torch.where(allowed, 0.0, -math.inf).to(dtype)


def _block_with_box_cls(
    blk: ResidualAttentionBlock, x: torch.Tensor, cls: torch.Tensor, sel: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block on the image's tokens x (B, T, C), as `blk(x)`, and on the boxes' own CLS
    tokens cls (B, R, C), each attending to itself and its box's cells (sel (R, T - 1)); the
    image's tokens never attend to the boxes'. The projections and the MLP run on all T + R
    tokens at once; the image's attention runs unmasked (the fast kernel), the boxes' on
    their own rows."""
    attn = blk.attn
    assert isinstance(attn, torch.nn.MultiheadAttention)
    t, nr, c = x.shape[1], cls.shape[1], x.shape[2]
    heads = attn.num_heads
    both = torch.cat([x, cls], dim=1)
    qkv = F.linear(blk.ln_1(both), attn.in_proj_weight, attn.in_proj_bias)
    b, n = qkv.shape[0], qkv.shape[1]
    q, k, v = (
        z.reshape(b, n, heads, c // heads).transpose(1, 2) for z in torch.split(qkv, c, dim=-1)
    )
    image = F.scaled_dot_product_attention(q[:, :, :t], k[:, :, :t], v[:, :, :t])
    allowed = torch.zeros(nr, t - 1 + nr, dtype=torch.bool, device=x.device)
    allowed[:, : t - 1] = sel
    allowed[torch.arange(nr), t - 1 + torch.arange(nr)] = True
    keys, values = k[:, :, 1:], v[:, :, 1:]  # the cells and the boxes' CLS tokens
    boxes = F.scaled_dot_product_attention(
        q[:, :, t:], keys, values, attn_mask=_bias(allowed, x.dtype)
    )
    out = attn.out_proj(torch.cat([image, boxes], dim=2).transpose(1, 2).flatten(2))
    both = both + blk.ls_1(out)
    both = both + blk.ls_2(blk.mlp(blk.ln_2(both)))
    return both[:, :t], both[:, t:]


def box_tokens(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For cell masks (R, H*W): each box's token indices into [CLS, cells] (R, 1 + n_max), the
    CLS token (0) first, then its cells in row-major order, padded with the CLS index; and which
    of those are real (R, 1 + n_max) bool."""
    sel = masks > 0
    counts = sel.sum(dim=1)
    n_max = int(counts.max()) if len(counts) else 0
    index = torch.zeros(len(masks), 1 + n_max, dtype=torch.long)
    real = torch.zeros(len(masks), 1 + n_max, dtype=torch.bool)
    real[:, 0] = True
    for r in range(len(masks)):
        cells = torch.nonzero(sel[r]).flatten() + 1
        index[r, 1 : 1 + len(cells)] = cells
        real[r, 1 : 1 + len(cells)] = True
    return index, real


def late_features(
    visual: VisionTransformer, pixels: torch.Tensor, masks: torch.Tensor, blocks: int, own_cls: bool
) -> torch.Tensor:
    """Unnormalised embeddings (B, 1 + R, D) of preprocessed images: the whole image, then each
    box of `masks` (R, H*W, the same boxes for every image) with its last `blocks` blocks re-run
    on the box's tokens (module docstring)."""
    tr = visual.transformer
    n_blocks = len(tr.resblocks)
    if not 0 <= blocks <= n_blocks or (blocks == 0 and not own_cls):
        raise ValueError(f"late blocks must be in 1..{n_blocks} (0 only with own_cls)")
    shared = n_blocks - blocks
    x = _embed(visual, pixels)
    b, t, c = x.shape
    nr = len(masks)
    sel = masks.to(x.device) > 0
    if own_cls and shared and nr:
        # one extra CLS token per box, attending to itself and the box's cells only
        cls = x[:, :1].expand(b, nr, c)
        for blk in tr.resblocks[:shared]:
            assert isinstance(blk, ResidualAttentionBlock)
            x, cls = _block_with_box_cls(blk, x, cls, sel)
    else:
        x = _run(tr, tr.resblocks[:shared], x, None)
        cls = x[:, :1].expand(b, nr, c)
    proj = visual.proj
    assert isinstance(proj, torch.Tensor)
    if not blocks:  # each box's own CLS token as it left the shared blocks
        out: torch.Tensor = visual.ln_post(torch.cat([x[:, :1], cls], dim=1)) @ proj
        return out
    # The last block matters only for the CLS token: the others give it keys and values
    # (app.ml.region_pool._vit_pool, all cells of the sequence; "pooled" is blocks = 1).
    middle = tr.resblocks[shared:-1]
    every = torch.ones(1, t - 1, dtype=torch.float64, device=x.device)
    parts = [_vit_pool(visual, _run(tr, middle, x, None), every)]  # the whole image
    if nr:
        index, real = box_tokens(masks.cpu())
        index, real = index.to(x.device), real.to(x.device)
        seq = x[:, index]  # (B, R, 1 + n, C)
        seq = torch.cat([cls[:, :, None], seq[:, :, 1:]], dim=2).reshape(b * nr, -1, c)
        mask = None
        n = real.shape[1]
        if len(middle) and not bool(real.all()):  # boxes of unequal size: padding masked out
            heads = tr.resblocks[0].attn.num_heads
            bias = _bias(real, x.dtype)[None, :, None, None, :]  # (1, R, 1, 1, n)
            mask = bias.expand(b, nr, heads, n, n).reshape(b * nr * heads, n, n)
        seq = _run(tr, middle, seq, mask).reshape(b, nr, n, c)
        parts += [_vit_pool(visual, seq[:, r], real[r : r + 1, 1:].double()) for r in range(nr)]
    return torch.cat(parts, dim=1)


def encode_late_regions(
    bundle: ClipBundle,
    images: Sequence[Image.Image],
    boxes: Sequence[Box],
    blocks: int,
    own_cls: bool,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """One forward pass per image plus the late blocks per box: its unit whole-image embedding
    (N, D) and the unit embeddings of its boxes (N, R, D), float32."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if not supports_late(bundle):
        raise ValueError("late regions need an open_clip ViT with CLS pooling; use crops")
    visual = bundle.model.visual
    assert isinstance(visual, VisionTransformer)
    d = bundle.embed_dim
    gh, gw = (int(v) for v in visual.grid_size)
    dtype = text_tower(bundle.model).dtype
    whole = np.zeros((len(images), d), dtype=np.float32)
    regions = np.zeros((len(images), len(boxes), d), dtype=np.float32)
    masks: dict[tuple[int, int], torch.Tensor] = {}
    for start in range(0, len(images), batch_size):
        batch = range(start, min(start + batch_size, len(images)))
        by_size: dict[tuple[int, int], list[int]] = {}
        for i in batch:  # images of one size share their cells: one batch each
            by_size.setdefault(images[i].size, []).append(i)
        for size, rows in by_size.items():
            if size not in masks:
                masks[size] = cell_masks(boxes, visible_frame(bundle.preprocess, *size), (gh, gw))
            pixels = torch.stack([bundle.preprocess(images[i]) for i in rows])
            with torch.inference_mode():
                feats = late_features(
                    visual, pixels.to(bundle.device, dtype), masks[size], blocks, own_cls
                )
                f = F.normalize(feats.float(), dim=-1).cpu().numpy()
            whole[rows], regions[rows] = f[:, 0], f[:, 1:]
    return whole, regions


# The variant the "late" method runs, chosen on the validation seeds (bench/vit_late.py): each
# box gets its own CLS token, and only the last block is re-run on the box's tokens (where only
# the CLS row matters: k = 0 with own CLS tokens is the same embedding). Re-running more blocks
# (2-4 of polar-demo-vit's 4) measured no better. A change here needs a new stored-layout
# suffix (app.ml.regions._SUFFIX), so that regions made the old way go stale.
LATE_BLOCKS = 1
OWN_CLS = True


def late_blocks(bundle: ClipBundle) -> tuple[int, bool]:
    """(blocks re-run per box, own_cls) of the "late" method on this ViT."""
    return min(LATE_BLOCKS, depth(bundle)), OWN_CLS
