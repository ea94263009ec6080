"""Regions pooled from the image tower's one pass (app.ml.region_pool) and the method setting."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from PIL import Image
from torchvision import transforms as T

from app.ml.encode import encode_images
from app.ml.model import ClipBundle, bundle_from_model
from app.ml.region_pool import (
    cell_masks,
    encode_with_regions,
    pool_features,
    supports_pooling,
    tower_family,
    visible_frame,
)
from app.ml.regions import (
    LAYOUTS,
    default_method,
    embed_with_regions,
    encode_boxes,
    encode_regions_by,
    parse_stored_layout,
    region_method,
    stored_layout,
)

from .conftest import perturb_, tiny_clip

FIVE = LAYOUTS["five"]


def tiny_resnet(seed: int = 0, dtype: torch.dtype = torch.float32, side: int = 128) -> ClipBundle:
    """A ModifiedResNet image tower (the demo model's kind); side 128 gives a 4x4 final grid."""
    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=(1, 1, 1, 1), width=8, image_size=side)
    text = CLIPTextCfg(context_length=16, width=32, heads=4, layers=1)
    model = perturb_(CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text), seed).to(dtype)
    return bundle_from_model(
        model, open_clip.image_transform(side, is_train=False), name="tiny-rn", pretrained="r"
    )


