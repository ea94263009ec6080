"""Region embeddings pooled from the image tower's own spatial features, in one forward pass.

`app.ml.regions` embeds a region by cropping the image and encoding the crop: R more forward
passes per image. Here the tower runs once per image and each box re-runs only the tower's final
pooling, restricted to the box:

  ViT (CLS-token pooling): the last block's attention row of the CLS token, its keys limited to
      the CLS token and the box's patch tokens, then that block's MLP, ln_post and proj. The
      trunk below the last block is shared, so a box costs one attention row, not a forward.
  ModifiedResNet (attention pool): the attention pool with its query the mean of the box's
      cells (plus the pool's mean-token position embedding) and its keys that query and the
      box's cells (each with its own position embedding).

A box holds the cells (patches) whose centre lies inside it; the others are masked out of the
last step entirely, so the box (0, 0, 1, 1) reproduces the whole-image embedding exactly. (Cells
weighted by the fraction the box covers were tried too: on the demo model's 2x2 grid a 60 %
corner then still gives its neighbours a fifth of their weight, and two-concept mRR on
validation fell from 0.67 to 0.45.) Cells are located in the frame the model sees: boxes are
fractions of the original image, mapped through the preprocessing's resize and centre crop.

Only the final pooling step is box-restricted: for a ViT the tokens below the last block have
already mixed information from the whole image, and a ResNet cell's receptive field is wide.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from PIL import Image
from torch import nn
from torchvision import transforms as T

from app.ml.model import ClipBundle
from app.ml.text import text_tower

Box = tuple[float, float, float, float]  # left, top, right, bottom as fractions of the image
Frame = Box  # the part of the original image the model sees, as fractions


def _vit_supported(visual: VisionTransformer) -> bool:
    return (
        visual.attn_pool is None
        and visual.pool_type == "tok"
        and not visual.final_ln_after_pool
        and visual.proj is not None
        and isinstance(visual.transformer.resblocks[-1], ResidualAttentionBlock)
        and not hasattr(visual.transformer.resblocks[-1], "ln_1_kv")
    )


def _frame_transforms(preprocess: object) -> list[nn.Module] | None:
    """The preprocessing's geometric steps if all are understood (Resize, CenterCrop)."""
    steps = getattr(preprocess, "transforms", None)
    if steps is None:
        return None
    out = []
    for t in steps:
        if isinstance(t, T.Resize | T.CenterCrop):
            out.append(t)
        elif any(w in type(t).__name__ for w in ("Resize", "Crop", "Pad", "Affine", "Flip")):
            return None  # a geometric step this module does not map
    return out


def tower_family(bundle: ClipBundle) -> str:
    """The image tower's family, as the region defaults know it: "vit" (open_clip's
    VisionTransformer), "modified_resnet" (OpenAI's RN50 layout, the demo model's), or "other"
    (timm towers and anything else)."""
    visual = getattr(bundle.model, "visual", None)
    if isinstance(visual, VisionTransformer):
        return "vit"
    if isinstance(visual, ModifiedResNet):
        return "modified_resnet"
    return "other"


def supports_pooling(bundle: ClipBundle) -> bool:
    """Whether this model's regions can be pooled (a ViT pooling its CLS token or a
    ModifiedResNet, with Resize + CenterCrop preprocessing); otherwise use crops."""
    visual = getattr(bundle.model, "visual", None)
    if isinstance(visual, VisionTransformer):
        ok = _vit_supported(visual)
    else:
        ok = isinstance(visual, ModifiedResNet)
    return ok and _frame_transforms(bundle.preprocess) is not None


def visible_frame(preprocess: object, width: int, height: int) -> Frame:
    """The part of a width x height image that survives the preprocessing's resize and centre
    crop, as fractions (torchvision's own size arithmetic)."""
    steps = _frame_transforms(preprocess)
    if steps is None:
        raise ValueError("the preprocessing has geometric steps other than Resize and CenterCrop")
    # Track the visible window in original pixels and the current (resized) image size.
    x0, y0, x1, y1 = 0.0, 0.0, float(width), float(height)
    cur_w, cur_h = width, height
    for t in steps:
        if isinstance(t, T.Resize):
            size = t.size
            if isinstance(size, int) or (isinstance(size, Sequence) and len(size) == 1):
                s = size if isinstance(size, int) else size[0]
                short, long_ = min(cur_w, cur_h), max(cur_w, cur_h)
                new_short, new_long = s, int(s * long_ / short)
                if t.max_size is not None and new_long > t.max_size:
                    new_short, new_long = int(t.max_size * new_short / new_long), t.max_size
                new_w, new_h = (new_short, new_long) if cur_w <= cur_h else (new_long, new_short)
            else:
                new_h, new_w = int(size[0]), int(size[1])
            cur_w, cur_h = new_w, new_h
        else:  # CenterCrop: torchvision rounds the offsets
            ch, cw = (int(v) for v in t.size)  # type: ignore[union-attr]
            top = round((cur_h - ch) / 2.0)
            left = round((cur_w - cw) / 2.0)
            sx, sy = (x1 - x0) / cur_w, (y1 - y0) / cur_h
            nx0, ny0 = x0 + left * sx, y0 + top * sy
            x0, y0, x1, y1 = nx0, ny0, nx0 + cw * sx, ny0 + ch * sy
            cur_w, cur_h = cw, ch
    return (x0 / width, y0 / height, x1 / width, y1 / height)


