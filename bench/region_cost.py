"""What region embeddings (app.ml.regions, layout "five") cost: indexing throughput, search
latency of a two-concept query, and database bytes per image, for each region method
(POLAR_SEARCH__REGION_METHOD; "both", the default, stores the crops and the pooled regions).
Every comparison is a ratio taken in the same run.

  index    images/s of embedding a batch of 32 pre-opened 640x480 images the way
           app.services.embedding.embed_pending does: no regions (encode_images), layout "five"
           by crops (encode_images, then each crop encoded), "five" pooled from the one pass
           (app.ml.region_pool.encode_with_regions, method pooled) and both (the pooled pass,
           then the five crops encoded: 10 region rows, the default); interleaved, the order
           rotating, medians; for the bundled demo model and for ViT-B-32 with random weights
           (cost does not depend on the values);
  query    search_images end to end, k = 20, for a query naming two concepts (random
           adapters, ViT-B-32 random weights), regions on vs off on the same SQLite library of
           random unit embeddings plus random float16 region blobs, at 1k and 10k images: "on"
           is SearchSettings() (method both, 10-row "five-both" blobs), then, on the same
           library with its blobs rewritten, crops only (region_method crops, 5-row "five"
           blobs); interleaved with off, medians, with the share of rerank_by_regions (and of
           the query encoding), each step timed alone right after the search, through the same
           functions;
  storage  bytes per image of the whole embedding and of the region blob, crops (5 rows) and
           both (10 rows) (computed), and the SQLite file's growth per image when the blobs are
           added (measured, after VACUUM, in the query's libraries).

Prints tables, writes bench/results/region_cost.json; never run by the tests.

    .venv/bin/python bench/region_cost.py            # 7-25 minutes on 2 shared CPUs
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
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from PIL import Image as PILImage
from sqlalchemy import text, update
from sqlalchemy.orm import Session, sessionmaker

from app import repositories
from app.bench.harness import demo, insert_images, loadavg, unit_rows, vit_b32
from app.config import LimitSettings, SearchSettings
from app.db import make_engine, make_session_factory, migrate
from app.ml.adapter import ConceptAdapter
from app.ml.encode import encode_images
from app.ml.model import (
    DEMO_MODEL_NAME,
    ClipBundle,
)
from app.ml.regions import (
    LAYOUTS,
    embed_with_regions,
    encode_regions,
    method_kinds,
    pack_regions,
    region_method,
    rows_of_kind,
    split_regions,
    stored_layout,
    unpack_regions,
)
from app.models import Adapter, Concept, ConceptExample, Image
from app.services import recipe
from app.services.index import IndexCache
from app.services.model import ServingModel
from app.services.search import (
    AdapterCache,
    SearchEnv,
    SearchQuery,
    photo_mean,
    rerank_by_regions,
    search_images,
)
from app.services.users import create_user

ROOT = Path(__file__).resolve().parent.parent
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


# no regions; five crops; five boxes pooled; both (the default): pooled, then the five crops
MODES = ("none", "five", "pooled", "both")
REGION_MODES = MODES[1:]
ROWS = {"none": 0, "five": N_REGIONS, "pooled": N_REGIONS, "both": 2 * N_REGIONS}


def embed_batch(bundle: ClipBundle, pictures: list[PILImage.Image], mode: str) -> None:
    """What embed_pending computes for one batch (decode and the DB writes excluded); with
    both, its two passes: the whole image and its pooled regions, then the crops."""
    if mode in ("pooled", "both"):
        vectors, regions = embed_with_regions(bundle, pictures, "five", "pooled")
        if mode == "both":  # stored crops first, then the pooled regions ("five-both")
            regions = np.concatenate([encode_regions(bundle, pictures, "five"), regions], axis=1)
    else:
        vectors = encode_images(bundle, pictures)  # (B, D)
        regions = encode_regions(bundle, pictures, mode)  # (B, R, D)
    assert vectors.shape == (len(pictures), bundle.embed_dim)
    assert regions.shape == (len(pictures), ROWS[mode], bundle.embed_dim)


def bench_index(name: str, bundle: ClipBundle, reps: int) -> dict[str, Any]:
    """Seconds per batch of 32: no regions, five crops, five pooled, both; the order rotates."""
    pictures = synthetic_images(BATCH)
    # Warm-up (allocator, caches) at the batch sizes the timed calls run: 32 images whole;
    # their 160 crops go as 64 + 64 + 32, and 13 images' 65 crops cover the 64.
    embed_batch(bundle, pictures, "none")
    embed_batch(bundle, pictures, "pooled")
    encode_regions(bundle, pictures[:13], "five")
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for i in range(reps):
        shift = i % len(MODES)
        for mode in MODES[shift:] + MODES[:shift]:
            t0 = time.perf_counter()
            embed_batch(bundle, pictures, mode)
            times[mode].append(time.perf_counter() - t0)
    med = {m: statistics.median(times[m]) for m in MODES}
    # Each repetition's four ran back to back: the spread of its ratios shows the noise.
    pairs = [(m, "none") for m in REGION_MODES] + [("both", "five")]
    pair = {(m, by): [t / n for n, t in zip(times[by], times[m], strict=True)] for m, by in pairs}
    row: dict[str, Any] = {"model": name, "embed_dim": bundle.embed_dim, "reps": reps}
    row["batch"] = BATCH
    for m in MODES:
        row[f"{m}_s_per_batch"] = round(med[m], 4)
    for m in MODES:
        row[f"{m}_images_per_s"] = round(BATCH / med[m], 2)
    for m, by in pairs:
        row[f"{m}_over_{by}_time"] = round(med[m] / med[by], 3)
        low, high = min(pair[m, by]), max(pair[m, by])
        row[f"{m}_over_{by}_per_rep_min_max"] = [round(low, 2), round(high, 2)]
    row["five_over_pooled_time"] = round(med["five"] / med["pooled"], 2)
    for m in MODES:
        row[f"{m}_s_all"] = [round(t, 4) for t in times[m]]
    both = pair["both", "none"]
    print(
        f"{name:<28}{bundle.embed_dim:>5}{row['none_images_per_s']:>12.1f}"
        f"{row['five_images_per_s']:>13.1f}{row['pooled_images_per_s']:>14.1f}"
        f"{row['both_images_per_s']:>12.1f}{row['five_over_none_time']:>12.2f}"
        f"{row['pooled_over_none_time']:>13.2f}{row['both_over_none_time']:>11.2f}"
        f"{row['both_over_five_time']:>12.2f}{min(both):>13.2f} - {max(both):.2f}",
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


def add_region_blobs(factory: sessionmaker[Session], n: int, d: int, method: str) -> None:
    """What embed_pending stores with regions "five" by a method: a float16 blob per image of
    (5, D) for crops ("five"), (10, D) for both (crops then pooled, "five-both"); replaces the
    blobs the images had."""
    rows, key = N_REGIONS * len(method_kinds(method)), stored_layout("five", method)
    rng = np.random.default_rng([n, rows])
    with factory() as s:
        for start in range(0, n, 2000):
            stop = min(start + 2000, n)
            regions = unit_rows(rng, (stop - start) * rows, d).reshape(-1, rows, d)
            params = [
                {
                    "id": f"00000000-0000-4000-8000-{i:012d}",
                    "region_embeddings": pack_regions(r),
                    "region_layout": key,
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


def time_phases(
    s: Session,
    user_id: str,
    text: str,
    serving: ServingModel,
    cache: IndexCache,
    adapters: AdapterCache,
    settings: SearchSettings,
) -> dict[str, float]:
    """Seconds of the search's steps, each run alone through the functions search_images calls
    (app.services.recipe, rerank_by_regions), on the text it encoded."""
    bundle, model_id = serving.bundle, serving.model_id
    rows = repositories.latest_adapters(
        db_session=s,
        concept_ids=[c.id for c in repositories.user_concepts(db_session=s, user_id=user_id)],
    )
    stack = [adapters.get(r) for r in rows.values()]
    means = [photo_mean(s, adapters, r, model_id) for r in rows.values()]
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    enc = recipe.encode_query(bundle, text, stack, means, settings)
    out["encode"] = time.perf_counter() - t0
    weights = recipe.region_weights(enc, settings, region_method(bundle, settings.region_method))
    regions = bool(weights)
    # The rest of the search: index search, re-ranking (regions on), the hits' rows.
    t0 = time.perf_counter()
    index = cache.get(db_session=s, user_id=user_id, model_id=model_id, dim=bundle.embed_dim).index
    scores, ids = index.search(enc.vector, recipe.candidates_to_fetch(K, regions, settings))
    ranked = [(int(i), float(v)) for i, v in zip(ids[0], scores[0], strict=True) if i >= 0]
    if regions:
        assert enc.parts is not None
        t1 = time.perf_counter()
        ranked, lacking = rerank_by_regions(s, user_id, ranked, enc.parts, weights)
        out["rerank"] = time.perf_counter() - t1
        assert not lacking, "the library's region blobs do not fit the method"
    repositories.images_by_vec_id(db_session=s, user_id=user_id, vec_ids=[i for i, _ in ranked[:K]])
    out["rest"] = time.perf_counter() - t0
    if regions:
        assert enc.parts is not None
        ids_ = [i for i, _ in ranked]
        found = repositories.image_vectors(db_session=s, user_id=user_id, vec_ids=ids_)
        whole = np.stack([np.frombuffer(found[i].embedding, np.float32) for i in ids_])  # type: ignore[arg-type]
        dim = bundle.embed_dim
        stored = [
            split_regions(unpack_regions(found[i].regions, dim), found[i].region_layout)
            for i in ids_
        ]
        by_kind = {k: [rows_of_kind(r, k, dim) for r in stored] for k in weights}
        base = np.array([v for _, v in ranked], dtype=np.float32)
        t0 = time.perf_counter()
        recipe.rerank(base, enc.parts, whole, by_kind, weights)
        out["rerank_scores"] = time.perf_counter() - t0
    return out


# The query part's "on" settings: the default (both: 10-row "five-both" blobs) first, then
# crops only (5-row "five" blobs); each against regions off, on the same library.
QUERY_METHODS = ("both", "crops")


def bench_query_one(
    n: int, serving: ServingModel, reps: dict[str, int], work: Path
) -> list[dict[str, Any]]:
    """Regions on vs off, the same library and process, interleaved: one row per method of
    QUERY_METHODS with searches in `reps` (per mode), the library's blobs rewritten for each."""
    # both kinds side by side, the demo model's default (ViTs default to pooled since issue 32;
    # QUERY_METHODS times each method explicitly)
    default = SearchSettings(region_method="both")
    assert SearchSettings().regions == "five", "update QUERY_METHODS"
    bundle = serving.bundle
    d = bundle.embed_dim
    db_path = work / "regions.db"
    engine = make_engine(f"sqlite:///{db_path.as_posix()}")
    try:
        migrate(engine)
        factory = make_session_factory(engine)
        user_id = build_library(factory, n, bundle)
        bytes_without = sqlite_bytes(factory, db_path)
        cache, adapters, limits = IndexCache(work / "index"), AdapterCache(), LimitSettings()
        settings = {"off": SearchSettings(regions="none")}

        def search(mode: str) -> tuple[list[str], str]:
            with factory() as s:
                env = SearchEnv(
                    db_session=s,
                    serving=serving,
                    index_cache=cache,
                    adapter_cache=adapters,
                    limits=limits,
                    search=settings[mode],
                )
                out = search_images(user_id, SearchQuery(text=QUERY, k=K), env)
            assert out.personalized and len(out.concepts) == 2 and len(out.hits) == K
            assert out.indexed == n and out.reranked == (mode == "on")
            return [h.image.id for h in out.hits], out.text

        def steps(mode: str, text: str) -> dict[str, float]:
            """The search's steps alone, right after it, on the same state."""
            with factory() as s:
                return time_phases(s, user_id, text, serving, cache, adapters, settings[mode])

        rows = []
        for method in (m for m in QUERY_METHODS if reps.get(m)):
            assert region_method(bundle, method) == method  # ViT-B-32 can be pooled
            add_region_blobs(factory, n, d, method)  # replaces the previous method's
            bytes_with = sqlite_bytes(factory, db_path)
            blob_rows = N_REGIONS * len(method_kinds(method))
            settings["on"] = default if method == "both" else SearchSettings(region_method=method)
            times: dict[str, list[float]] = {"on": [], "off": []}
            parts: dict[str, list[float]] = {
                "rerank": [],
                "rerank_scores": [],
                "encode": [],
                "rest": [],
            }
            parts_off: dict[str, list[float]] = {"encode": [], "rest": []}
            hits = {mode: search(mode)[0] for mode in ("off", "on", "off", "on")}  # warm-up
            assert cache.rebuilds == 1  # the blobs are not in the index
            for i in range(reps[method]):
                for mode in ("on", "off") if i % 2 == 0 else ("off", "on"):
                    t0 = time.perf_counter()
                    _, text = search(mode)
                    times[mode].append(time.perf_counter() - t0)
                    step = steps(mode, text)
                    if mode == "on":
                        parts["rerank"].append(step["rerank"])
                        parts["rerank_scores"].append(step["rerank_scores"])
                        parts["encode"].append(step["encode"])
                        parts["rest"].append(step["rest"])
                    else:
                        assert "rerank" not in step
                        parts_off["encode"].append(step["encode"])
                        parts_off["rest"].append(step["rest"])
            row = {
                "n": n,
                "region_method": method,
                "region_layout": stored_layout("five", method),
                "region_rows": blob_rows,
                "region_blob_bytes": len(pack_regions(np.zeros((blob_rows, d), np.float32))),
                "reps": reps[method],
                **query_summary(times, parts, parts_off),
                "top20_changed": len(set(hits["on"]) ^ set(hits["off"])) // 2,
                "sqlite_bytes_per_image_without_regions": round(bytes_without / n),
                "sqlite_bytes_per_image_with_regions": round(bytes_with / n),
                "sqlite_growth_per_image": round((bytes_with - bytes_without) / n),
            }
            rows.append(row)
    finally:
        engine.dispose()
    return rows


