"""Late-block regions of a ViT (app.ml.region_late) and the "late" region method."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from PIL import Image

from app.ml.encode import encode_images
from app.ml.model import ClipBundle, bundle_from_model
from app.ml.region_late import (
    box_tokens,
    depth,
    encode_late_regions,
    late_blocks,
    supports_late,
)
from app.ml.region_pool import cell_masks, encode_with_regions, visible_frame
from app.ml.regions import (
    LAYOUTS,
    embed_with_regions,
    encode_regions_by,
    method_kinds,
    parse_stored_layout,
    region_method,
    split_regions,
    stored_layout,
)

from .conftest import perturb_
from .test_region_pool import noise_images, tiny_resnet

FIVE = LAYOUTS["five"]
WHOLE = (0.0, 0.0, 1.0, 1.0)


def deep_vit(seed: int = 0, dtype: torch.dtype = torch.float64, layers: int = 3) -> ClipBundle:
    """A ViT image tower of `layers` blocks on a 6x6 patch grid."""
    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=layers, width=32, head_width=16, patch_size=8, image_size=48)
    text = CLIPTextCfg(context_length=16, width=32, heads=4, layers=1)
    model = perturb_(CLIP(embed_dim=24, vision_cfg=vision, text_cfg=text), seed).to(dtype)
    return bundle_from_model(
        model, open_clip.image_transform(48, is_train=False), name="deep-vit", pretrained="r"
    )


IMAGES = noise_images([(40, 30), (30, 50), (64, 64), (200, 90)])
VARIANTS = [(k, own) for k in range(4) for own in (False, True) if k or own]


@pytest.mark.parametrize(("blocks", "own_cls"), VARIANTS)
def test_the_full_box_and_the_whole_row_are_the_whole_image_embedding(
    blocks: int, own_cls: bool
) -> None:
    bundle = deep_vit()
    assert supports_late(bundle) and depth(bundle) == 3
    whole, regions = encode_late_regions(bundle, IMAGES, [*FIVE, WHOLE], blocks, own_cls)
    expected = encode_images(bundle, IMAGES)
    np.testing.assert_allclose(whole, expected, atol=1e-10)
    np.testing.assert_allclose(regions[:, 5], expected, atol=1e-10)
    assert regions.shape == (4, 6, bundle.embed_dim) and regions.dtype == np.float32
    assert np.abs(regions[:, 0] - expected).max() > 1e-3  # a corner is not the whole image


def test_float32_whole_row_matches_encode_images() -> None:
    bundle = deep_vit(1, torch.float32)
    whole, regions = encode_late_regions(bundle, IMAGES, [*FIVE, WHOLE], 2, True)
    expected = encode_images(bundle, IMAGES)
    np.testing.assert_allclose(whole, expected, atol=1e-5)
    np.testing.assert_allclose(regions[:, 5], expected, atol=1e-5)


def _reference(
    bundle: ClipBundle, image: object, box: tuple[float, ...], blocks: int
) -> np.ndarray:
    """A box by the definition, one image, no batching or masks: the first L - k blocks on all
    tokens, then the last k on the CLS token and the box's cells alone."""
    visual = bundle.model.visual
    pixels = bundle.preprocess(image)[None].to(torch.float64)
    with torch.inference_mode():
        x = visual.conv1(pixels).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.view(1, 1, -1)
        x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
        resblocks = list(visual.transformer.resblocks)
        for blk in resblocks[: len(resblocks) - blocks]:
            x = blk(x)
        frame = visible_frame(bundle.preprocess, *image.size)  # type: ignore[attr-defined]
        cells = cell_masks([box], frame, tuple(visual.grid_size))[0]  # type: ignore[arg-type]
        keep = [0] + [1 + int(i) for i in torch.nonzero(cells).flatten()]
        x = x[:, keep]
        for blk in resblocks[len(resblocks) - blocks :]:
            x = blk(x)
        out = visual.ln_post(x[:, 0]) @ visual.proj
    v = out[0].numpy()
    return np.asarray(v / np.linalg.norm(v), dtype=np.float32)


@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_a_box_is_the_last_blocks_on_its_own_tokens(blocks: int) -> None:
    """Every box of the five, batched with padding, equals the definition run alone; k = L is
    the tower on the token subset (a token crop)."""
    bundle = deep_vit(2)
    _, regions = encode_late_regions(bundle, IMAGES, FIVE, blocks, own_cls=False)
    for n, image in enumerate(IMAGES):
        for r, box in enumerate(FIVE):
            np.testing.assert_allclose(
                regions[n, r], _reference(bundle, image, box, blocks), atol=1e-6
            )


def test_one_block_without_own_cls_is_exactly_pooled() -> None:
    bundle = deep_vit(3)
    whole, pooled = encode_with_regions(bundle, IMAGES, FIVE)
    w, late = encode_late_regions(bundle, IMAGES, FIVE, 1, own_cls=False)
    np.testing.assert_allclose(late, pooled, atol=1e-10)
    np.testing.assert_allclose(w, whole, atol=1e-10)


def test_padding_does_not_leak_into_a_smaller_box() -> None:
    """A box batched with a larger one (padded, masked) is the box embedded alone."""
    bundle = deep_vit(4)
    small, large = (0.0, 0.0, 0.3, 0.3), (0.1, 0.1, 1.0, 1.0)
    for blocks, own in [(2, False), (2, True), (3, False)]:
        together = encode_late_regions(bundle, IMAGES, [small, large], blocks, own)[1]
        alone = encode_late_regions(bundle, IMAGES, [small], blocks, own)[1]
        np.testing.assert_allclose(together[:, :1], alone, atol=1e-10)