def cell_masks(boxes: Sequence[Box], frame: Frame, grid: tuple[int, int]) -> torch.Tensor:
    """(R, H*W) float64 0/1 masks: the grid cells (row-major, H rows) whose centre lies in each box.

    The grid spans `frame` (fractions of the original image). Along an axis where the box holds
    no cell centre (a thin box, or one outside the frame) it takes the cell nearest its middle."""
    fx0, fy0, fx1, fy1 = frame
    out = torch.zeros(len(boxes), grid[0] * grid[1], dtype=torch.float64)
    for r, (left, top, right, bottom) in enumerate(boxes):
        # the box in grid units of the frame: cell (i, j) spans [j, j + 1] x [i, i + 1]
        cols = _axis_mask((left - fx0) / (fx1 - fx0), (right - fx0) / (fx1 - fx0), grid[1])
        rows = _axis_mask((top - fy0) / (fy1 - fy0), (bottom - fy0) / (fy1 - fy0), grid[0])
        out[r] = (rows[:, None] * cols[None, :]).flatten()
    return out


def _axis_mask(lo: float, hi: float, n: int) -> torch.Tensor:
    """(n,) 0/1: the cells of one axis (span [0, 1] = n cells) whose centre lies in [lo, hi]."""
    mask = torch.tensor([float(lo * n <= j + 0.5 <= hi * n) for j in range(n)], dtype=torch.float64)
    if not mask.any():
        mask[min(max(int((lo + hi) / 2 * n), 0), n - 1)] = 1.0
    return mask


