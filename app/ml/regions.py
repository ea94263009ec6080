"""Region embeddings: a few crops of each library image, for queries that name several concepts.

Two ways to embed them (`POLAR_SEARCH__REGION_METHOD`): "crops" encodes each crop on its own;
"pooled" pools each box from the image tower's one forward pass (app.ml.region_pool).

A whole-image CLIP embedding of a photo with two objects says little about *which* instance of
each object is there (synthetic PerVL: a concept's photo mean ranks its own two-object scene above
the look-alike's in only 74 % of pairs). Crops give each object most of the frame, so a concept
can be matched where it stands. At index time each image gets the embeddings of the crops of a
fixed layout; at query time the top candidates of the usual one-vector search are re-ranked with

    score = base + weight × mean_k max_{r ∈ regions ∪ {whole}} <part_k, r>

where part_k is the query's part for concept k (its text under that concept's update, fused
with that concept's photos). Layout, weight and candidate count were chosen on the synthetic
validation split (bench/results/pervl_synthetic_regions.json); single-concept queries gained
nothing there, so they keep the one-vector ranking.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from app.ml.encode import encode_images
from app.ml.model import ClipBundle
from app.ml.region_pool import encode_with_regions, supports_pooling

Box = tuple[float, float, float, float]  # left, top, right, bottom as fractions of the image

# "five": the four 60 % corners and the 60 % centre (torchvision's FiveCrop, relative size).
LAYOUTS: dict[str, tuple[Box, ...]] = {
    "none": (),
    "five": (
        (0.0, 0.0, 0.6, 0.6),
        (0.4, 0.0, 1.0, 0.6),
        (0.0, 0.4, 0.6, 1.0),
        (0.4, 0.4, 1.0, 1.0),
        (0.2, 0.2, 0.8, 0.8),
    ),
}


REGION_METHODS = ("crops", "pooled")
POOLED_SUFFIX = "-pooled"


def region_method(bundle: ClipBundle, method: str) -> str:
    """The method that will run: "pooled" falls back to "crops" for a tower it cannot pool."""
    if method not in REGION_METHODS:
        raise ValueError(f"unknown region method {method!r}; known: {list(REGION_METHODS)}")
    return "pooled" if method == "pooled" and supports_pooling(bundle) else "crops"


def stored_layout(layout: str, method: str) -> str:
    """What an image's `region_layout` says of its regions: the layout, plus "-pooled" when
    they were pooled from the whole image's pass ("five" vs "five-pooled"), so that a change of
    method makes the stored regions stale and a rebuild re-embeds them."""
    layout_boxes(layout)
    if method not in REGION_METHODS:
        raise ValueError(f"unknown region method {method!r}; known: {list(REGION_METHODS)}")
    return layout + POOLED_SUFFIX if method == "pooled" and layout != "none" else layout


def parse_stored_layout(key: str) -> tuple[str, str]:
    """(layout, method) of a `stored_layout` key."""
    if key.endswith(POOLED_SUFFIX):
        layout, method = key[: -len(POOLED_SUFFIX)], "pooled"
    else:
        layout, method = key, "crops"
    layout_boxes(layout)
    return layout, method


def embed_with_regions(
    bundle: ClipBundle, images: Sequence[Image.Image], layout: str, method: str
) -> tuple[np.ndarray, np.ndarray]:
    """Whole-image embeddings (N, D) and region embeddings (N, R, D) by a method that
    `region_method` resolved: "pooled" makes both in one forward pass per image, "crops" encodes
    the image and then each crop."""
    boxes = layout_boxes(layout)
    if method == "pooled" and boxes:
        return encode_with_regions(bundle, images, boxes)
    return encode_images(bundle, images), encode_boxes(bundle, images, boxes)


def encode_regions_by(
    bundle: ClipBundle, images: Sequence[Image.Image], layout: str, method: str
) -> np.ndarray:
    """Region embeddings (N, R, D) by a resolved method (pooled: from one pass per image)."""
    boxes = layout_boxes(layout)
    if method == "pooled" and boxes:
        return encode_with_regions(bundle, images, boxes)[1]
    return encode_boxes(bundle, images, boxes)


def layout_boxes(layout: str) -> tuple[Box, ...]:
    """The crop boxes of a named layout."""
    try:
        return LAYOUTS[layout]
    except KeyError:
        raise ValueError(f"unknown region layout {layout!r}; known: {sorted(LAYOUTS)}") from None


def crop_regions(image: Image.Image, boxes: Sequence[Box]) -> list[Image.Image]:
    """The image cropped to each box (at least one pixel each way)."""
    w, h = image.size
    out = []
    for left, top, right, bottom in boxes:
        x0, y0 = round(left * w), round(top * h)
        x1, y1 = max(round(right * w), x0 + 1), max(round(bottom * h), y0 + 1)
        out.append(image.crop((x0, y0, x1, y1)))
    return out


def encode_regions(
    bundle: ClipBundle, images: Sequence[Image.Image], layout: str, batch_size: int = 64
) -> np.ndarray:
    """Unit embeddings of every image's crops, (N, R, D) float32 (R = 0 for "none")."""
    return encode_boxes(bundle, images, layout_boxes(layout), batch_size)


