"""Where the per-user index stops scaling: rebuild from the database, reload from its file,
exact search vs library size N, an approximate index for comparison, and memory per image.

Random unit vectors (D = 512, like ViT-B/32) stand in for image embeddings. Three parts:
  db     per backend (SQLite file, PostgreSQL schema) and N: bulk-insert N image rows, then time
         IndexCache.get() cold (DB read + build + save), warm (a new process loading the file),
         hot (in memory), after a change (generation bumped), and search_images end to end
         (ViT-B-32 with random weights encodes the query), with and without a filter;
  faiss  VectorIndex alone up to 1M: build, save, load, memory, k=20 and k=N search;
  ann    at the largest db N: HNSW, IVF-Flat and IVF-PQ vs the exact index (build, latency,
         recall@20), on random and on clustered vectors.
Every comparison is a ratio taken in the same run. Prints tables, writes
bench/results/scale.json; never run by the tests.

    .venv/bin/python bench/scale.py             # 4 to 7 minutes on 2 shared CPUs
    .venv/bin/python bench/scale.py --quick     # smoke run, about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import faiss
import numpy as np
import sqlalchemy
import torch
from sqlalchemy import delete, text
from sqlalchemy.orm import Session, sessionmaker

from app import repositories
from app.bench.harness import insert_images, temporary_pg_schema, vit_b32
from app.bench.harness import unit_rows as common_unit_rows
from app.config import LimitSettings
from app.db import make_engine, make_session_factory, migrate
from app.ml.encode import encode_texts
from app.ml.index import VectorIndex
from app.models import Image
from app.services.index import IndexCache, load_embeddings, sync_index
from app.services.model import ServingModel
from app.services.search import AdapterCache, SearchEnv, SearchFilters, SearchQuery, search_images
from app.services.users import create_user

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "scale.json"
D = 512
K = 20
QUERY = "a dog running on the beach at sunset"
T = TypeVar("T")


# -- helpers --------------------------------------------------------------------------------


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds over `repeats` calls."""
    return statistics.median(timed(fn)[0] for _ in range(repeats))


def unit_rows(rng: np.random.Generator, n: int, d: int = D) -> np.ndarray:
    """(n, d) float32 random unit vectors (D = 512 unless told)."""
    return common_unit_rows(rng, n, d)


def clustered_rows(rng: np.random.Generator, n: int, centres: np.ndarray) -> np.ndarray:
    """(n, D) unit vectors around random centres (member-centre cosine 0.71, like a photo
    library's groups of similar shots); a kinder case for ANN than uniform random vectors."""
    x = centres[rng.integers(0, len(centres), n)] + unit_rows(rng, n, centres.shape[1])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


# Run in a fresh process: in this one, freed heap from earlier sizes would absorb the growth.
_RSS_CHILD = """
import os, sys
from pathlib import Path
import numpy as np
from app.ml.index import VectorIndex
def rss():
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
n, d = int(sys.argv[1]), int(sys.argv[2])
x = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)
before = rss()
index = VectorIndex.build(np.arange(1, n + 1, dtype=np.int64), x)
print((rss() - before) / n)
"""


def index_rss_per_image(n: int) -> float | None:
    """Resident bytes per image of a VectorIndex of n vectors (Linux), or None."""
    if not Path("/proc/self/statm").exists():
        return None
    done = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, str(n), str(D)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return round(float(done.stdout.split()[-1]), 1)


