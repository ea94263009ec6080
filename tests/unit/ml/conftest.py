"""Tiny random open_clip models: both text-tower layouts, layer scale, non-zero biases."""

from __future__ import annotations

from collections.abc import Callable

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP

from app.ml.model import ClipBundle, bundle_from_model

VISION = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32)


def perturb_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random LN affines, biases and layer scales: defaults (1, 0) would hide folding bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def tiny_clip(seed: int = 0, dtype: torch.dtype = torch.float32) -> ClipBundle:
    """CLIP layout (`model.transformer`), GELU, context 77."""
    torch.manual_seed(seed)
    text = CLIPTextCfg(context_length=77, width=32, heads=4, layers=2)
    model = perturb_(CLIP(embed_dim=24, vision_cfg=VISION, text_cfg=text), seed).to(dtype)
    return bundle_from_model(
        model, open_clip.image_transform(32, is_train=False), name="tiny", pretrained=f"s{seed}"
    )


def tiny_custom(seed: int = 0, dtype: torch.dtype = torch.float64) -> ClipBundle:
    """CustomTextCLIP layout (`model.text`), QuickGELU, layer scale, Linear projection."""
    torch.manual_seed(seed)
    text = CLIPTextCfg(
        context_length=32, width=32, heads=2, layers=3, ls_init_value=0.5, proj_bias=True
    )
    model = CustomTextCLIP(embed_dim=16, vision_cfg=VISION, text_cfg=text, quick_gelu=True)
    model = perturb_(model, seed).to(dtype)
    return bundle_from_model(
        model, open_clip.image_transform(32, is_train=False), name="tiny-custom", pretrained="r"
    )


@pytest.fixture(scope="session")
def clip32() -> ClipBundle:
    return tiny_clip(0, torch.float32)


@pytest.fixture(scope="session")
def clip64() -> ClipBundle:
    return tiny_clip(1, torch.float64)


@pytest.fixture(scope="session")
def custom64() -> ClipBundle:
    return tiny_custom(2, torch.float64)


@pytest.fixture
def unit_rows() -> Callable[[int, int, int], torch.Tensor]:
    """Random L2-normalised rows (n, dim) from a seed."""

    def make(n: int, dim: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)

    return make