def query_summary(
    times: dict[str, list[float]], parts: dict[str, list[float]], parts_off: dict[str, list[float]]
) -> dict[str, Any]:
    """Medians of one method's searches (on, off) and of their steps timed alone."""
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    # The query encoding (the same three text passes either way) is most of a search and most
    # of its noise; what the regions change is the rest: index search, re-ranking, hit rows.
    rest_on = statistics.median(parts["rest"])
    rest_off = statistics.median(parts_off["rest"])
    rerank = statistics.median(parts["rerank"])
    share = statistics.median(r / t for r, t in zip(parts["rerank"], times["on"], strict=True))
    return {
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
        "query_encoding_ms_off": round(1000 * statistics.median(parts_off["encode"]), 2),
    }


def bench_query(sizes: list[int], reps: dict[str, int]) -> list[dict[str, Any]]:
    serving = ServingModel(vit_b32(), "ViT-B-32/random", None)
    print(
        f"\n{'N':>7}{'method':>7}{'off ms':>9}{'on ms':>9}{'on/off':>8}{'+ms':>7}"
        f"{'rerank ms':>11}{'share':>7}{'encode ms':>11}{'rest off':>10}{'rest on':>9}"
        f"{'on/off':>8}{'SQLite B/img':>14}{'with regions':>14}{'growth':>8}"
    )
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="polar-regions-") as tmp:
            found = bench_query_one(n, serving, reps, Path(tmp))
        rows.extend(found)
        for row in found:
            print(
                f"{n:>7}{row['region_method']:>7}{row['off_ms']:>9.1f}{row['on_ms']:>9.1f}"
                f"{row['on_over_off']:>8.3f}{row['on_minus_off_ms']:>7.1f}"
                f"{row['rerank_by_regions_ms']:>11.2f}{row['rerank_share_of_on']:>7.3f}"
                f"{row['query_encoding_ms_on']:>11.1f}{row['without_encoding_off_ms']:>10.2f}"
                f"{row['without_encoding_on_ms']:>9.2f}{row['without_encoding_on_over_off']:>8.2f}"
                f"{row['sqlite_bytes_per_image_without_regions']:>14}"
                f"{row['sqlite_bytes_per_image_with_regions']:>14}"
                f"{row['sqlite_growth_per_image']:>8}",
                flush=True,
            )
    return rows