def available_bytes() -> int | None:
    """MemAvailable of the machine (Linux), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def r3(x: float) -> float:
    return round(x, 3)


def r4(x: float) -> float:
    return round(x, 4)


def ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b > 0 else float("nan")


# -- database part --------------------------------------------------------------------------


def serving_model() -> ServingModel:
    """ViT-B-32 with random weights: query encoding costs what it costs with real weights."""
    bundle = vit_b32()
    assert bundle.embed_dim == D
    return ServingModel(bundle, "ViT-B-32/random", None)


def table_size(engine: sqlalchemy.Engine, db_path: Path | None) -> dict[str, int]:
    """Bytes the images table takes: SQLite file, or Postgres heap/TOAST/indexes."""
    if db_path is not None:
        with engine.begin() as conn:
            conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
        return {"total": db_path.stat().st_size}
    # Steady state, as autovacuum leaves it: hint bits set, statistics for the planner.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM (ANALYZE) images"))
        row = conn.execute(
            text(
                "SELECT pg_total_relation_size('images'), pg_relation_size('images'), "
                "pg_total_relation_size(reltoastrelid), pg_indexes_size('images') "
                "FROM pg_class WHERE oid = 'images'::regclass"
            )
        ).one()
    return {"total": row[0], "heap": row[1], "toast": row[2], "indexes": row[3]}


def bench_db_one(
    url: str,
    db_path: Path | None,
    n: int,
    serving: ServingModel,
    work: Path,
    repeats: int,
    filtered: bool,
) -> dict[str, Any]:
    """All database-backed timings for one backend and one library size."""
    engine = make_engine(url)
    try:
        migrate(engine)
        factory = make_session_factory(engine)
        model_id = serving.model_id
        with factory() as s:
            user_id = create_user("scale", db_session=s).id
        vectors = unit_rows(np.random.default_rng(n), n)
        insert_s, _ = timed(lambda: insert_images(factory, user_id, vectors, model_id))
        size = table_size(engine, db_path)

        def get(cache: IndexCache) -> int:
            with factory() as s:
                return len(cache.get(db_session=s, user_id=user_id, model_id=model_id, dim=D).index)

        # Cold: a process that has never seen this user (no file, nothing in memory).
        cold, roots = [], []
        for i in range(repeats):
            roots.append(work / f"cold{i}")
            t0 = time.perf_counter()
            count = get(IndexCache(roots[-1]))
            cold.append(time.perf_counter() - t0)
            assert count == n, (count, n)
        # Warm: a new process whose disk already holds the file at this generation.
        warm = [timed(lambda: get(IndexCache(roots[0])))[0] for _ in range(repeats)]
        cache = IndexCache(roots[0])
        get(cache)
        hot = median_time(lambda: get(cache), 30)
        # After a change: the generation moves, the cached index and its file are stale; the
        # cache updates the index in place by id difference and writes the file in the
        # background (the write is waited for outside the timing).
        changed = []
        for _ in range(repeats):
            with factory() as s:
                repositories.bump_index_generation(db_session=s, user_id=user_id)
                s.commit()
            changed.append(timed(lambda: get(cache))[0])
            cache.flush()
        assert cache.refreshes == repeats and cache.rebuilds == 0

        # Where a cold rebuild spends its time.
        parts: dict[str, list[float]] = {"read": [], "build": [], "save": [], "load": []}
        scratch = work / "parts" / "u.faiss"
        scratch.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(repeats):
            t0 = time.perf_counter()
            with factory() as s:
                ids, vecs = load_embeddings(db_session=s, user_id=user_id, model_id=model_id)
            t1 = time.perf_counter()
            index = VectorIndex.build(ids, vecs)
            t2 = time.perf_counter()
            index.save(scratch, {})
            t3 = time.perf_counter()
            VectorIndex.load(scratch)
            t4 = time.perf_counter()
            for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                parts[key].append(dt)
            del ids, vecs, index

        # The service's search, end to end, on the hot index (query encoding included).
        adapters, limits = AdapterCache(), LimitSettings()

        def search(filters: SearchFilters | None) -> int:
            with factory() as s:
                env = SearchEnv(
                    db_session=s,
                    serving=serving,
                    index_cache=cache,
                    adapter_cache=adapters,
                    limits=limits,
                )
                out = search_images(user_id, SearchQuery(text=QUERY, k=K, filters=filters), env)
            assert len(out.hits) == K and out.indexed == n
            return len(out.hits)

        search(None)
        search_s = median_time(lambda: search(None), 15)
        # A filter makes the search rank every image and load every row it checks.
        mime = SearchFilters(mime=("image/jpeg",))
        filtered_s = (
            median_time(lambda: search(mime), 1 if n >= 50_000 else 3) if filtered else None
        )
        sync_s = bench_sync(factory, user_id, model_id, n, repeats)
    finally:
        engine.dispose()
    cold_s = statistics.median(cold)
    out: dict[str, Any] = {
        "n": n,
        "insert_s": r3(insert_s),
        "insert_rows_per_s": round(n / insert_s),
        "table_bytes": size,
        "table_bytes_per_image": round(size["total"] / n),
        "cold_s": r4(cold_s),
        "cold_samples_s": [r4(t) for t in cold],
        "cold_parts_s": {k: r4(statistics.median(v)) for k, v in parts.items()},
        "warm_s": r4(statistics.median(warm)),
        "warm_samples_s": [r4(t) for t in warm],
        "hot_ms": r3(1000 * hot),
        "after_change_s": r4(statistics.median(changed)),
        "after_change_samples_s": [r4(t) for t in changed],
        "search_ms": r3(1000 * search_s),
        "filtered_search_s": r4(filtered_s) if filtered_s is not None else None,
        "sync_s": r4(sync_s),
        "sync_over_cold": ratio(sync_s, cold_s),
        "warm_over_cold": ratio(statistics.median(warm), cold_s),
        "hot_over_cold": ratio(hot, cold_s),
        "after_change_over_cold": ratio(statistics.median(changed), cold_s),
    }
    return out


def bench_sync(
    factory: sessionmaker[Session], user_id: str, model_id: str, n: int, repeats: int
) -> float:
    """Seconds to apply one embedding batch (32 new images) and one deletion by id difference:
    the in-place update IndexCache does instead of a full rebuild (app.services.index)."""
    with factory() as s:
        ids_before, vecs_before = load_embeddings(db_session=s, user_id=user_id, model_id=model_id)
    insert_images(factory, user_id, unit_rows(np.random.default_rng(1), 32), model_id, first=n)
    with factory() as s:
        s.execute(delete(Image).where(Image.user_id == user_id, Image.vec_id == int(ids_before[0])))
        s.commit()
        want = np.sort(load_embeddings(db_session=s, user_id=user_id, model_id=model_id)[0])
    times = []
    for _ in range(repeats):
        index = VectorIndex.build(ids_before, vecs_before)  # the hot index before the change
        t0 = time.perf_counter()
        with factory() as s:
            sync_index(index, db_session=s, user_id=user_id, model_id=model_id)
        times.append(time.perf_counter() - t0)
        assert np.array_equal(np.sort(index.ids()), want)
    return statistics.median(times)


@contextmanager
def sqlite_db(work: Path) -> Iterator[tuple[str, Path | None]]:
    path = work / "scale.db"
    yield f"sqlite:///{path.as_posix()}", path


@contextmanager
def postgres_db(_work: Path) -> Iterator[tuple[str, Path | None]]:
    with temporary_pg_schema() as url:
        yield url, None


def bench_db(
    sizes: list[int], serving: ServingModel, repeats: int, postgres: bool, filtered_max: int
) -> dict[str, Any]:
    """The database part for each backend; a backend that cannot be reached is reported."""
    backends: dict[str, Callable[[Path], Any]] = {"sqlite": sqlite_db}
    if postgres:
        backends["postgres"] = postgres_db
    results: dict[str, Any] = {}
    for name, make_db in backends.items():
        rows: list[dict[str, Any]] = []
        try:
            for n in sizes:
                with (
                    tempfile.TemporaryDirectory(prefix="polar-scale-") as tmp,
                    make_db(Path(tmp)) as (url, db_path),
                ):
                    row = bench_db_one(
                        url, db_path, n, serving, Path(tmp), repeats, n <= filtered_max
                    )
                rows.append(row)
                print_db_row(name, row)
        except sqlalchemy.exc.OperationalError as e:
            print(f"{name}: skipped ({e.__class__.__name__}: {str(e).splitlines()[0]})")
            results[name] = {"skipped": str(e).splitlines()[0], "rows": rows}
            continue
        results[name] = {"rows": rows}
    return results


def bench_service(
    sizes: list[int], repeats: int, postgres: bool, filtered_max: int
) -> tuple[float, dict[str, Any]]:
    """(query encoding seconds, the database part) with one loaded serving model."""
    serving = serving_model()
    encode_s = median_time(lambda: encode_texts(serving.bundle, [QUERY]), 15)
    print(f"query encoding (ViT-B-32, random weights): {1000 * encode_s:.1f} ms\n")
    print(DB_HEADER)
    return encode_s, bench_db(sizes, serving, repeats, postgres, filtered_max)


DB_HEADER = (
    f"{'backend':<9}{'N':>9}{'insert s':>9}{'B/row':>7}{'cold s':>8}{'read':>7}{'build':>7}"
    f"{'save':>7}{'warm s':>8}{'hot ms':>8}{'chg s':>7}{'search ms':>10}{'filt s':>8}"
    f"{'sync s':>8}{'warm/cold':>10}"
)


def print_db_row(name: str, r: dict[str, Any]) -> None:
    p = r["cold_parts_s"]
    filt = f"{r['filtered_search_s']:>8.2f}" if r["filtered_search_s"] is not None else f"{'-':>8}"
    print(
        f"{name:<9}{r['n']:>9}{r['insert_s']:>9.1f}{r['table_bytes_per_image']:>7}"
        f"{r['cold_s']:>8.3f}{p['read']:>7.3f}{p['build']:>7.3f}{p['save']:>7.3f}"
        f"{r['warm_s']:>8.3f}{r['hot_ms']:>8.2f}{r['after_change_s']:>7.3f}"
        f"{r['search_ms']:>10.1f}{filt}{r['sync_s']:>8.3f}{r['warm_over_cold']:>10.3f}",
        flush=True,
    )


# -- FAISS-only part ------------------------------------------------------------------------


def bench_faiss_one(n: int, work: Path, queries: np.ndarray) -> dict[str, Any]:
    """VectorIndex at N: build, memory, file size, save/load and search latency."""
    rng = np.random.default_rng(10 + n)
    vectors = unit_rows(rng, n)
    ids = np.arange(1, n + 1, dtype=np.int64)
    t0 = time.perf_counter()
    index = VectorIndex.build(ids, vectors)
    build_s = time.perf_counter() - t0
    del vectors
    path = work / f"flat{n}.faiss"
    save_s = timed(lambda: index.save(path, {}))[0]
    file_bytes = path.stat().st_size
    load_s = timed(lambda: VectorIndex.load(path))[0]
    path.unlink()
    reps = 50 if n <= 100_000 else 15
    k20 = median_time(lambda: index.search(queries[:1], K), reps)
    # What a filtered search asks of the index: the whole ranking.
    k_all = median_time(lambda: index.search(queries[:1], n), 3 if n <= 100_000 else 1)
    return {
        "n": n,
        "build_s": r4(build_s),
        "file_bytes_per_image": round(file_bytes / n),
        "save_s": r4(save_s),
        "load_s": r4(load_s),
        "search_k20_ms": r3(1000 * k20),
        "search_all_ms": r3(1000 * k_all),
    }


def bench_faiss(sizes: list[int]) -> list[dict[str, Any]]:
    queries = unit_rows(np.random.default_rng(1), 8)
    rows: list[dict[str, Any]] = []
    first: float | None = None
    print(
        f"\n{'faiss N':<9}{'build s':>9}{'file B/img':>11}{'save s':>8}"
        f"{'load s':>8}{'k=20 ms':>9}{'k=N ms':>10}{'vs first':>9}"
    )
    for n in sizes:
        need = n * D * 4 * 5  # vectors, the index, serialised bytes, the loaded copy, slack
        avail = available_bytes()
        if avail is not None and need > avail:
            print(f"{n:<9} skipped: needs ~{need >> 30} GiB, {avail >> 30} GiB available")
            rows.append({"n": n, "skipped": "not enough free memory"})
            continue
        with tempfile.TemporaryDirectory(prefix="polar-scale-") as tmp:
            row = bench_faiss_one(n, Path(tmp), queries)
        first = first or row["search_k20_ms"]
        row["search_k20_vs_first"] = ratio(row["search_k20_ms"], first)
        rows.append(row)
        print(
            f"{n:<9}{row['build_s']:>9.3f}"
            f"{row['file_bytes_per_image']:>11}{row['save_s']:>8.3f}{row['load_s']:>8.3f}"
            f"{row['search_k20_ms']:>9.2f}{row['search_all_ms']:>10.1f}"
            f"{row['search_k20_vs_first']:>9.1f}",
            flush=True,
        )
    return rows


# -- approximate indexes --------------------------------------------------------------------


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the exact top-k found, (Q, k) each."""
    return float(
        np.mean(
            [len(np.intersect1d(f, t)) / truth.shape[1] for f, t in zip(found, truth, strict=True)]
        )
    )


