"""What region embeddings (app.ml.regions, layout "five") cost: indexing throughput, search
latency of a two-concept query, and database bytes per image. Every comparison is a ratio
taken in the same run.

  index    images/s of embedding a batch of 32 pre-opened 640x480 images the way
           app.services.embedding.embed_pending does (encode_images, then encode_regions),
           layout "none" vs "five", interleaved, medians; for the bundled demo model and for
           ViT-B-32 with random weights (cost does not depend on the values);
  query    search_images end to end, k = 20, for a query naming two concepts (random
           adapters, ViT-B-32 random weights), regions on vs off on the same SQLite library of
           random unit embeddings plus random float16 region blobs, at 1k and 10k images;
           interleaved, medians, with the share of rerank_by_regions (and of the query encoding);
  storage  bytes per image of the whole embedding and of the region blob (computed), and the
           SQLite file's growth per image when the blobs are added (measured, after VACUUM).

Prints tables, writes bench/results/region_cost.json; never run by the tests.

    .venv/bin/python bench/region_cost.py            # about 3-4 minutes on 2 shared CPUs
    .venv/bin/python bench/region_cost.py --quick    # smoke run, nothing written
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from PIL import Image as PILImage
from sqlalchemy import text, update
from sqlalchemy.orm import Session, sessionmaker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.config import LimitSettings, SearchSettings  # noqa: E402
from app.db import make_engine, make_session_factory, migrate  # noqa: E402
from app.ml.adapter import ConceptAdapter  # noqa: E402
from app.ml.encode import encode_images  # noqa: E402
from app.ml.model import (  # noqa: E402
    DEMO_MODEL_NAME,
    ClipBundle,
)
from app.ml.regions import LAYOUTS, encode_regions, pack_regions  # noqa: E402
from app.models import Adapter, Concept, ConceptExample, Image  # noqa: E402
from app.services import search as search_module  # noqa: E402
from app.services.index import IndexCache  # noqa: E402
from app.services.model import ServingModel  # noqa: E402
from app.services.search import AdapterCache, search_images  # noqa: E402
from app.services.users import create_user  # noqa: E402
from bench.common import demo, insert_images, loadavg, unit_rows, vit_b32  # noqa: E402

OUT = ROOT / "bench" / "results" / "region_cost.json"
BATCH = 32  # app.services.embedding.BATCH: images per encode call in embed_pending
IMAGE_SIZE = (640, 480)
K = 20
# "Fido" and "Luna" are the two concepts; the service rewrites the query to
# "sks dog and sks cat asleep on the sofa" and encodes it once per concept plus once plain.
QUERY = "Fido and Luna asleep on the sofa"
CONCEPTS = (("Fido", "dog"), ("Luna", "cat"))
N_REGIONS = len(LAYOUTS["five"])


# -- indexing -------------------------------------------------------------------------------


def synthetic_images(n: int, seed: int = 0) -> list[PILImage.Image]:
    """n decoded RGB 640x480 images (smooth colour fields plus noise, so not constant)."""
    rng = np.random.default_rng(seed)
    w, h = IMAGE_SIZE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for _ in range(n):
        f = rng.uniform(0.005, 0.05, size=(3, 2))
        base = np.stack([127 + 100 * np.sin(f[c, 0] * xx + f[c, 1] * yy) for c in range(3)], -1)
        noise = rng.normal(0, 20, size=(h, w, 3))
        out.append(PILImage.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB"))
    return out


def embed_batch(bundle: ClipBundle, pictures: list[PILImage.Image], layout: str) -> None:
    """What embed_pending computes for one batch (decode and the DB write excluded)."""
    vectors = encode_images(bundle, pictures)  # (B, D)
    regions = encode_regions(bundle, pictures, layout)  # (B, R, D)
    assert vectors.shape == (len(pictures), bundle.embed_dim)
    assert regions.shape == (len(pictures), len(LAYOUTS[layout]), bundle.embed_dim)


def bench_index(name: str, bundle: ClipBundle, reps: int) -> dict[str, Any]:
    """Seconds per batch of 32, "none" vs "five", alternating which goes first."""
    pictures = synthetic_images(BATCH)
    # Warm-up (allocator, caches) at the batch sizes the timed calls run: 32 images whole;
    # their 160 crops go as 64 + 64 + 32, and 13 images' 65 crops cover the 64.
    embed_batch(bundle, pictures, "none")
    encode_regions(bundle, pictures[:13], "five")
    times: dict[str, list[float]] = {"none": [], "five": []}
    for i in range(reps):
        order = ("none", "five") if i % 2 == 0 else ("five", "none")
        for layout in order:
            t0 = time.perf_counter()
            embed_batch(bundle, pictures, layout)
            times[layout].append(time.perf_counter() - t0)
    none_s, five_s = (statistics.median(times[k]) for k in ("none", "five"))
    # Each repetition's pair ran back to back: the spread of its ratios shows the noise.
    pair = [f / n for n, f in zip(times["none"], times["five"], strict=True)]
    row = {
        "model": name,
        "embed_dim": bundle.embed_dim,
        "reps": reps,
        "batch": BATCH,
        "none_s_per_batch": round(none_s, 4),
        "five_s_per_batch": round(five_s, 4),
        "none_images_per_s": round(BATCH / none_s, 2),
        "five_images_per_s": round(BATCH / five_s, 2),
        "five_over_none_time": round(five_s / none_s, 3),
        "five_over_none_per_rep_min_max": [round(min(pair), 2), round(max(pair), 2)],
        "none_s_all": [round(t, 4) for t in times["none"]],
        "five_s_all": [round(t, 4) for t in times["five"]],
    }
    print(
        f"{name:<28}{bundle.embed_dim:>5}{row['none_images_per_s']:>12.1f}"
        f"{row['five_images_per_s']:>12.1f}{row['five_over_none_time']:>16.2f}"
        f"{min(pair):>9.2f} - {max(pair):.2f}",
        flush=True,
    )
    return row


# -- query ----------------------------------------------------------------------------------


def random_adapter(bundle: ClipBundle, seed: int, category: str) -> ConceptAdapter:
    """A random rank-1 adapter for this model (what bench/encode_speed.py uses)."""
    g = torch.Generator().manual_seed(seed)
    d = bundle.text_width
    b, a = 0.1 * torch.randn(d, generator=g), torch.randn(d, generator=g)
    return ConceptAdapter(
        b,
        a,
        bundle.fingerprint,
        token="sks",
        category=category,
        lam=0.1,
        steps=500,
        lr=1e-3,
        final_loss=0.0,
    )


def build_library(factory: sessionmaker[Session], n: int, bundle: ClipBundle) -> str:
    """A user with n embedded images (no region blobs yet) and two trained concepts."""
    d, model_id = bundle.embed_dim, bundle.fingerprint.model_id
    rng = np.random.default_rng(n)
    vectors = unit_rows(rng, n, d)
    with factory() as s:
        user_id = create_user("regions", db_session=s).id
        s.commit()
    insert_images(factory, user_id, vectors, model_id)
    with factory() as s:
        for seed, (name, category) in enumerate(CONCEPTS):
            c = Concept(
                user_id=user_id,
                name=name,
                name_key=name.casefold(),
                category=category,
                token="sks",
                state="ready",
                version=1,
            )
            s.add(c)
            s.flush()
            adapter = random_adapter(bundle, seed, category)
            s.add(
                Adapter(concept_id=c.id, version=1, weights=adapter.to_bytes(), model_id=model_id)
            )
            for j, photo in enumerate(unit_rows(rng, 5, d)):  # its photos: the photo mean
                s.add(
                    ConceptExample(
                        concept_id=c.id,
                        sha256=f"{seed:032x}{j:032x}",
                        storage_path=f"concepts/{c.id}/{j}.jpg",
                        mime="image/jpeg",
                        width=640,
                        height=480,
                        embedding=photo.tobytes(),
                        embedding_model=model_id,
                        version_added=1,
                    )
                )
        s.commit()
    return user_id


def add_region_blobs(factory: sessionmaker[Session], n: int, d: int) -> None:
    """What embed_pending stores with regions "five": a (5, D) float16 blob per image."""
    rng = np.random.default_rng(n + 1)
    with factory() as s:
        for start in range(0, n, 2000):
            stop = min(start + 2000, n)
            regions = unit_rows(rng, (stop - start) * N_REGIONS, d).reshape(-1, N_REGIONS, d)
            params = [
                {
                    "id": f"00000000-0000-4000-8000-{i:012d}",
                    "region_embeddings": pack_regions(r),
                    "region_layout": "five",
                }
                for i, r in zip(range(start, stop), regions, strict=True)
            ]
            s.execute(update(Image), params)  # bulk UPDATE by primary key
        s.commit()


def sqlite_bytes(factory: sessionmaker[Session], path: Path) -> int:
    """Size of the SQLite file after a checkpoint and VACUUM (no free pages counted)."""
    with factory() as s:
        s.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
        s.commit()
        conn = s.connection()
        conn.exec_driver_sql("VACUUM")
        s.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
    return path.stat().st_size


class Stopwatch:
    """Wraps module-level functions of app.services.search to time each call."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    @contextmanager
    def wrap(self, name: str) -> Iterator[None]:
        original: Callable[..., Any] = getattr(search_module, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.last[name] = self.last.get(name, 0.0) + time.perf_counter() - t0

        setattr(search_module, name, timed)
        try:
            yield
        finally:
            setattr(search_module, name, original)


def bench_query_one(n: int, serving: ServingModel, reps: int, work: Path) -> dict[str, Any]:
    """Regions on vs off, the same library and process, interleaved."""
    bundle = serving.bundle
    d = bundle.embed_dim
    db_path = work / "regions.db"
    engine = make_engine(f"sqlite:///{db_path.as_posix()}")
    try:
        migrate(engine)
        factory = make_session_factory(engine)
        user_id = build_library(factory, n, bundle)
        bytes_without = sqlite_bytes(factory, db_path)
        add_region_blobs(factory, n, d)
        bytes_with = sqlite_bytes(factory, db_path)

        cache, adapters, limits = IndexCache(work / "index"), AdapterCache(), LimitSettings()
        settings = {"on": SearchSettings(regions="five"), "off": SearchSettings(regions="none")}
        watch = Stopwatch()

        def search(mode: str) -> list[str]:
            watch.last = {}
            with factory() as s:
                out = search_images(
                    user_id,
                    QUERY,
                    k=K,
                    db_session=s,
                    serving=serving,
                    index_cache=cache,
                    adapter_cache=adapters,
                    limits=limits,
                    search_settings=settings[mode],
                )
            assert out.personalized and len(out.concepts) == 2 and len(out.hits) == K
            assert out.indexed == n
            return [h.image.id for h in out.hits]

        times: dict[str, list[float]] = {"on": [], "off": []}
        parts: dict[str, list[float]] = {"rerank": [], "rerank_scores": [], "encode": []}
        parts_off: list[float] = []
        with (
            watch.wrap("rerank_by_regions"),
            watch.wrap("rerank_scores"),
            watch.wrap("encode_query_parts"),
        ):
            hits = {mode: search(mode) for mode in ("off", "on", "off", "on")}  # warm-up
            assert cache.rebuilds == 1
            for i in range(reps):
                for mode in ("on", "off") if i % 2 == 0 else ("off", "on"):
                    t0 = time.perf_counter()
                    search(mode)
                    times[mode].append(time.perf_counter() - t0)
                    if mode == "on":
                        assert "rerank_by_regions" in watch.last
                        parts["rerank"].append(watch.last["rerank_by_regions"])
                        parts["rerank_scores"].append(watch.last["rerank_scores"])
                        parts["encode"].append(watch.last["encode_query_parts"])
                    else:
                        assert "rerank_by_regions" not in watch.last
                        parts_off.append(watch.last["encode_query_parts"])
    finally:
        engine.dispose()
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    # The query encoding (the same three text passes either way) is most of a search and most
    # of its noise; what the regions change is the rest: index search, re-ranking, hit rows.
    rest_on = statistics.median(t - e for t, e in zip(times["on"], parts["encode"], strict=True))
    rest_off = statistics.median(t - e for t, e in zip(times["off"], parts_off, strict=True))
    rerank = statistics.median(parts["rerank"])
    share = statistics.median(r / t for r, t in zip(parts["rerank"], times["on"], strict=True))
    return {
        "n": n,
        "reps": reps,
        "off_ms": round(1000 * off, 2),
        "on_ms": round(1000 * on, 2),
        "on_over_off": round(on / off, 3),
        "on_minus_off_ms": round(1000 * (on - off), 2),
        "rerank_by_regions_ms": round(1000 * rerank, 2),
        "of_it_rerank_scores_ms": round(1000 * statistics.median(parts["rerank_scores"]), 3),
        "rerank_share_of_on": round(share, 3),
        "without_encoding_off_ms": round(1000 * rest_off, 2),
        "without_encoding_on_ms": round(1000 * rest_on, 2),
        "without_encoding_on_over_off": round(rest_on / rest_off, 2),
        "query_encoding_ms_on": round(1000 * statistics.median(parts["encode"]), 2),
        "query_encoding_ms_off": round(1000 * statistics.median(parts_off), 2),
        "top20_changed": len(set(hits["on"]) ^ set(hits["off"])) // 2,
        "sqlite_bytes_per_image_without_regions": round(bytes_without / n),
        "sqlite_bytes_per_image_with_regions": round(bytes_with / n),
        "sqlite_growth_per_image": round((bytes_with - bytes_without) / n),
    }


def bench_query(sizes: list[int], reps: int) -> list[dict[str, Any]]:
    serving = ServingModel(vit_b32(), "ViT-B-32/random", None)
    print(
        f"\n{'N':>7}{'off ms':>9}{'on ms':>9}{'on/off':>8}{'+ms':>7}{'rerank ms':>11}"
        f"{'share':>7}{'encode ms':>11}{'rest off':>10}{'rest on':>9}{'on/off':>8}"
        f"{'SQLite B/img':>14}{'with regions':>14}"
    )
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="polar-regions-") as tmp:
            row = bench_query_one(n, serving, reps, Path(tmp))
        rows.append(row)
        print(
            f"{n:>7}{row['off_ms']:>9.1f}{row['on_ms']:>9.1f}{row['on_over_off']:>8.3f}"
            f"{row['on_minus_off_ms']:>7.1f}{row['rerank_by_regions_ms']:>11.2f}"
            f"{row['rerank_share_of_on']:>7.3f}{row['query_encoding_ms_on']:>11.1f}"
            f"{row['without_encoding_off_ms']:>10.2f}{row['without_encoding_on_ms']:>9.2f}"
            f"{row['without_encoding_on_over_off']:>8.2f}"
            f"{row['sqlite_bytes_per_image_without_regions']:>14}"
            f"{row['sqlite_bytes_per_image_with_regions']:>14}",
            flush=True,
        )
    return rows