# -- storage --------------------------------------------------------------------------------


def storage(dims: dict[str, int], query_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Bytes per image: whole float32 (D,) vs the float16 region blob (pack_regions) of crops
    (5, D) and of both (10, D), computed; and the SQLite growth the query's libraries measured."""
    rows = []
    print(
        f"\n{'model':<28}{'D':>5}{'whole B':>9}{'crops B':>9}{'both B':>8}{'crops/whole':>13}"
        f"{'both/whole':>12}"
    )
    for name, d in dims.items():
        whole = len(np.zeros(d, np.float32).tobytes())
        blob = {
            m: len(pack_regions(np.zeros((N_REGIONS * len(method_kinds(m)), d), np.float32)))
            for m in QUERY_METHODS
        }
        row = {"model": name, "embed_dim": d, "whole_bytes": whole}
        row |= {f"{m}_blob_bytes": blob[m] for m in ("crops", "both")}
        row |= {f"{m}_over_whole": round(blob[m] / whole, 3) for m in ("crops", "both")}
        rows.append(row)
        print(
            f"{name:<28}{d:>5}{whole:>9}{blob['crops']:>9}{blob['both']:>8}"
            f"{blob['crops'] / whole:>13.2f}{blob['both'] / whole:>12.2f}"
        )
    measured = []
    for q in query_rows:
        blob = q["region_blob_bytes"]
        measured.append(
            {
                "model": "ViT-B-32 (random weights)",
                "n": q["n"],
                "region_method": q["region_method"],
                "region_layout": q["region_layout"],
                "region_blob_bytes": blob,
                "sqlite_growth_per_image": q["sqlite_growth_per_image"],
                "growth_over_blob": round(q["sqlite_growth_per_image"] / blob, 3),
            }
        )
        print(
            f"SQLite growth per image, ViT-B-32, N = {q['n']}, {q['region_method']} "
            f"({q['region_layout']}, {blob} B blob): {q['sqlite_growth_per_image']} B"
        )
    return {"computed": rows, "sqlite_measured": measured}


# -- main -----------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few repetitions, 1k only; no JSON")
    p.add_argument("--demo-reps", type=int, default=15, help="batches per mode, demo model")
    p.add_argument("--vit-reps", type=int, default=6, help="batches per mode, ViT-B-32")
    p.add_argument("--query-reps", type=int, default=80, help="searches per mode and size (both)")
    p.add_argument(
        "--crops-query-reps",
        type=int,
        default=40,
        help="searches per mode and size for the crops-only row (0 = none)",
    )
    p.add_argument("--sizes", default="1000,10000", help="library sizes for the query part")
    p.add_argument("--out", type=Path, default=None, help=f"JSON path (default {OUT.name})")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        args.demo_reps, args.vit_reps, args.query_reps, sizes = 3, 1, 5, [1000]
        args.crops_query_reps = 3
    # One thread: the cores are shared, and the service runs torch with one (ModelSettings).
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    load_before = loadavg()
    t_start = time.perf_counter()

    head = f"{'indexing, batch of 32':<28}{'D':>5}"
    print(
        f"{head}{'none img/s':>12}{'crops img/s':>13}{'pooled img/s':>14}{'both img/s':>12}"
        f"{'crops/none':>12}{'pooled/none':>13}{'both/none':>11}{'both/crops':>12}"
        f"{'both/none per rep':>20}"
    )
    index_rows = [bench_index(f"{DEMO_MODEL_NAME} (bundled)", demo(), args.demo_reps)]
    index_rows.append(bench_index("ViT-B-32 (random weights)", vit_b32(), args.vit_reps))
    query_reps = {"both": args.query_reps, "crops": args.crops_query_reps}
    query_rows = bench_query(sizes, query_reps)
    storage_rows = storage({r["model"]: r["embed_dim"] for r in index_rows}, query_rows)

    result = {
        "indexing": {
            "image_size": list(IMAGE_SIZE),
            "batch": BATCH,
            "what": "as embed_pending on pre-opened images: none = encode_images; five = "
            "encode_images + encode_regions (crops); pooled = embed_with_regions(method=pooled); "
            "both (the default) = embed_with_regions(method=pooled) + encode_regions (crops), "
            "10 region rows (crops, then pooled)",
            "rows": index_rows,
        },
        "query": {
            "query": QUERY,
            "k": K,
            "model": "ViT-B-32 (random weights), two random adapters with 5 photo embeddings",
            "backend": "sqlite",
            "region_candidates": SearchSettings().region_candidates,
            "what": "search_images with regions on vs off (regions=none), interleaved, on the "
            "same library; on = SearchSettings() for region_method both (the default: blobs of "
            "10 rows, crops then pooled, region_layout five-both), SearchSettings("
            "region_method=crops) for crops (blobs of 5 rows, region_layout five), the blobs "
            "rewritten between the two",
            "rows": query_rows,
        },
        "storage": {
            "what": "bytes per image of the float32 whole embedding and the float16 region blob: "
            "crops (5 rows; pooled alone is the same) and both (10 rows), computed; the SQLite "
            "file's growth per image when the blobs were added to the query's libraries "
            "(ViT-B-32, after VACUUM), measured",
            **storage_rows,
        },
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
