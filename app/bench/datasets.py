"""PerVL datasets: one in-memory shape for the synthetic world, PerVL-DeepFashion2 and ConCon-Chi.

A query is a text with one `*` per concept it names, in order; each method renders the `*`s its
own way ("sks ball", "ball", a learned token). Ground truth is a list of pool indices.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

ImageSource = Image.Image | np.ndarray | Path  # decoded image, (H, W, 3) uint8, or a file
QueryKind = Literal["context", "concept", "multi"]
QUERY_KINDS: tuple[QueryKind, ...] = ("context", "concept", "multi")
PLACEHOLDER = "*"


class DatasetFormatError(ValueError):
    """Annotation files that do not match the published format; the message says where."""


@dataclass(frozen=True)
class Concept:
    """One personal concept: an id, an optional coarse category and its training photos."""

    id: str
    category: str | None  # coarse class appended to the token ("sks skirt"); None = token only
    train: tuple[ImageSource, ...] = field(repr=False)


@dataclass(frozen=True)
class Query:
    """A text query naming concepts through `*` placeholders, with its ground truth."""

    text: str  # one "*" per entry of `concepts`, in the same order
    concepts: tuple[str, ...]
    gt: tuple[int, ...]  # pool indices of the correct images
    kind: QueryKind  # context (one concept in context), concept (concept only), multi (2+)

    def __post_init__(self) -> None:
        if self.text.count(PLACEHOLDER) != len(self.concepts) or not self.concepts:
            raise ValueError(f"query {self.text!r} must hold one '*' per concept {self.concepts}")
        if not self.gt:
            raise ValueError(f"query {self.text!r} has no ground truth")


@dataclass
class PerVLDataset:
    """Concepts, a retrieval pool, queries over it and (optionally) one caption per pool image."""

    name: str
    split: str
    concepts: dict[str, Concept]
    pool: list[ImageSource]
    queries: list[Query]
    captions: list[str] | None  # caption i describes pool[i]; used for general retention
    info: dict[str, Any] = field(default_factory=dict)  # how it was built (seeds, sizes, paths)

    def queries_of(self, kind: QueryKind) -> list[Query]:
        """The queries of one kind, in order."""
        return [q for q in self.queries if q.kind == kind]

    def validate(self) -> None:
        """Every query's concepts exist and its ground truth is inside the pool."""
        n = len(self.pool)
        for q in self.queries:
            missing = [c for c in q.concepts if c not in self.concepts]
            if missing:
                raise DatasetFormatError(f"query {q.text!r} names unknown concepts {missing}")
            if min(q.gt) < 0 or max(q.gt) >= n:
                raise DatasetFormatError(f"query {q.text!r} has ground truth outside the pool")
        if self.captions is not None and len(self.captions) != n:
            raise DatasetFormatError(f"{len(self.captions)} captions for {n} pool images")
        for c in self.concepts.values():
            if not c.train:
                raise DatasetFormatError(f"concept {c.id!r} has no training images")


def render(text: str, phrases: Sequence[str]) -> str:
    """Replace the `*`s of a query, in order, by the given phrases."""
    parts = text.split(PLACEHOLDER)
    assert len(parts) == len(phrases) + 1, (text, phrases)
    out = parts[0]
    for phrase, rest in zip(phrases, parts[1:], strict=True):
        out += phrase + rest
    return out


def open_image(src: ImageSource) -> Image.Image:
    """A decoded RGB image from any ImageSource."""
    if isinstance(src, Image.Image):
        return src.convert("RGB")
    if isinstance(src, np.ndarray):
        return Image.fromarray(src).convert("RGB")
    with Image.open(src) as im:
        return im.convert("RGB")


def chunks(items: Sequence[ImageSource], size: int) -> Iterator[list[Image.Image]]:
    """Decoded images in chunks, so a large pool never sits in memory decoded all at once."""
    for start in range(0, len(items), size):
        yield [open_image(s) for s in items[start : start + size]]


# ---------------------------------------------------------------- PerVL-DeepFashion2


