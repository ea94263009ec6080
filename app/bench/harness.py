"""Setup shared by the benchmark scripts in bench/ (nothing here is timed): load averages, the
models they run, random embeddings, bulk image rows and a throwaway PostgreSQL schema."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import open_clip
import torch
from sqlalchemy import insert, text
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, normalize_url
from app.ml.model import (
    DEMO_MODEL_NAME,
    ClipBundle,
    bundle_from_model,
    demo_checkpoint_path,
    load_clip,
)
from app.models import Image, utcnow


def save_result(result: dict[str, object], out: Path | None, default: Path, quick: bool) -> None:
    """Write a benchmark's JSON to `out` (else `default`); a --quick run without --out writes
    nothing (smoke runs must not overwrite the committed numbers)."""
    if quick and out is None:
        print("(--quick: nothing written; pass --out to keep it)")
        return
    path = out or default
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def loadavg() -> str:
    """The three load averages, as /proc/loadavg has them."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def vit_b32() -> ClipBundle:
    """ViT-B-32 with random weights (seeded): it costs what it costs with real weights."""
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    return bundle_from_model(model, preprocess, name="ViT-B-32", pretrained="random")


def demo() -> ClipBundle:
    """The bundled demo model on the CPU."""
    return load_clip(DEMO_MODEL_NAME, str(demo_checkpoint_path()), device="cpu")


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """(n, d) float32 random unit vectors, normalised in chunks (no float64 temporaries)."""
    x = rng.standard_normal((n, d), dtype=np.float32)
    for s in range(0, n, 65536):
        x[s : s + 65536] /= np.linalg.norm(x[s : s + 65536], axis=1, keepdims=True)
    return x


def insert_images(
    factory: sessionmaker[Session],
    user_id: str,
    vectors: np.ndarray,
    model_id: str,
    first: int = 0,
) -> None:
    """Bulk-insert one image row per vector (numbered from `first`), with realistic contents."""
    rng = np.random.default_rng([len(vectors), first])
    vec_ids = rng.integers(1, 2**63 - 1, size=len(vectors), dtype=np.int64)
    assert len(np.unique(vec_ids)) == len(vec_ids)
    now = utcnow()
    chunk = 5000
    with factory() as s:
        for start in range(0, len(vectors), chunk):
            rows = []
            for j in range(start, min(start + chunk, len(vectors))):
                i = first + j
                sha = f"{i:064x}"
                rows.append(
                    {
                        "id": f"00000000-0000-4000-8000-{i:012d}",
                        "user_id": user_id,
                        "vec_id": int(vec_ids[j]),
                        "sha256": sha,
                        "original_filename": f"IMG_{i:06d}.jpg",
                        "mime": "image/jpeg",
                        "size_bytes": 2_400_000,
                        "width": 4032,
                        "height": 3024,
                        "storage_path": f"originals/{sha[:2]}/{sha[2:4]}/{sha}.jpg",
                        "embedding": vectors[j].tobytes(),
                        "embedding_model": model_id,
                        "created_at": now,
                    }
                )
            s.execute(insert(Image), rows)
            s.commit()


# The PostgreSQL the tests use (docs/DEVELOPMENT.md); scale.py times the index build on it.
POSTGRES_URL = os.environ.get(
    "POLAR_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@contextmanager
def temporary_pg_schema(
    base_url: str = POSTGRES_URL, *, prefix: str = "polar_bench"
) -> Iterator[str]:
    """A new empty schema; yields a URL whose connections use it; drops it afterwards.
    (The tests' fixtures use it too, with their own prefix.)"""
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = make_engine(base_url)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = normalize_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()