# -- storage --------------------------------------------------------------------------------


def storage(dims: dict[str, int]) -> list[dict[str, Any]]:
    """Bytes per image: whole float32 (D,) vs float16 (5, D) region blob (pack_regions)."""
    rows = []
    print(f"\n{'model':<28}{'D':>5}{'whole B':>9}{'regions B':>11}{'regions/whole':>15}")
    for name, d in dims.items():
        whole = len(np.zeros(d, np.float32).tobytes())
        blob = len(pack_regions(np.zeros((N_REGIONS, d), np.float32)))
        row = {
            "model": name,
            "embed_dim": d,
            "whole_bytes": whole,
            "region_blob_bytes": blob,
            "regions_over_whole": round(blob / whole, 3),
        }
        rows.append(row)
        print(f"{name:<28}{d:>5}{whole:>9}{blob:>11}{blob / whole:>15.2f}")
    return rows


# -- main -----------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few repetitions, 1k only; no JSON")
    p.add_argument("--demo-reps", type=int, default=15, help="batches per layout, demo model")
    p.add_argument("--vit-reps", type=int, default=5, help="batches per layout, ViT-B-32")
    p.add_argument("--query-reps", type=int, default=80, help="searches per mode and size")
    p.add_argument("--sizes", default="1000,10000", help="library sizes for the query part")
    p.add_argument("--out", type=Path, default=None, help=f"JSON path (default {OUT.name})")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        args.demo_reps, args.vit_reps, args.query_reps, sizes = 3, 1, 5, [1000]
    # One thread: the cores are shared, and the service runs torch with one (ModelSettings).
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    load_before = loadavg()
    t_start = time.perf_counter()

    head = f"{'indexing, batch of 32':<28}{'D':>5}"
    print(f"{head}{'none img/s':>12}{'five img/s':>12}{'time five/none':>16}{'per rep':>12}")
    index_rows = [bench_index(f"{DEMO_MODEL_NAME} (bundled)", demo(), args.demo_reps)]
    index_rows.append(bench_index("ViT-B-32 (random weights)", vit_b32(), args.vit_reps))
    query_rows = bench_query(sizes, args.query_reps)
    storage_rows = storage({r["model"]: r["embed_dim"] for r in index_rows})

    result = {
        "indexing": {
            "image_size": list(IMAGE_SIZE),
            "batch": BATCH,
            "what": "encode_images + encode_regions on pre-opened images, as embed_pending",
            "rows": index_rows,
        },
        "query": {
            "query": QUERY,
            "k": K,
            "model": "ViT-B-32 (random weights), two random adapters with 5 photo embeddings",
            "backend": "sqlite",
            "region_candidates": SearchSettings().region_candidates,
            "rows": query_rows,
        },
        "storage": storage_rows,
        "threads": 1,
        "total_s": round(time.perf_counter() - t_start, 1),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "command": "bench/region_cost.py " + " ".join(sys.argv[1:]),
    }
    print(f"\nload average before {load_before}, after {result['loadavg_after']}")
    if args.quick and args.out is None:
        print(f"total {result['total_s']} s (--quick: nothing written; pass --out to keep it)")
        return
    out = args.out or OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"total {result['total_s']} s; wrote {out}")


if __name__ == "__main__":
    main()