def test_own_cls_sees_the_rest_of_the_image_only_through_the_patch_tokens() -> None:
    """A box's own CLS token differs from the image's; with every block re-run (k = L) the box
    is a crop of the token grid, blind to pixels outside its cells, while with shared blocks
    those pixels reach it through the patch tokens."""
    bundle = deep_vit(5)
    image = IMAGES[2]  # 64x64: the whole picture is the frame
    box = (0.0, 0.0, 0.5, 0.5)
    _, a = encode_late_regions(bundle, [image], [box, WHOLE], 0, own_cls=True)
    assert np.abs(a[0, 0] - a[0, 1]).max() > 1e-3
    # k = L with own CLS is a crop of the token grid: pixels outside the box's cells change
    # nothing
    changed = np.asarray(image).copy()
    changed[40:, 40:] = 255 - changed[40:, 40:]
    other = Image.fromarray(changed)
    crop_a = encode_late_regions(bundle, [image], [box], 3, own_cls=True)[1]
    crop_b = encode_late_regions(bundle, [other], [box], 3, own_cls=True)[1]
    np.testing.assert_allclose(crop_a, crop_b, atol=1e-10)
    shared_a = encode_late_regions(bundle, [image], [box], 1, own_cls=True)[1]
    shared_b = encode_late_regions(bundle, [other], [box], 1, own_cls=True)[1]
    assert np.abs(shared_a - shared_b).max() > 1e-6


def test_box_tokens_are_the_cells_of_the_box_row_major_after_the_cls_token() -> None:
    masks = cell_masks([(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0), WHOLE], WHOLE, (6, 6))
    masks[1] = 0.0
    masks[1, 35] = 1.0  # one cell: the last
    index, real = box_tokens(masks)
    assert index.shape == real.shape == (3, 37)
    assert index[0, :10].tolist() == [0] + [1 + r * 6 + c for r in range(3) for c in range(3)]
    assert real[0].tolist() == [True] * 10 + [False] * 27
    assert index[1, :2].tolist() == [0, 36] and real[1].sum() == 2
    assert index[2].tolist() == list(range(37)) and bool(real[2].all())


def test_late_blocks_argument_checks() -> None:
    bundle = deep_vit()
    with pytest.raises(ValueError, match="late blocks"):
        encode_late_regions(bundle, IMAGES, FIVE, 0, own_cls=False)
    with pytest.raises(ValueError, match="late blocks"):
        encode_late_regions(bundle, IMAGES, FIVE, 4, own_cls=False)
    with pytest.raises(ValueError, match="late regions"):
        encode_late_regions(tiny_resnet(), IMAGES, FIVE, 1, own_cls=False)


def test_the_late_method_key_round_trips_and_splits() -> None:
    assert stored_layout("five", "late") == "five-late"
    assert stored_layout("none", "late") == "none"
    assert parse_stored_layout("five-late") == ("five", "late")
    assert method_kinds("late") == ("late",)
    rows = np.arange(5 * 8, dtype=np.float32).reshape(5, 8)
    split = split_regions(rows, "five-late")
    assert list(split) == ["late"]
    np.testing.assert_array_equal(split["late"], rows)
    assert split_regions(np.zeros((10, 8), np.float32), "five-late") == {}  # rows of another key


def test_the_late_method_runs_where_it_can_and_falls_back_to_crops() -> None:
    vit, resnet = deep_vit(), tiny_resnet()
    assert region_method(vit, "late") == "late"
    assert not supports_late(resnet) and region_method(resnet, "late") == "crops"


def test_embed_with_regions_runs_the_configured_late_variant() -> None:
    bundle = deep_vit(6)
    blocks, own = late_blocks(bundle)
    assert 1 <= blocks <= depth(bundle)
    whole, regions = embed_with_regions(bundle, IMAGES, "five", "late")
    w, r = encode_late_regions(bundle, IMAGES, FIVE, blocks, own)
    np.testing.assert_allclose(whole, w)
    np.testing.assert_allclose(regions, r)
    np.testing.assert_allclose(encode_regions_by(bundle, IMAGES, "five", "late"), r)
    assert embed_with_regions(bundle, IMAGES, "none", "late")[1].shape == (4, 0, 24)


def test_own_cls_with_no_block_re_run_is_one_block_re_run() -> None:
    """In the last block only the CLS row matters, so re-running it on the box's tokens with
    the box's own CLS token gives what the shared pass gave that token (k = 0)."""
    bundle = deep_vit(7)
    w0, r0 = encode_late_regions(bundle, IMAGES, FIVE, 0, own_cls=True)
    w1, r1 = encode_late_regions(bundle, IMAGES, FIVE, 1, own_cls=True)
    np.testing.assert_allclose(r1, r0, atol=1e-10)
    np.testing.assert_allclose(w1, w0, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_late_regions_on_cuda_match_the_cpu(dtype: torch.dtype) -> None:
    cpu = deep_vit(8, torch.float32)
    model = cpu.model.to("cuda", dtype)
    bundle = bundle_from_model(model, cpu.preprocess, name="deep-vit", pretrained="cuda")
    whole, regions = encode_late_regions(bundle, IMAGES, FIVE, 1, own_cls=True)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    np.testing.assert_allclose(whole, encode_images(bundle, IMAGES), atol=tol)
    expected = encode_late_regions(deep_vit(8, torch.float32), IMAGES, FIVE, 1, own_cls=True)[1]
    np.testing.assert_allclose(regions, expected, atol=tol)