def encode_boxes(
    bundle: ClipBundle, images: Sequence[Image.Image], boxes: Sequence[Box], batch_size: int = 64
) -> np.ndarray:
    """Unit embeddings of every image cropped to each of the given boxes, (N, R, D) float32."""
    if not boxes:
        return np.zeros((len(images), 0, bundle.embed_dim), dtype=np.float32)
    crops = [c for im in images for c in crop_regions(im, boxes)]
    flat = encode_images(bundle, crops, batch_size=batch_size)  # (N * R, D)
    return flat.reshape(len(images), len(boxes), bundle.embed_dim)


def pack_regions(regions: np.ndarray) -> bytes:
    """One image's (R, D) region embeddings as float16 bytes (unit vectors lose ~1e-3)."""
    return np.ascontiguousarray(regions, dtype=np.float16).tobytes()


def unpack_regions(blob: bytes | None, dim: int) -> np.ndarray:
    """(R, D) float32 from `pack_regions` bytes; (0, D) for None or a blob of another width."""
    if not blob or len(blob) % (2 * dim):
        return np.zeros((0, dim), dtype=np.float32)
    return np.frombuffer(blob, dtype=np.float16).reshape(-1, dim).astype(np.float32)


def part_matches(
    parts: np.ndarray, whole: np.ndarray, regions: np.ndarray | Sequence[np.ndarray]
) -> np.ndarray:
    """Each query part's best match among each image's crops and the whole image, (K, N).

    parts (K, D) unit rows; whole (N, D) whole-image embeddings; regions[n] (R_n, D), R_n may be
    0 (an image embedded without regions is matched on its whole embedding only).
    """
    if len(whole) != len(regions):
        raise ValueError("one region array per image is needed")
    if isinstance(regions, np.ndarray) and regions.ndim == 3:  # same R for every image
        views = np.concatenate([regions, whole[:, None, :]], axis=1)  # (N, R + 1, D)
        return np.asarray(np.einsum("kd,nrd->knr", parts, views).max(axis=2), dtype=np.float32)
    out = np.empty((len(parts), len(whole)), dtype=np.float32)
    for n, (w, r) in enumerate(zip(whole, regions, strict=True)):
        views = np.concatenate([r, w[None]]) if len(r) else w[None]  # (R + 1, D)
        out[:, n] = (parts @ views.T).max(axis=1)
    return out


def region_match(
    parts: np.ndarray, whole: np.ndarray, regions: np.ndarray | Sequence[np.ndarray]
) -> np.ndarray:
    """Mean over the query parts of each part's best match among an image's crops and the whole
    image, (N,); arguments as for `part_matches`.
    """
    return np.asarray(part_matches(parts, whole, regions).mean(axis=0), dtype=np.float32)


def rerank_scores(
    base: np.ndarray,
    parts: np.ndarray,
    whole: np.ndarray,
    regions: np.ndarray | Sequence[np.ndarray],
    weight: float,
) -> np.ndarray:
    """base + weight × region_match: the re-ranking score of the candidates, (N,)."""
    return (base + weight * region_match(parts, whole, regions)).astype(np.float32)