def per_query_ms(index: faiss.Index, queries: np.ndarray) -> float:
    """Median single-query latency (ms), as a search request makes it."""
    times = []
    for q in queries:
        t0 = time.perf_counter()
        index.search(q[None], K)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def bench_ann_data(data: np.ndarray, queries: np.ndarray, quick: bool) -> dict[str, Any]:
    """Exact vs HNSW / IVF-Flat / IVF-PQ on one data set (same queries, same run)."""
    n = len(data)
    flat = faiss.IndexFlatIP(D)
    flat_build = timed(lambda: flat.add(data))[0]
    _, truth = flat.search(queries, K)
    exact_ms = per_query_ms(flat, queries[:50])
    out: dict[str, Any] = {
        "exact": {"build_s": r4(flat_build), "ms": r3(exact_ms), "bytes_per_image": D * 4}
    }
    nlist = max(16, int(2 * np.sqrt(n)))

    def hnsw() -> faiss.Index:
        idx = faiss.IndexHNSWFlat(D, 32, faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efConstruction = 40
        idx.add(data)
        return idx

    def ivf_flat() -> faiss.Index:
        idx = faiss.IndexIVFFlat(faiss.IndexFlatIP(D), D, nlist, faiss.METRIC_INNER_PRODUCT)
        idx.train(data)
        idx.add(data)
        return idx

    def ivf_pq() -> faiss.Index:
        idx = faiss.IndexIVFPQ(faiss.IndexFlatIP(D), D, nlist, 64, 8, faiss.METRIC_INNER_PRODUCT)
        idx.train(data)
        idx.add(data)
        return idx

    kinds: dict[str, tuple[Callable[[], faiss.Index], str, tuple[int, ...]]] = {
        "hnsw_m32": (hnsw, "efSearch", (16, 64, 256)),
        f"ivf_flat_{nlist}": (ivf_flat, "nprobe", (4, 16, 64)),
    }
    if n >= 10_000:  # PQ's 256 codewords per sub-vector need ~10k training points
        kinds[f"ivf_pq64_{nlist}"] = (ivf_pq, "nprobe", (16, 64))
    for name, (make, knob, values) in kinds.items():
        build_s, idx = timed(make)
        size = faiss.serialize_index(idx).nbytes
        settings = []
        for v in values[:2] if quick else values:
            faiss.ParameterSpace().set_index_parameter(idx, knob, v)
            _, found = idx.search(queries, K)
            ms = per_query_ms(idx, queries[:50])
            settings.append(
                {
                    knob: v,
                    "ms": r3(ms),
                    "recall_at_20": r3(recall_at_k(found, truth)),
                    "speedup_vs_exact": round(exact_ms / ms, 1),
                }
            )
        out[name] = {
            "build_s": r3(build_s),
            "build_over_exact": round(build_s / flat_build, 1),
            "bytes_per_image": round(size / n),
            "settings": settings,
        }
        del idx
    return out


def bench_ann(n: int, quick: bool) -> dict[str, Any]:
    """The approximate indexes at N on uniform random and on clustered vectors."""
    rng = np.random.default_rng(7)
    centres = unit_rows(rng, max(10, n // 100))
    sets = {
        "random": (unit_rows(rng, n), unit_rows(rng, 200)),
        "clustered": (clustered_rows(rng, n, centres), clustered_rows(rng, 200, centres)),
    }
    results: dict[str, Any] = {"n": n, "queries": 200, "k": K}
    print(
        f"\n{'ann N=' + str(n):<26}{'build s':>9}{'B/img':>7}{'knob':>6}{'ms':>8}{'recall@20':>10}"
    )
    for name, (data, queries) in sets.items():
        res = bench_ann_data(data, queries, quick)
        results[name] = res
        e = res["exact"]
        print(
            f"{name + ' exact':<26}{e['build_s']:>9.3f}{e['bytes_per_image']:>7}{'':>6}"
            f"{e['ms']:>8.2f}{1.0:>10.3f}"
        )
        for kind, r in res.items():
            if kind == "exact":
                continue
            for st in r["settings"]:
                knob = st.get("efSearch", st.get("nprobe"))
                print(
                    f"{name + ' ' + kind:<26}{r['build_s']:>9.2f}{r['bytes_per_image']:>7}"
                    f"{knob:>6}{st['ms']:>8.2f}{st['recall_at_20']:>10.3f}",
                    flush=True,
                )
    return results


# -- main -----------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument("--sizes", default="1000,10000,100000", help="library sizes for the db part")
    p.add_argument("--faiss-sizes", default="1000,10000,100000,1000000", help="FAISS-only sizes")
    p.add_argument("--repeats", type=int, default=3, help="cold/warm/changed repetitions")
    p.add_argument(
        "--filtered-max", type=int, default=100_000, help="largest N for a filtered search"
    )
    p.add_argument("--no-postgres", action="store_true", help="SQLite only")
    # One thread: the cores are shared, and a search request is one query anyway.
    p.add_argument("--threads", type=int, default=1, help="torch and FAISS threads")
    p.add_argument("--out", type=Path, default=None, help=f"JSON path (default {OUT.name})")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    faiss_sizes = [int(s) for s in args.faiss_sizes.split(",")]
    if args.quick:
        sizes, faiss_sizes, args.repeats = [1000, 5000], [1000, 20_000], 2
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()

    # The model is freed when this returns, before the 1M index needs the memory.
    encode_s, db = bench_service(sizes, args.repeats, not args.no_postgres, args.filtered_max)
    faiss_rows = bench_faiss(faiss_sizes)
    rss_n = min(200_000, max(faiss_sizes))
    rss = index_rss_per_image(rss_n)
    print(f"resident memory of a VectorIndex, fresh process, N={rss_n}: {rss} B/image")
    ann = bench_ann(max(sizes), args.quick)

    result = {
        "dim": D,
        "k": K,
        "threads": args.threads,
        "repeats": args.repeats,
        "query_encode_ms": r3(1000 * encode_s),
        "db": db,
        "faiss_index": faiss_rows,
        "index_rss_bytes_per_image": {"n": rss_n, "bytes": rss},
        "ann": ann,
        "total_s": round(time.perf_counter() - t_start, 1),
        "loadavg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "faiss_version": faiss.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "command": "bench/scale.py " + " ".join(sys.argv[1:]),
    }
    if args.quick and args.out is None:
        print(f"\ntotal {result['total_s']} s (--quick: nothing written; pass --out to keep it)")
        return
    out = args.out or OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\ntotal {result['total_s']} s; wrote {out}")


if __name__ == "__main__":
    main()
