"""Region embeddings and the re-ranking score (app.ml.regions)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from app.ml.encode import encode_images
from app.ml.model import ClipBundle
from app.ml.regions import (
    LAYOUTS,
    crop_regions,
    encode_boxes,
    encode_regions,
    layout_boxes,
    method_kinds,
    pack_regions,
    part_matches,
    region_match,
    rerank_scores,
    rerank_scores_by_kind,
    rows_of_kind,
    split_regions,
    unpack_regions,
)


def unit(*rows: list[float]) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows (on the last axis) scaled to unit length, float32."""
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def coordinate_image(w: int, h: int) -> Image.Image:
    """Red channel = x, green = y: every pixel says where it came from."""
    xs, ys = np.meshgrid(np.arange(w), np.arange(h))
    rgb = np.stack([xs, ys, np.zeros_like(xs)], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def test_five_layout_is_four_corners_and_the_centre_at_60_percent() -> None:
    boxes = layout_boxes("five")
    assert len(boxes) == 5
    for left, top, right, bottom in boxes:
        assert right - left == pytest.approx(0.6) and bottom - top == pytest.approx(0.6)
    assert {(b[0], b[1]) for b in boxes} == {(0, 0), (0.4, 0), (0, 0.4), (0.4, 0.4), (0.2, 0.2)}
    assert layout_boxes("none") == ()
    with pytest.raises(ValueError, match="unknown region layout"):
        layout_boxes("six")


def test_crop_regions_cuts_the_boxes_out_of_the_image() -> None:
    image = coordinate_image(100, 50)
    crops = crop_regions(image, LAYOUTS["five"])
    assert [c.size for c in crops] == [(60, 30)] * 5
    starts = [tuple(int(v) for v in np.asarray(c)[0, 0, :2]) for c in crops]  # (x, y) of pixel 0
    assert starts == [(0, 0), (40, 0), (0, 20), (40, 20), (20, 10)]
    last = np.asarray(crops[3])[-1, -1, :2]
    assert tuple(int(v) for v in last) == (99, 49)  # the bottom-right corner reaches the edge


def test_crop_regions_keeps_at_least_one_pixel() -> None:
    crops = crop_regions(coordinate_image(10, 10), [(0.5, 0.5, 0.5, 0.5), (0.0, 0.0, 0.01, 1.0)])
    assert [c.size for c in crops] == [(1, 1), (1, 10)]


def test_encode_regions_embeds_each_crop(clip32: ClipBundle) -> None:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(3)]
    out = encode_regions(clip32, images, "five", batch_size=4)
    assert out.shape == (3, 5, clip32.embed_dim) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=2), 1.0, atol=1e-5)
    want = encode_images(clip32, crop_regions(images[1], LAYOUTS["five"]))
    np.testing.assert_allclose(out[1], want, atol=1e-5)
    assert not np.allclose(out[1, 0], out[1, 1])
    assert encode_regions(clip32, images, "none").shape == (3, 0, clip32.embed_dim)
    corners = encode_boxes(clip32, images, LAYOUTS["five"][:4])
    np.testing.assert_allclose(corners, out[:, :4], atol=1e-5)


def test_pack_unpack_round_trip_within_float16() -> None:
    rng = np.random.default_rng(1)
    regions = rng.normal(size=(5, 24)).astype(np.float32)
    regions /= np.linalg.norm(regions, axis=1, keepdims=True)
    blob = pack_regions(regions)
    assert len(blob) == 5 * 24 * 2
    back = unpack_regions(blob, 24)
    assert back.shape == (5, 24) and back.dtype == np.float32
    np.testing.assert_allclose(back, regions, atol=1e-3)
    assert np.abs(back - regions).max() > 0  # float16 really is lossy: the tolerance matters


def test_unpack_rejects_missing_or_foreign_blobs() -> None:
    for blob in (None, b"", pack_regions(np.ones((2, 16), dtype=np.float32))):
        out = unpack_regions(blob, 24)  # 2 x 16 halves are 64 bytes: not a multiple of 2 x 24
        assert out.shape == (0, 24) and out.dtype == np.float32


def test_a_crop_match_beats_a_whole_image_only_match() -> None:
    parts = unit([1, 0, 0, 0], [0, 1, 0, 0])  # two concepts
    whole = unit([1, 1, 0.2, 0], [1, 1, 0.2, 0])  # both images look alike as a whole
    regions = np.stack(
        [
            unit([0, 0, 1, 0], [0, 0, 0, 1]),  # image 0: crops show neither concept
            unit([1, 0, 0.1, 0], [0, 1, 0.1, 0]),  # image 1: one concept in each crop
        ]
    )
    match = region_match(parts, whole, regions)
    assert match.shape == (2,) and match[1] > match[0]
    np.testing.assert_allclose(match[0], whole[0] @ parts[0], atol=1e-6)  # falls back to whole
    np.testing.assert_allclose(match[1], unit([1, 0, 0.1, 0])[0, 0], atol=1e-6)
    # ragged input (an image without regions) takes the per-image path, same numbers
    ragged = [regions[0], np.zeros((0, 4), dtype=np.float32)]
    got = part_matches(parts, whole, ragged)
    np.testing.assert_allclose(got[:, 0], part_matches(parts, whole, regions)[:, 0], atol=1e-6)
    np.testing.assert_allclose(got[:, 1], parts @ whole[1], atol=1e-6)
    with pytest.raises(ValueError, match="one region array per image"):
        region_match(parts, whole, regions[:1])