def _read_csv(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise DatasetFormatError(f"missing annotation file {path}")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        absent = [c for c in columns if c not in (reader.fieldnames or [])]
        if absent:
            raise DatasetFormatError(f"{path} lacks columns {absent} (has {reader.fieldnames})")
        return list(reader)


def _read_fsl_train(path: Path) -> dict[str, list[str]]:
    """`codes_infer/<pair_id>:` headers, each followed by its training image names."""
    if not path.is_file():
        raise DatasetFormatError(f"missing annotation file {path}")
    out: dict[str, list[str]] = {}
    current: str | None = None
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.endswith(":"):
            current = line[:-1].split("/")[-1]
            out.setdefault(current, [])
        elif current is None:
            raise DatasetFormatError(f"{path}:{n}: image {line!r} before any concept header")
        else:
            out[current].append(line)
    return out


_PERSON = re.compile(r"\bperson\b")


def wear_query(caption: str) -> str:
    """Put the concept into a DeepFashion2 scene caption: "a person wearing * poses ..."."""
    text = caption.strip().rstrip(".").strip()
    if _PERSON.search(text):
        return _PERSON.sub("person wearing *", text, count=1)
    return f"{text}, with a person wearing *"


def load_deepfashion2(
    annotations: Path, images: Path, split: str = "test", shots: int = 5
) -> PerVLDataset:
    """PerVL-DeepFashion2 (NVlabs PerVLBenchmark): `<split>_captions.csv`, `<split>_fsl_train.txt`,
    `train_coarse_grained_names.csv` in `annotations`; `images` holds `train/image/*.jpg`.

    Pool = the caption CSV's images. Context query per pool image: its caption with the concept
    put on the person, ground truth that image. Concept-only query per concept: "An image of *",
    ground truth every pool image of that pair_id.
    """
    prefix = {"val": "validation"}.get(split, split)
    rows = _read_csv(annotations / f"{prefix}_captions.csv", ("image_name", "pair_id", "caption"))
    train = _read_fsl_train(annotations / f"{prefix}_fsl_train.txt")
    names = _read_csv(
        annotations / "train_coarse_grained_names.csv", ("unique_pair_ids", "pair_id_categories")
    )
    category = {r["unique_pair_ids"].strip(): r["pair_id_categories"].strip() for r in names}
    train_dir = images / "train" / "image"
    concepts: dict[str, Concept] = {}
    for pid in sorted({r["pair_id"].strip() for r in rows}, key=_natural):
        files = train.get(pid)
        if not files:
            raise DatasetFormatError(f"pair_id {pid} has pool images but no training images")
        concepts[pid] = Concept(pid, category.get(pid), tuple(train_dir / f for f in files[:shots]))
    pool: list[ImageSource] = [images / r["image_name"].strip() for r in rows]
    queries = [
        Query(wear_query(r["caption"]), (r["pair_id"].strip(),), (i,), "context")
        for i, r in enumerate(rows)
    ]
    for pid in concepts:
        gt = tuple(i for i, r in enumerate(rows) if r["pair_id"].strip() == pid)
        queries.append(Query("An image of *", (pid,), gt, "concept"))
    ds = PerVLDataset(
        name="deepfashion2",
        split=split,
        concepts=concepts,
        pool=pool,
        queries=queries,
        captions=[r["caption"].strip() for r in rows],
        info={"annotations": str(annotations), "images": str(images), "shots": shots},
    )
    ds.validate()
    return ds


def _natural(s: str) -> tuple[int, str]:
    return (int(s), s) if s.isdigit() else (1 << 62, s)


# ---------------------------------------------------------------- ConCon-Chi

_CONCEPT_ONLY_WORDS = {"a", "an", "the", "of", "photo", "image", "picture", "this", "is", "my"}


def _is_concept_only(label: str) -> bool:
    """True when the label says nothing besides its concepts ("A photo of *")."""
    words = re.findall(r"[a-z]+", label.replace(PLACEHOLDER, " ").lower())
    return all(w in _CONCEPT_ONLY_WORDS for w in words)


def _records(path: Path) -> tuple[list[dict[str, Any]], list[Any]]:
    """(data rows, concepts list) of a ConCon-Chi annotation file."""
    if not path.is_file():
        raise DatasetFormatError(f"missing annotation file {path}")
    doc = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DatasetFormatError(f"{path} must be an object with a 'data' list")
    for i, row in enumerate(doc["data"]):
        for key in ("LABEL", "CONCEPTS", "GTS"):
            if key not in row:
                raise DatasetFormatError(f"{path}: data[{i}] lacks {key!r}")
    return doc["data"], list(doc.get("concepts") or [])


def _concept_category(entry: Any) -> str | None:
    """The coarse description of a `concepts` entry (a record or a plain name)."""
    if isinstance(entry, dict):
        value = entry.get("coarse")
        return str(value) if value else None
    return str(entry) if entry else None


def load_captions(path: Path) -> dict[str, str]:
    """Caption per image path from JSON ({path: caption} or [{image, caption}]) or CSV."""
    if not path.is_file():
        raise DatasetFormatError(f"missing caption file {path}")
    if path.suffix.lower() == ".csv":
        rows = _read_csv(path, ("image", "caption"))
        return {r["image"].strip(): r["caption"].strip() for r in rows}
    doc = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(doc, dict):
        return {str(k): str(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return {str(r["image"]): str(r["caption"]) for r in doc}
    raise DatasetFormatError(f"{path}: expected a JSON object or list of {{image, caption}}")


def load_conconchi(
    root: Path, captions: Path | None = None, shots: int | None = None
) -> PerVLDataset:
    """ConCon-Chi: `root/data/annotations/{train,test}.json`, images under `root/data/images`.

    The pool is every GTS image of test.json (negative queries included, as released); queries
    drop KIND == "negative"; ground truth = GTS + ADDITIONAL GTS that are in the pool. Concepts
    are the integer indices of `concepts` (their `coarse` description is the category).
    """
    ann, img_dir = root / "data" / "annotations", root / "data" / "images"
    train_rows, names = _records(ann / "train.json")
    test_rows, test_names = _records(ann / "test.json")
    names = names or test_names
    photos: dict[int, list[ImageSource]] = {}
    for row in train_rows:
        if len(row["CONCEPTS"]) != 1:
            raise DatasetFormatError("train.json rows must name exactly one concept")
        photos.setdefault(int(row["CONCEPTS"][0]), []).extend(img_dir / g for g in row["GTS"])
    concepts = {
        str(k): Concept(
            str(k),
            _concept_category(names[k]) if k < len(names) else None,
            tuple(v[:shots] if shots else v),
        )
        for k, v in sorted(photos.items())
    }
    pool_paths: list[str] = []
    index: dict[str, int] = {}
    for row in test_rows:
        for g in row["GTS"]:
            if g not in index:
                index[g] = len(pool_paths)
                pool_paths.append(g)
    queries: list[Query] = []
    for row in test_rows:
        if str(row.get("KIND", "")).lower() == "negative":
            continue
        ids = tuple(str(int(c)) for c in row["CONCEPTS"])
        gt_names = list(row["GTS"]) + list(row.get("ADDITIONAL GTS") or [])
        gt = tuple(sorted({index[g] for g in gt_names if g in index}))
        kind: QueryKind = (
            "multi" if len(ids) > 1 else "concept" if _is_concept_only(row["LABEL"]) else "context"
        )
        queries.append(Query(str(row["LABEL"]), ids, gt, kind))
    caption_list = None
    if captions is not None:
        table = load_captions(captions)
        lacking = [p for p in pool_paths if p not in table]
        if lacking:
            raise DatasetFormatError(f"{captions} has no caption for {len(lacking)} pool images")
        caption_list = [table[p] for p in pool_paths]
    ds = PerVLDataset(
        name="conconchi",
        split="test",
        concepts=concepts,
        pool=[img_dir / p for p in pool_paths],
        queries=queries,
        captions=caption_list,
        info={"root": str(root), "captions": None if captions is None else str(captions)},
    )
    ds.validate()
    return ds