def _log_bias(masks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where a mask is set, -inf elsewhere, in the compute dtype."""
    return torch.where(masks > 0, 0.0, -math.inf).to(dtype)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, bias: torch.Tensor
) -> torch.Tensor:
    """Multi-head attention of q (B, Q, C) over k, v (B, Q, L, C) - each query its own keys -
    with an additive bias (B or 1, Q, L); returns (B, Q, C)."""
    b, nq, c = q.shape
    hd = c // heads
    qh = q.reshape(b, nq, heads, hd).permute(0, 2, 1, 3)[:, :, :, None, :]  # (B, h, Q, 1, hd)
    kh = k.reshape(b, nq, -1, heads, hd).permute(0, 3, 1, 2, 4)  # (B, h, Q, L, hd)
    vh = v.reshape(b, nq, -1, heads, hd).permute(0, 3, 1, 2, 4)
    logits = (qh * kh).sum(-1) / math.sqrt(hd) + bias[:, None]  # (B, h, Q, L)
    att = logits.softmax(dim=-1)
    out = (att[..., None] * vh).sum(-2)  # (B, h, Q, hd)
    return out.permute(0, 2, 1, 3).reshape(b, nq, c)


def _vit_tokens(visual: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Tokens entering the last block, (B, 1 + H*W, width), batch first."""
    x = visual.conv1(x)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    x = visual.ln_pre(x)
    tr = visual.transformer
    if not tr.batch_first:
        x = x.transpose(0, 1)
    for blk in tr.resblocks[:-1]:
        x = blk(x)
    return x if tr.batch_first else x.transpose(0, 1)


def _vit_pool(visual: VisionTransformer, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B, Q, D) projections of the CLS token after the last block with its attention limited
    per query row to the cells `masks` (Q, H*W) marks."""
    blk = visual.transformer.resblocks[-1]
    attn = blk.attn
    assert isinstance(attn, nn.MultiheadAttention)
    b, length, c = x.shape
    nq = masks.shape[0]
    h = blk.ln_1(x)
    w_in, b_in = attn.in_proj_weight, attn.in_proj_bias
    q = F.linear(h[:, :1], w_in[:c], None if b_in is None else b_in[:c])  # (B, 1, C)
    kv = F.linear(h, w_in[c:], None if b_in is None else b_in[c:])  # (B, L, 2C)
    k, v = kv[..., :c], kv[..., c:]
    bias = torch.cat([masks.new_ones(nq, 1), masks], dim=1)  # CLS always attended
    bias = _log_bias(bias, x.dtype)[None]  # (1, Q, L)
    out = _attend(
        q.expand(b, nq, c),
        k[:, None].expand(b, nq, length, c),
        v[:, None].expand(b, nq, length, c),
        attn.num_heads,
        bias,
    )
    out = attn.out_proj(out)
    y = x[:, :1] + blk.ls_1(out)  # (B, Q, C)
    y = y + blk.ls_2(blk.mlp(blk.ln_2(y)))
    proj = visual.proj
    assert isinstance(proj, torch.Tensor)
    out_: torch.Tensor = visual.ln_post(y) @ proj
    return out_


def _resnet_pool(visual: ModifiedResNet, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B, Q, D): the attention pool of the feature map x (B, C, H, W) per mask row (Q, H*W)."""
    pool = visual.attnpool
    b, c, gh, gw = x.shape
    nq = masks.shape[0]
    cells = x.reshape(b, c, gh * gw).permute(0, 2, 1)  # (B, HW, C)
    pos = pool.positional_embedding.to(x.dtype)
    w = masks.to(x.dtype)
    mean = (w @ cells) / w.sum(dim=1, keepdim=True).clamp_min(1e-12)[None, :, :]  # (B, Q, C)
    query = mean + pos[0]
    tokens = cells + pos[1:]  # (B, HW, C)
    q = pool.q_proj(query)
    k0, v0 = pool.k_proj(query), pool.v_proj(query)  # each query's own mean token
    kc, vc = pool.k_proj(tokens), pool.v_proj(tokens)
    k = torch.cat([k0[:, :, None], kc[:, None].expand(b, nq, gh * gw, c)], dim=2)
    v = torch.cat([v0[:, :, None], vc[:, None].expand(b, nq, gh * gw, c)], dim=2)
    bias = torch.cat([masks.new_ones(nq, 1), masks], dim=1)
    out = _attend(q, k, v, pool.num_heads, _log_bias(bias, x.dtype)[None])
    pooled: torch.Tensor = pool.c_proj(out)
    return pooled


def _grid(bundle: ClipBundle) -> tuple[int, int]:
    visual = bundle.model.visual
    if isinstance(visual, VisionTransformer):
        gh, gw = visual.grid_size
        return int(gh), int(gw)
    assert isinstance(visual, ModifiedResNet)
    side = round(math.sqrt(visual.attnpool.positional_embedding.shape[0] - 1))
    return side, side


def pool_features(bundle: ClipBundle, pixels: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Unnormalised embeddings (B, Q, D) of preprocessed images, each pooled Q ways: row q of
    `masks` (B or 1, Q, H*W) marks the cells query q pools (all ones = the whole image, as
    `model.encode_image`)."""
    visual = bundle.model.visual
    pool: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    if isinstance(visual, VisionTransformer):
        x = _vit_tokens(visual, pixels)
        pool = partial(_vit_pool, visual)
    else:
        assert isinstance(visual, ModifiedResNet)
        x = visual.stem(pixels)
        x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
        pool = partial(_resnet_pool, visual)
    if len(masks) == 1:  # the same boxes for the whole batch
        return pool(x, masks[0])
    return torch.cat([pool(x[i : i + 1], masks[i]) for i in range(len(x))])


def encode_with_regions(
    bundle: ClipBundle,
    images: Sequence[Image.Image],
    boxes: Sequence[Box],
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """One forward pass per image: its unit whole-image embedding (N, D) and the unit embeddings
    of its boxes pooled from the same pass (N, R, D), float32."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if not supports_pooling(bundle):
        raise ValueError(
            f"regions cannot be pooled from {type(getattr(bundle.model, 'visual', None)).__name__}"
            " (a ViT with CLS pooling or a ModifiedResNet is needed); use crops"
        )
    d, grid = bundle.embed_dim, _grid(bundle)
    dtype = text_tower(bundle.model).dtype
    whole_out = [np.zeros((0, d), dtype=np.float32)]
    region_out = [np.zeros((0, len(boxes), d), dtype=np.float32)]
    cache: dict[tuple[int, int], torch.Tensor] = {}
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        rows = []
        for im in batch:
            if im.size not in cache:
                frame = visible_frame(bundle.preprocess, *im.size)
                w = cell_masks(boxes, frame, grid)
                cache[im.size] = torch.cat([torch.ones(1, grid[0] * grid[1]).double(), w])
            rows.append(cache[im.size])
        same = all(r is rows[0] for r in rows)
        masks = (rows[0][None] if same else torch.stack(rows)).to(bundle.device)
        pixels = torch.stack([bundle.preprocess(im) for im in batch]).to(bundle.device, dtype)
        with torch.inference_mode():
            feats = pool_features(bundle, pixels, masks)  # (B, 1 + R, D)
            f = F.normalize(feats.float(), dim=-1).cpu().numpy()
        whole_out.append(f[:, 0])
        region_out.append(f[:, 1:])
    return np.concatenate(whole_out), np.concatenate(region_out)
