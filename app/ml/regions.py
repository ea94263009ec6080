"""Region embeddings: a few crops of each library image, for queries that name several concepts.

Four ways to embed them (`POLAR_SEARCH__REGION_METHOD`): "crops" encodes each crop on its own;
"pooled" pools each box from the image tower's one forward pass (app.ml.region_pool); "both"
stores the two kinds side by side, and the re-ranking weighs each kind's match on its own;
"late" (ViTs) gives each box its own CLS token in the tower's one pass and re-runs the last
block on the box's tokens (app.ml.region_late).

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

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from app.ml.encode import ImageEngine, encode_images
from app.ml.model import ClipBundle
from app.ml.region_late import encode_late_regions, late_blocks, supports_late
from app.ml.region_pool import encode_with_regions, supports_pooling, tower_family

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


REGION_METHODS = ("crops", "pooled", "both", "late")
REGION_KINDS = ("crops", "pooled", "late")  # what one stored region row is
BOTH_KINDS = ("crops", "pooled")  # what "both" stores, in order
AUTO = "auto"  # the setting's default: the method measured best for the tower's family
# A change of what a method computes needs a new suffix, so that stored regions go stale.
_SUFFIX = {"crops": "", "pooled": "-pooled", "both": "-both", "late": "-late"}
# The region method each image-tower family gets with POLAR_SEARCH__REGION_METHOD=auto, from
# the synthetic PerVL benchmark (docs/BENCHMARKS.md, "Regions on a ViT image tower"),
# validation seeds 0-3, two-concept mRR:
#   modified_resnet (the demo model, 2x2 final cells; bench/vit_regions.py): both 0.887 >
#       pooled 0.826 > crops 0.724 (seeds 0-1; test 0.833 / 0.792 / 0.767);
#   vit (polar-demo-vit, 8x8 patches, 4 blocks): crops 0.693 > none 0.587 > pooled 0.312
#       (bench/vit_regions.py: regions pooled from the last block's CLS attention mislead the
#       re-ranking), and late 0.702 (bench/vit_late.py: each box its own CLS token masked to
#       its cells from the first block, app.ml.region_late; weight 4), within 0.02 of crops as
#       the rule declared before the test run asks, so ViTs get late: on ViT-B-32 full quality
#       takes 1.31x the indexing time of no regions on the ONNX engine (1.12x PyTorch's; the
#       tower alone 1.14x) where crops take 5-7.6x (bench/index_speed.py, bench/late_cost.py).
#       Test seeds 0-3 (80 queries): crops 0.680 > late 0.590 > none 0.475: late keeps about
#       half of what crops gain there (crops stay one setting away: REGION_METHOD=crops);
#   other towers can neither be pooled nor re-run: crops.
FAMILY_METHODS = {"vit": "late", "modified_resnet": "both", "other": "crops"}


def _check_method(method: str) -> None:
    if method not in REGION_METHODS:
        raise ValueError(f"unknown region method {method!r}; known: {list(REGION_METHODS)}")


def default_method(bundle: ClipBundle) -> str:
    """The region method `auto` stands for on this model: its tower family's."""
    return FAMILY_METHODS[tower_family(bundle)]


def region_method(bundle: ClipBundle, method: str) -> str:
    """The method that will run: "auto" is the tower family's (`default_method`); "pooled" and
    "both" fall back to "crops" for a tower that cannot be pooled, "late" for one that is not
    a ViT whose last blocks can be re-run (app.ml.region_late)."""
    if method == AUTO:
        method = default_method(bundle)
    _check_method(method)
    if method == "late":
        return method if supports_late(bundle) else "crops"
    return method if method == "crops" or supports_pooling(bundle) else "crops"


def method_kinds(method: str) -> tuple[str, ...]:
    """The kinds of region rows a method stores, in their stored order: "both" stores the crops
    first, then the pooled regions."""
    _check_method(method)
    return BOTH_KINDS if method == "both" else (method,)


def stored_layout(layout: str, method: str) -> str:
    """What an image's `region_layout` says of its regions: the layout, plus "-pooled" when
    they were pooled from the whole image's pass or "-both" when crops and pooled regions are
    stored ("five", "five-pooled", "five-both"), so that a change of method makes the stored
    regions stale and a rebuild re-embeds them."""
    layout_boxes(layout)
    _check_method(method)
    return layout if layout == "none" else layout + _SUFFIX[method]


def parse_stored_layout(key: str) -> tuple[str, str]:
    """(layout, method) of a `stored_layout` key."""
    layout, method = key, "crops"
    for name, suffix in _SUFFIX.items():
        if suffix and key.endswith(suffix):
            layout, method = key[: -len(suffix)], name
    layout_boxes(layout)
    return layout, method