def test_mean_over_parts_needs_every_concept() -> None:
    parts = unit([1, 0, 0], [0, 1, 0])
    whole = unit([0, 0, 1], [0, 0, 1])
    regions = np.stack([unit([1, 0, 0], [1, 0, 0]), unit([1, 0, 0], [0, 1, 0])])
    np.testing.assert_allclose(part_matches(parts, whole, regions), [[1, 1], [0, 1]], atol=1e-6)
    np.testing.assert_allclose(region_match(parts, whole, regions), [0.5, 1.0], atol=1e-6)


def test_rerank_scores_adds_the_weighted_match() -> None:
    parts = unit([1, 0, 0], [0, 1, 0])
    whole = unit([1, 1, 0], [0, 0, 1], [1, 0, 0])
    regions = np.stack(
        [unit([1, 0, 0], [0, 1, 0]), unit([0, 0, 1]).repeat(2, 0), unit([1, 0, 0]).repeat(2, 0)]
    )
    base = np.array([0.1, 0.9, 0.5], dtype=np.float32)
    got = rerank_scores(base, parts, whole, regions, weight=8.0)
    np.testing.assert_allclose(got, base + 8.0 * region_match(parts, whole, regions), atol=1e-6)
    np.testing.assert_allclose(got, [0.1 + 8.0, 0.9, 0.5 + 4.0], atol=1e-5)
    assert got.dtype == np.float32 and int(np.argmax(got)) == 0
    np.testing.assert_allclose(rerank_scores(base, parts, whole, regions, 0.0), base)


def test_method_kinds_say_what_each_method_stores_in_order() -> None:
    assert method_kinds("crops") == ("crops",)
    assert method_kinds("pooled") == ("pooled",)
    assert method_kinds("both") == ("crops", "pooled")
    with pytest.raises(ValueError, match="unknown region method"):
        method_kinds("mean")


def test_split_regions_reads_the_kinds_a_stored_key_names() -> None:
    rows = unit_rows(np.random.default_rng(4).normal(size=(10, 8)))
    both = split_regions(rows, "five-both")
    assert sorted(both) == ["crops", "pooled"]
    np.testing.assert_array_equal(both["crops"], rows[:5])
    np.testing.assert_array_equal(both["pooled"], rows[5:])
    assert sorted(split_regions(rows[:5], "five")) == ["crops"]
    np.testing.assert_array_equal(split_regions(rows[:5], "five-pooled")["pooled"], rows[:5])
    pool = np.stack([rows, rows[::-1]])  # (N, R_total, D): split on the rows axis
    np.testing.assert_array_equal(split_regions(pool, "five-both")["pooled"], pool[:, 5:])
    # Rows that do not fit the key, no key, an unknown key, no rows: nothing to match on.
    assert split_regions(rows[:5], "five-both") == {}
    assert split_regions(rows, "five") == {}
    assert split_regions(rows, None) == {}
    assert split_regions(rows, "nine-both") == {}
    assert split_regions(rows[:0], "five") == {}
    assert split_regions(rows[:0], "none") == {}


def test_rerank_scores_by_kind_weighs_each_kind_on_its_own() -> None:
    rng = np.random.default_rng(5)
    parts = unit_rows(rng.normal(size=(2, 8)))
    whole = unit_rows(rng.normal(size=(3, 8)))
    crops = unit_rows(rng.normal(size=(3, 5, 8)))
    pooled = unit_rows(rng.normal(size=(3, 5, 8)))
    base = np.array([0.3, 0.2, 0.1], dtype=np.float32)
    got = rerank_scores_by_kind(
        base, parts, whole, {"crops": crops, "pooled": pooled}, {"crops": 2.0, "pooled": 3.0}
    )
    want = base + 2.0 * region_match(parts, whole, crops) + 3.0 * region_match(parts, whole, pooled)
    np.testing.assert_allclose(got, want, atol=1e-6)
    # A kind with weight 0 is not matched; a kind without regions is matched on the whole.
    only = rerank_scores_by_kind(
        base, parts, whole, {"crops": crops, "pooled": pooled}, {"crops": 2.0, "pooled": 0.0}
    )
    np.testing.assert_allclose(only, rerank_scores(base, parts, whole, crops, 2.0), atol=1e-6)
    missing = rerank_scores_by_kind(base, parts, whole, {"crops": crops}, {"pooled": 3.0})
    empty = np.zeros((3, 0, 8), dtype=np.float32)
    np.testing.assert_allclose(missing, base + 3.0 * region_match(parts, whole, empty), atol=1e-6)


def test_rows_of_kind_stand_in_with_the_kind_an_image_has() -> None:
    rows = unit_rows(np.random.default_rng(6).normal(size=(10, 8)))
    both = split_regions(rows, "five-both")
    np.testing.assert_array_equal(rows_of_kind(both, "pooled", 8), rows[5:])
    np.testing.assert_array_equal(rows_of_kind(both, "crops", 8), rows[:5])
    crops_only = split_regions(rows[:5], "five")
    np.testing.assert_array_equal(rows_of_kind(crops_only, "pooled", 8), rows[:5])
    pooled_only = split_regions(rows[5:], "five-pooled")
    np.testing.assert_array_equal(rows_of_kind(pooled_only, "crops", 8), rows[5:])
    assert rows_of_kind({}, "crops", 8).shape == (0, 8)