def noise_images(sizes: list[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for w, h in sizes
    ]


BUNDLES = {
    "vit32": lambda: tiny_clip(0, torch.float32),
    "vit64": lambda: tiny_clip(1, torch.float64),
    "rn32": lambda: tiny_resnet(0, torch.float32),
    "rn64": lambda: tiny_resnet(1, torch.float64),
    "rn-2x2": lambda: tiny_resnet(2, torch.float32, side=64),
}


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_whole_image_row_is_the_usual_embedding(name: str) -> None:
    bundle = BUNDLES[name]()
    assert supports_pooling(bundle)
    images = noise_images([(40, 30), (30, 50), (64, 64), (200, 90)])
    whole, regions = encode_with_regions(bundle, images, [*FIVE, (0.0, 0.0, 1.0, 1.0)])
    expected = encode_images(bundle, images)
    tol = 1e-5 if "32" in name or name == "rn-2x2" else 1e-10
    np.testing.assert_allclose(whole, expected, atol=tol)
    assert regions.shape == (4, 6, bundle.embed_dim) and regions.dtype == np.float32
    np.testing.assert_allclose(regions[:, 5], expected, atol=tol)  # the full box = the whole
    np.testing.assert_allclose(np.linalg.norm(regions, axis=-1), 1.0, atol=1e-5)
    # ... while a corner box differs from the whole image
    assert np.abs(regions[:, 0] - expected).max() > 1e-3


def test_vit_box_depends_only_on_its_patches_when_the_last_block_is_the_only_one() -> None:
    """With one block, a patch token's input is its own pixels; the box's CLS row attends to the
    CLS token and the box's patches only, so pixels elsewhere cannot move it."""
    bundle = tiny_clip(0, torch.float32)  # 32 px, patch 8: a 4x4 grid, one block
    assert len(bundle.model.visual.transformer.resblocks) == 1
    masks = cell_masks([(0.0, 0.0, 0.5, 0.5)], (0.0, 0.0, 1.0, 1.0), (4, 4))  # top-left 2x2
    masks = torch.cat([torch.ones(1, 16, dtype=torch.float64), masks])[None]
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    changed = pixels.clone()
    changed[:, :, 16:, :] += 1.0  # the bottom half
    changed[:, :, :16, 16:] -= 1.0  # and the top-right quarter
    with torch.inference_mode():
        a, b = pool_features(bundle, pixels, masks), pool_features(bundle, changed, masks)
        inside = pixels.clone()
        inside[:, :, :8, :8] += 1.0  # a patch inside the box
        c = pool_features(bundle, inside, masks)
    torch.testing.assert_close(a[:, 1], b[:, 1], rtol=0, atol=1e-6)
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-3  # the whole image saw the change
    assert (a[:, 1] - c[:, 1]).abs().max() > 1e-3  # the box sees its own patches


def test_resnet_box_depends_only_on_its_cells_of_the_final_map() -> None:
    """The attention pool of a box reads the final feature map's cells in the box only (a
    cell's receptive field is wide, so the claim is about the map, not about pixels)."""
    from app.ml.region_pool import _resnet_pool

    visual = tiny_resnet(0, torch.float64).model.visual  # 4x4 final grid
    masks = cell_masks([(0.5, 0.0, 1.0, 1.0)], (0.0, 0.0, 1.0, 1.0), (4, 4))  # right half
    masks = torch.cat([torch.ones(1, 16, dtype=torch.float64), masks])
    channels = visual.attnpool.k_proj.in_features
    feats = torch.randn(2, channels, 4, 4, generator=torch.Generator().manual_seed(1)).double()
    changed = feats.clone()
    changed[..., :2] += 3.0  # the left half of the map
    with torch.inference_mode():
        a, b = _resnet_pool(visual, feats, masks), _resnet_pool(visual, changed, masks)
        whole = visual.attnpool(feats)
    torch.testing.assert_close(a[:, 1], b[:, 1], rtol=0, atol=1e-12)
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-3
    torch.testing.assert_close(a[:, 0], whole, rtol=0, atol=1e-12)


def test_cell_masks_take_the_cells_whose_centre_is_in_the_box() -> None:
    full = (0.0, 0.0, 1.0, 1.0)
    m = cell_masks(FIVE, full, (2, 2))  # the demo model's grid
    assert m.tolist() == [
        [1, 0, 0, 0],  # top-left 60 % corner: the top-left cell
        [0, 1, 0, 0],
        [0, 0, 1, 0],
        [0, 0, 0, 1],
        [1, 1, 1, 1],  # the centre holds every cell centre
    ]
    m7 = cell_masks(FIVE[:1], full, (7, 7)).reshape(7, 7)  # ViT-B-32: 0.6 x 7 = 4.2 cells
    assert m7[:4, :4].all() and m7.sum() == 16
    # A box holding no cell centre gets the cell around its own middle.
    tiny = cell_masks([(0.30, 0.80, 0.40, 0.90)], full, (4, 4)).reshape(4, 4)
    assert tiny.sum() == 1 and tiny[3, 1] == 1
    # The grid spans the visible frame only: a box left of a centre-cropped frame.
    outside = cell_masks([(0.0, 0.0, 0.1, 1.0)], (0.125, 0.0, 0.875, 1.0), (2, 2)).reshape(2, 2)
    assert outside.tolist() == [[1, 0], [1, 0]]  # the nearest column, its full height


def test_visible_frame_follows_resize_and_centre_crop() -> None:
    pre = open_clip.image_transform(224, is_train=False)
    assert visible_frame(pre, 640, 480) == pytest.approx((0.125, 0.0, 0.875, 1.0), abs=2e-3)
    assert visible_frame(pre, 480, 640) == pytest.approx((0.0, 0.125, 1.0, 0.875), abs=2e-3)
    assert visible_frame(pre, 300, 300) == pytest.approx((0.0, 0.0, 1.0, 1.0))
    squash = T.Compose([T.Resize((224, 224)), T.ToTensor()])
    assert visible_frame(squash, 640, 480) == pytest.approx((0.0, 0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="geometric"):
        visible_frame(T.Compose([T.RandomCrop(10)]), 640, 480)


def test_a_corner_box_pools_what_it_shows_in_a_wide_image() -> None:
    """Boxes are fractions of the original: in a 2:1 image the centre crop hides the outer
    quarters, so the left 60 % box holds the frame's left cells (not the whole frame)."""
    bundle = tiny_clip(0, torch.float32)
    left = (0.0, 0.0, 0.6, 1.0)
    frame = visible_frame(bundle.preprocess, 200, 100)
    assert frame == pytest.approx((0.25, 0.0, 0.75, 1.0), abs=1e-2)
    m = cell_masks([left], frame, (4, 4)).reshape(4, 4)
    assert m[:, :3].all() and not m[:, 3].any()  # to 0.6 of the image = 0.7 of the frame


def test_unsupported_preprocessing_falls_back_to_crops_and_keys_say_which() -> None:
    bundle = tiny_clip(0, torch.float32)
    assert region_method(bundle, "pooled") == "pooled"
    assert region_method(bundle, "crops") == "crops"
    assert region_method(bundle, "both") == "both"
    odd = bundle_from_model(
        bundle.model,
        T.Compose([T.RandomCrop(32, pad_if_needed=True), T.ToTensor()]),
        name="tiny",
        pretrained="odd",
    )
    assert not supports_pooling(odd) and region_method(odd, "pooled") == "crops"
    assert region_method(odd, "both") == "crops"
    with pytest.raises(ValueError, match="cannot be pooled"):
        encode_with_regions(odd, noise_images([(32, 32)]), FIVE)
    with pytest.raises(ValueError, match="unknown region method"):
        region_method(bundle, "mean")
    assert stored_layout("five", "crops") == "five"
    assert stored_layout("five", "pooled") == "five-pooled"
    assert stored_layout("none", "pooled") == "none"
    assert parse_stored_layout("five-pooled") == ("five", "pooled")
    assert parse_stored_layout("five") == ("five", "crops")
    assert stored_layout("five", "both") == "five-both"
    assert stored_layout("none", "both") == "none"
    assert parse_stored_layout("five-both") == ("five", "both")
    with pytest.raises(ValueError, match="unknown region method"):
        stored_layout("five", "all")
    with pytest.raises(ValueError, match="unknown region layout"):
        parse_stored_layout("nine-pooled")


def test_embed_with_regions_dispatches_on_the_method() -> None:
    bundle = tiny_clip(0, torch.float32)
    images = noise_images([(48, 36), (36, 36)], seed=3)
    whole, crops = embed_with_regions(bundle, images, "five", "crops")
    np.testing.assert_allclose(whole, encode_images(bundle, images), atol=1e-6)
    np.testing.assert_allclose(crops, encode_boxes(bundle, images, FIVE), atol=1e-6)
    whole_p, pooled = embed_with_regions(bundle, images, "five", "pooled")
    np.testing.assert_allclose(whole_p, whole, atol=1e-5)
    np.testing.assert_allclose(pooled, encode_with_regions(bundle, images, FIVE)[1], atol=1e-6)
    np.testing.assert_allclose(encode_regions_by(bundle, images, "five", "pooled"), pooled)
    assert np.abs(pooled - crops).max() > 1e-3  # two different things
    # both: the crops, then the pooled regions, from the same passes
    whole_b, both = embed_with_regions(bundle, images, "five", "both")
    np.testing.assert_allclose(whole_b, whole_p, atol=1e-6)
    assert both.shape == (2, 10, bundle.embed_dim)
    np.testing.assert_allclose(both[:, :5], crops, atol=1e-6)
    np.testing.assert_allclose(both[:, 5:], pooled, atol=1e-6)
    np.testing.assert_allclose(encode_regions_by(bundle, images, "five", "both"), both)
    whole, r = embed_with_regions(bundle, images, "none", "pooled")
    assert whole.shape == (2, bundle.embed_dim)
    assert r.shape == (2, 0, bundle.embed_dim)
    with pytest.raises(ValueError, match="batch_size"):
        encode_with_regions(bundle, images, FIVE, batch_size=0)


def test_batches_of_mixed_sizes_match_one_by_one() -> None:
    bundle = tiny_resnet(0, torch.float32)
    images = noise_images([(50, 40), (40, 50), (50, 40)], seed=5)
    together = encode_with_regions(bundle, images, FIVE, batch_size=2)
    for n, im in enumerate(images):
        alone = encode_with_regions(bundle, [im], FIVE)
        np.testing.assert_allclose(together[0][n], alone[0][0], atol=1e-5)
        np.testing.assert_allclose(together[1][n], alone[1][0], atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("make", [tiny_clip, tiny_resnet])
def test_pooling_on_cuda_matches_encode_images(make, dtype) -> None:
    cpu = make(0, torch.float32)
    model = cpu.model.to("cuda", dtype)
    bundle = bundle_from_model(model, cpu.preprocess, name="tiny", pretrained="cuda")
    images = noise_images([(40, 30), (64, 64)])
    whole, regions = encode_with_regions(bundle, images, FIVE)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    np.testing.assert_allclose(whole, encode_images(bundle, images), atol=tol)
    assert np.isfinite(regions).all() and regions.shape == (2, 5, bundle.embed_dim)


def test_auto_is_the_method_measured_for_the_towers_family() -> None:
    """POLAR_SEARCH__REGION_METHOD=auto: late for a ViT, both for a ModifiedResNet (the demo
    model's kind), crops for a tower that cannot be pooled (docs/BENCHMARKS.md)."""
    vit, resnet = tiny_clip(0, torch.float32), tiny_resnet(0, torch.float32)
    assert (tower_family(vit), tower_family(resnet)) == ("vit", "modified_resnet")
    assert default_method(vit) == region_method(vit, "auto") == "late"
    assert default_method(resnet) == region_method(resnet, "auto") == "both"
    odd = bundle_from_model(
        vit.model,
        T.Compose([T.RandomCrop(32, pad_if_needed=True), T.ToTensor()]),
        name="tiny",
        pretrained="odd",
    )
    assert region_method(odd, "auto") == "crops"  # a ViT whose regions cannot be pooled or re-run
    resnet_odd = bundle_from_model(
        resnet.model, T.Compose([T.RandomCrop(128), T.ToTensor()]), name="tiny-rn", pretrained="o"
    )
    assert region_method(resnet_odd, "auto") == "crops"  # both needs pooling: crops

    class Other(torch.nn.Module):
        visual = torch.nn.Identity()

    other = type("B", (), {"model": Other()})()
    assert tower_family(other) == "other" and default_method(other) == "crops"  # type: ignore[arg-type]
    for explicit in ("crops", "pooled", "both"):  # a set method is kept
        assert region_method(vit, explicit) == region_method(resnet, explicit) == explicit
    assert region_method(vit, "late") == "late" and region_method(resnet, "late") == "crops"