def split_regions(regions: np.ndarray, key: str | None) -> dict[str, np.ndarray]:
    """Stored region rows by kind ("crops", "pooled"), as the stored layout key says: one
    image's (R_total, D) or a pool's (N, R_total, D), split on the rows axis (-2). {} for no
    key, an unknown key or rows that do not fit the key's layout (an image embedded without
    regions, or by another version)."""
    if not key or regions.ndim < 2 or not regions.shape[-2]:
        return {}
    try:
        layout, method = parse_stored_layout(key)
    except ValueError:
        return {}
    kinds, boxes = method_kinds(method), len(layout_boxes(layout))
    if not boxes or regions.shape[-2] != boxes * len(kinds):
        return {}
    return {kind: regions[..., n * boxes : (n + 1) * boxes, :] for n, kind in enumerate(kinds)}


def rows_of_kind(stored: Mapping[str, np.ndarray], kind: str, dim: int) -> np.ndarray:
    """One image's region rows of `kind` from its `split_regions`, (R, D). An image without that
    kind (between the two passes of "both", or stored before a switch of method) gives the kind
    it has instead, so it is still matched region by region; one without regions gives (0, D):
    its whole embedding only."""
    if kind in stored:
        return stored[kind]
    for other in REGION_KINDS:
        if other in stored:
            return stored[other]
    return np.zeros((0, dim), dtype=np.float32)


def embed_with_regions(
    bundle: ClipBundle,
    images: Sequence[Image.Image],
    layout: str,
    method: str,
    engine: ImageEngine | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Whole-image embeddings (N, D) and region embeddings (N, R_total, D) by a method that
    `region_method` resolved: "pooled" makes both in one forward pass per image, "crops" encodes
    the image and then each crop, "both" adds the crops to the pooled pass (crop rows first).
    `engine` (app.ml.onnx_engine) encodes whole images and crops; pooling needs PyTorch."""
    boxes = layout_boxes(layout)
    if method == "late" and boxes:
        blocks, own_cls = late_blocks(bundle)
        return encode_late_regions(bundle, images, boxes, blocks, own_cls)
    if method in ("pooled", "both") and boxes:
        whole, pooled = encode_with_regions(bundle, images, boxes)
        if method == "pooled":
            return whole, pooled
        crops = encode_boxes(bundle, images, boxes, engine=engine)
        return whole, np.concatenate([crops, pooled], axis=1)
    return encode_images(bundle, images, engine=engine), encode_boxes(
        bundle, images, boxes, engine=engine
    )


def encode_regions_by(
    bundle: ClipBundle,
    images: Sequence[Image.Image],
    layout: str,
    method: str,
    engine: ImageEngine | None = None,
) -> np.ndarray:
    """Region embeddings (N, R_total, D) by a resolved method (pooled: from one pass per image;
    both: the crops, then the pooled regions); crops through `engine` when one is given."""
    boxes = layout_boxes(layout)
    if method in ("pooled", "both", "late") and boxes:
        return embed_with_regions(bundle, images, layout, method, engine)[1]
    return encode_boxes(bundle, images, boxes, engine=engine)


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
    bundle: ClipBundle,
    images: Sequence[Image.Image],
    boxes: Sequence[Box],
    batch_size: int = 64,
    engine: ImageEngine | None = None,
) -> np.ndarray:
    """Unit embeddings of every image cropped to each of the given boxes, (N, R, D) float32."""
    if not boxes:
        return np.zeros((len(images), 0, bundle.embed_dim), dtype=np.float32)
    crops = [c for im in images for c in crop_regions(im, boxes)]
    flat = encode_images(bundle, crops, batch_size=batch_size, engine=engine)  # (N * R, D)
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


def rerank_scores_by_kind(
    base: np.ndarray,
    parts: np.ndarray,
    whole: np.ndarray,
    regions: Mapping[str, np.ndarray | Sequence[np.ndarray]],
    weights: Mapping[str, float],
) -> np.ndarray:
    """base + Σ_kind weight_kind × region_match(kind's regions), (N,): each kind of region
    ("crops", "pooled") matched on its own; a kind with no regions given is matched on the
    whole image only."""
    scores = np.asarray(base, dtype=np.float32).copy()
    for kind, weight in weights.items():
        if weight <= 0:
            continue
        rows = regions.get(kind)
        if rows is None:
            rows = np.zeros((len(whole), 0, whole.shape[1]), dtype=np.float32)
        scores += weight * region_match(parts, whole, rows)
    return scores
