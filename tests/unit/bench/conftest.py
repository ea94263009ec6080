"""A tiny random CLIP for the benchmark tests (no checkpoint needed)."""

from __future__ import annotations

from collections.abc import Iterator

import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from app.ml.model import ClipBundle, bundle_from_model


def tiny_bundle(seed: int = 0) -> ClipBundle:
    """CLIP layout, text width 32, context 32, 32-pixel images; random weights."""
    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32)
    text = CLIPTextCfg(context_length=32, width=32, heads=4, layers=2)
    model = CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text)
    return bundle_from_model(
        model, open_clip.image_transform(32, is_train=False), name="tiny", pretrained=f"s{seed}"
    )


@pytest.fixture(scope="session")
def tiny() -> ClipBundle:
    return tiny_bundle(0)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models train several times faster on one thread (as the benchmark runs them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
