"""How fast a library is indexed with a real-size model (issue 32): the real embed_pending against
the bare image tower, every number a ratio to a baseline taken in the same run.

  tower     the bare image tower on preprocessed batches of 16 (no decoding, no database):
            PyTorch eager, and ONNX Runtime (the engine Immich's machine learning uses) on the
            same graph exported from the same weights, when onnxruntime and onnx are installed;
            1 and 2 threads; the largest difference between their vectors;
  pipeline  embed_pending on a SQLite library of camera-sized JPEGs (synthetic photo-like
            pictures at 1600x1200 and 4000x3000, quality 90) with the demo model and ViT-B-32
            (random weights: it costs what it costs with real ones), POLAR_THREADS__EMBEDDING 1
            and 2, regions off / pooled / late (ViT-B-32 only: app.ml.region_late, the ViT
            default) / both (crops + pooled, the demo model's default) / crops: the time
            until every photo is searchable (its whole embedding committed and the index
            generation bumped) and until full quality (the job ends: every region stored); and
            regions off with the next batch decoded in the same thread (the code before issue
            32) as the baseline of the decode-ahead lever; and regions off with the image
            tower on ONNX Runtime (`off-onnx`: app.ml.onnx_engine, POLAR_MODEL__ONNX, the
            engine the service uses where the onnx extra is installed; every other row runs
            PyTorch); and `off-onnx-before`, the same with this round's three decode levers
            undone: the original decoded again instead of the scan's preview, at twice the
            model's side instead of its side, and a first batch of 32 instead of 4.

Configurations alternate within each round (the order reversed every other round) and medians
are reported; the load average is recorded with each run. On a machine shared with other work
a tower timed minutes apart is no baseline, so each pipeline run is also divided by the bare
towers' rate timed just before and just after it (a batch of 8, same thread count): the
"vs torch" and "vs ORT" columns are medians of those ratios. The scan section times what a
library scan does per new photo before embedding (hash, validating decode, thumbnail, the
embedding's preview): as shipped, without the preview, and with a full decode (the code before
issue 32). The
50,000-photo estimate divides by the median throughput of each row (the embedding job's alone).
Prints tables, writes bench/results/index_speed.json; never run by the tests.

    .venv/bin/python bench/index_speed.py            # about 9 minutes on 2 shared CPUs
    .venv/bin/python bench/index_speed.py --quick    # smoke run, nothing written
    .venv/bin/python bench/index_speed.py --models ViT-B-32 --sizes 1600x1200 \
        --out bench/results/index_speed_onnx.json    # a subset, to its own file
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import func, select, update

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_pipeline import build_library, patched, synthetic_photo, write_jpeg

from app import repositories, storage
from app.bench.harness import demo, loadavg, save_result, vit_b32
from app.config import SearchSettings, Settings
from app.db import make_engine, make_session_factory, migrate
from app.ml import onnx_engine
from app.ml.model import ClipBundle
from app.models import Image
from app.services import embedding
from app.services.job_runs import JobContext, JobEnvironment
from app.services.model import ServingModel
from app.storage import ImageStore

OUT = Path(__file__).resolve().parent / "results" / "index_speed.json"
LIBRARY = 50_000
TOWER_BATCH = 16
METHODS = ("off", "off-onnx", "off-no-ahead", "off-onnx-before", "pooled", "both", "crops")
VIT_REGIONS = ("pooled", "late")  # late needs a ViT: its rows are ViT-B-32's
# (model, photo size, POLAR_THREADS__EMBEDDING, region methods): ViT-B-32's region passes cost
# 6 forward passes a photo, so they are timed where they say the most, within ~10 minutes.
CONFIGS: list[tuple[str, str, int, tuple[str, ...]]] = [
    ("demo", "1600x1200", 1, METHODS),
    ("demo", "1600x1200", 2, METHODS),
    ("demo", "4000x3000", 1, ("off", "off-onnx", "off-onnx-before", "off-no-ahead", "both")),
    ("demo", "4000x3000", 2, ("off", "off-onnx", "off-onnx-before", "both")),
    (
        "ViT-B-32",
        "1600x1200",
        1,
        ("off", "off-onnx", "off-onnx-before", "off-no-ahead", *VIT_REGIONS, "both"),
    ),
    (
        "ViT-B-32",
        "1600x1200",
        2,
        ("off", "off-onnx", "off-onnx-before", "off-no-ahead", *VIT_REGIONS),
    ),
    ("ViT-B-32", "4000x3000", 1, ("off", "off-onnx", "off-onnx-before", "off-no-ahead")),
    ("ViT-B-32", "4000x3000", 2, ("off", "off-onnx", "off-onnx-before")),
]


# -- the bare tower ---------------------------------------------------------------------------


def _torch_tower(bundle: ClipBundle) -> Callable[[np.ndarray], np.ndarray]:
    visual = bundle.model.visual  # type: ignore[union-attr]

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return visual(torch.from_numpy(x)).float().numpy()  # type: ignore[no-any-return]

    return run


def _ort_tower(bundle: ClipBundle, folder: Path) -> Callable[[int], Any] | str:
    """A factory of ONNX Runtime sessions (by thread count) of the bundle's image tower, on the
    very file the service's engine exports (app.ml.onnx_engine.export_tower), or why there is
    none."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    path = folder / f"tower-{bundle.fingerprint.name}.onnx"
    try:
        onnx_engine.export_tower(bundle, path)
    except Exception as e:  # any exporter failure: the row says so
        return f"export failed: {type(e).__name__}: {str(e)[:200]}"

    def session(threads: int) -> Callable[[np.ndarray], np.ndarray]:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return lambda x: sess.run(None, {"pixels": x})[0]

    return session


Engine = Callable[[np.ndarray], np.ndarray]


class Towers:
    """The bare image towers of each model and thread count, timed next to each pipeline run
    (on a shared machine only numbers taken side by side compare)."""

    def __init__(self) -> None:
        self.engines: dict[tuple[str, int], dict[str, Engine]] = {}
        self.batches: dict[str, np.ndarray] = {}
        self.turn = 0

    def rates(self, model: str, threads: int) -> dict[str, float]:
        """Images per second of each engine on one batch of 8, in alternating order."""
        x, engines = self.batches[model][:8], self.engines[(model, threads)]
        names = list(engines) if self.turn % 2 == 0 else list(reversed(engines))
        self.turn += 1
        out = {}
        torch.set_num_threads(threads)
        for e in names:
            t = time.perf_counter()
            engines[e](x)
            out[e] = len(x) / (time.perf_counter() - t)
        torch.set_num_threads(1)
        return out


def bench_tower(
    name: str,
    bundle: ClipBundle,
    pictures: Sequence[Any],
    rounds: int,
    folder: Path,
    towers: Towers,
) -> list[dict[str, Any]]:
    x = torch.stack([bundle.preprocess(p) for p in pictures[:TOWER_BATCH]]).numpy()
    while len(x) < TOWER_BATCH:
        x = np.concatenate([x, x])[:TOWER_BATCH]
    towers.batches[name] = x
    ort_factory = _ort_tower(bundle, folder)
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        engines: dict[str, Engine] = {"torch": _torch_tower(bundle)}
        if not isinstance(ort_factory, str):
            engines["onnxruntime"] = ort_factory(threads)
        towers.engines[(name, threads)] = engines
        out = {e: f(x[:2]) for e, f in engines.items()}  # warm up; and the vectors
        diff = float(np.abs(out["torch"] - out["onnxruntime"]).max()) if len(engines) > 1 else None
        times: dict[str, list[float]] = {e: [] for e in engines}
        for r in range(rounds):
            for e in engines if r % 2 == 0 else reversed(list(engines)):
                t = time.perf_counter()
                engines[e](x)
                times[e].append(time.perf_counter() - t)
        for e, ts in times.items():
            rows.append(
                {
                    "model": name,
                    "engine": e,
                    "threads": threads,
                    "images_per_s": round(TOWER_BATCH / statistics.median(ts), 2),
                    "max_abs_diff_vs_torch": diff if e != "torch" else 0.0,
                    "note": ort_factory if isinstance(ort_factory, str) else "",
                }
            )
    torch.set_num_threads(1)
    return rows


# -- the pipeline -----------------------------------------------------------------------------


def _no_ahead(items: Sequence[Any], work: Callable[[Any], Any]) -> Iterator[Any]:
    """The code before issue 32: each batch decoded only once the previous one is stored."""
    for item in items:
        yield work(item)


_DECODE_SIDE = embedding.decode_side


def _crop_side_only(bundle: ClipBundle, *, crops: bool = True) -> int:
    """The decode side before the whole pass decoded at the model's side: twice it, always."""
    del crops  # whichever pass asks
    return _DECODE_SIDE(bundle, crops=True)


def run_pipeline(
    settings: Settings, user_id: str, ids: list[str], serving: ServingModel, method: str, n_thr: int
) -> dict[str, float]:
    engine = make_engine(settings.database_url)
    factory = make_session_factory(engine)
    try:
        with factory() as s:
            s.execute(
                update(Image).values(
                    embedding=None, embedding_model=None, region_embeddings=None,
                    region_layout=None, embed_error=None,
                )
            )  # fmt: skip
            s.commit()
        gc.collect()
        settings.search.regions = "none" if method.startswith("off") else "five"
        settings.search.region_method = "both" if method.startswith("off") else method
        settings.model.onnx = "-onnx" in method  # every other row: PyTorch
        settings.threads.embedding = n_thr
        current = Image.embedding_model == serving.model_id
        bumps: list[float] = []
        bump = repositories.bump_index_generation

        def timed_bump(*, db_session: Any, user_id: str) -> None:
            bump(db_session=db_session, user_id=user_id)
            seen = db_session.scalar(select(func.count(Image.id)).where(current))
            if seen == len(ids):
                bumps.append(time.perf_counter() - t0)

        env = JobEnvironment(settings, factory, ImageStore(settings.data_dir), {}, lambda: serving)
        ctx = JobContext("bench", user_id, "embed_images", {}, env, lambda _: None)
        ahead = _no_ahead if method == "off-no-ahead" else embedding._ahead
        before = method.endswith("-before")  # the three levers of this round undone
        side = _crop_side_only if before else embedding.decode_side
        first = embedding.BATCH if before else embedding.FIRST_BATCH
        preview = 0 if before else embedding.PREVIEW_SIDE  # 0: the original is decoded
        with (
            patched(repositories, "bump_index_generation", timed_bump),
            patched(embedding, "_ahead", ahead),
            patched(embedding, "decode_side", side),
            patched(embedding, "FIRST_BATCH", first),
            patched(embedding, "PREVIEW_SIDE", preview),
        ):
            t0 = time.perf_counter()
            touched = embedding.embed_pending(ctx, ids, serving)
            done = time.perf_counter() - t0
        assert touched == len(ids), touched
        return {"searchable_s": bumps[0], "full_s": done}
    finally:
        engine.dispose()


def bench_scan(paths: dict[str, list[Path]], rounds: int) -> list[dict[str, Any]]:
    """What a library scan reads per new photo before embedding it: hash, validating decode and
    thumbnail (app.storage.inspect_file): as shipped (the thumbnail's draft decode, and the
    embedding's preview made from it), without the preview (the code before it), and with a
    full-size decode (the code before issue 32), alternating; median ms per photo."""
    limits = Settings().limits
    rows = []
    modes = ("preview", "draft", "full")
    print(f"\n{'scan: inspect a photo':<24}{'preview ms':>11}{'draft ms':>10}{'full ms':>10}")
    for size, files in paths.items():
        times: dict[str, list[float]] = {m: [] for m in modes}
        for r in range(rounds):
            for mode in modes if r % 2 == 0 else tuple(reversed(modes)):
                side = storage.THUMB_DRAFT if mode != "full" else 1 << 20  # 1 << 20: no draft
                preview = storage.PREVIEW_SIDE if mode == "preview" else 1 << 20  # none made
                with (
                    patched(storage, "THUMB_DRAFT", side),
                    patched(storage, "PREVIEW_SIDE", preview),
                ):
                    for f in files:
                        t = time.perf_counter()
                        storage.inspect_file(
                            f, max_bytes=limits.max_upload_bytes, max_pixels=limits.max_pixels
                        )
                        times[mode].append(time.perf_counter() - t)
        ms = {m: 1000 * statistics.median(times[m]) for m in modes}
        rows.append({"size": size, "preview_ms": round(ms["preview"], 1),
                     "draft_ms": round(ms["draft"], 1), "full_ms": round(ms["full"], 1),
                     "preview_over_draft": round(ms["preview"] / ms["draft"], 2),
                     "full_over_draft": round(ms["full"] / ms["draft"], 2),
                     "load": loadavg()})  # fmt: skip
        print(f"{size:<24}{ms['preview']:>11.1f}{ms['draft']:>10.1f}{ms['full']:>10.1f}")
    return rows


def bench_pipeline(
    models: dict[str, ServingModel],
    sizes: dict[str, int],
    rounds: int,
    root: Path,
    towers: Towers,
    only: set[str] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    runs: list[dict[str, Any]] = []
    paths: dict[str, list[Path]] = {}
    libraries: dict[str, tuple[Settings, str, list[str]]] = {}
    for size_name, n in sizes.items():
        w, h = (int(v) for v in size_name.split("x"))
        folder = root / size_name
        settings = Settings(
            data_dir=folder,
            database_url=f"sqlite:///{(folder / 'polar.db').as_posix()}",
            search=SearchSettings(regions="five"),
        )
        store = ImageStore(folder)
        files = [write_jpeg(store, synthetic_photo((w, h), seed), 1) for seed in range(n)]
        for f in files:  # the preview the upload or scan makes (the "-before" rows ignore it)
            info = storage.inspect_file(store.path(f["storage_path"]), max_bytes=1 << 30,
                                        max_pixels=1 << 30)  # fmt: skip
            store._write_preview(f["storage_path"], info.preview)
        engine = make_engine(settings.database_url)
        migrate(engine)
        user_id, ids = build_library(make_session_factory(engine), files)
        engine.dispose()
        libraries[size_name] = (settings, user_id, ids)
        paths[size_name] = [store.path(f["storage_path"]) for f in files]
    scan = bench_scan(paths, max(2, rounds))
    configs = [
        (m, size, thr, method)
        for m, size, thr, methods in CONFIGS
        if m in models and size in sizes
        for method in methods
        if not only or method in only or method == "off"  # "off": every row's baseline
    ]
    first = libraries[next(iter(sizes))]
    for m in models:  # warm-up, untimed: first-call allocations and lazy initialisation (and
        # the ONNX engine's export and check, once per process)
        run_pipeline(*first, models[m], "off", 1)
        if any(m == c[0] and "off-onnx" in c[3] for c in CONFIGS):
            run_pipeline(*first, models[m], "off-onnx", 1)
            run_pipeline(*first, models[m], "off-onnx", 2)
    print(f"\n{'pipeline':<34}{'searchable s':>13}{'full s':>9}{'photos/s':>10}{'load':>16}")
    for r in range(rounds):
        for m, size, thr, method in configs if r % 2 == 0 else list(reversed(configs)):
            settings, user_id, ids = libraries[size]
            before = towers.rates(m, thr)
            t = run_pipeline(settings, user_id, ids, models[m], method, thr)
            after = towers.rates(m, thr)  # the tower's rate around this run: the mean of both
            beside = {f"{e}_tower_per_s": (before[e] + after[e]) / 2 for e in before}
            row = {"round": r, "model": m, "size": size, "photos": len(ids), "threads": thr,
                   "regions": method, **t, **beside, "load": loadavg()}  # fmt: skip
            runs.append(row)
            label = f"{m} {size} {thr}t {method}"
            rate = len(ids) / t["searchable_s"]
            print(f"{label:<34}{t['searchable_s']:>13.2f}{t['full_s']:>9.2f}"
                  f"{rate:>10.2f}{row['load']:>16}", flush=True)  # fmt: skip
    return runs, scan


def summarize(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    keyed: dict[tuple[str, str, int, str], list[dict[str, Any]]] = {}
    for r in runs:
        keyed.setdefault((r["model"], r["size"], r["threads"], r["regions"]), []).append(r)
    rows = []
    for (m, size, thr, method), rs in keyed.items():
        n = rs[0]["photos"]
        searchable = statistics.median(r["searchable_s"] for r in rs)
        full = statistics.median(r["full_s"] for r in rs)
        off = statistics.median(r["searchable_s"] for r in keyed[(m, size, thr, "off")])
        rate = n / searchable

        def beside(engine: str, rs: list[dict[str, Any]] = rs) -> float | None:
            """Median over the rounds of this run's rate over the tower's, timed around it."""
            key = f"{engine}_tower_per_s"
            if key not in rs[0]:
                return None
            return round(statistics.median(r["photos"] / r["searchable_s"] / r[key] for r in rs), 2)

        rows.append(
            {
                "model": m, "size": size, "threads": thr, "regions": method, "photos": n,
                "searchable_s": round(searchable, 2), "full_s": round(full, 2),
                "searchable_photos_per_s": round(rate, 2),
                "full_photos_per_s": round(n / full, 2),
                "full_over_regions_off": round(full / off, 2),
                "searchable_speedup_over_off": round(off / searchable, 2),
                "searchable_over_torch_tower": beside("torch"),
                "searchable_over_ort_tower": beside("onnxruntime"),
                "hours_to_searchable_50k": round(LIBRARY / rate / 3600, 2),
                "hours_to_full_50k": round(LIBRARY / (n / full) / 3600, 2),
            }
        )  # fmt: skip
    lines = [
        f"{'model':<10}{'size':>10}{'thr':>4}{'regions':>14}{'search/s':>9}{'full/s':>8}"
        f"{'full/off':>9}{'x off':>7}{'vs torch':>9}{'vs ORT':>8}{'50k: h search':>14}{'h full':>8}"
    ]
    for row in rows:
        ort_ratio = row["searchable_over_ort_tower"]
        lines.append(
            f"{row['model']:<10}{row['size']:>10}{row['threads']:>4}{row['regions']:>14}"
            f"{row['searchable_photos_per_s']:>9.2f}{row['full_photos_per_s']:>8.2f}"
            f"{row['full_over_regions_off']:>9.2f}{row['searchable_speedup_over_off']:>7.2f}"
            f"{row['searchable_over_torch_tower']:>9.2f}"
            f"{'-' if ort_ratio is None else f'{ort_ratio:.2f}':>8}"
            f"{row['hours_to_searchable_50k']:>14.2f}{row['hours_to_full_50k']:>8.2f}"
        )
    return rows, lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run; nothing written")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--models", default="demo,ViT-B-32", help="comma list: demo, ViT-B-32")
    ap.add_argument("--sizes", default="1600x1200,4000x3000", help="comma list of photo sizes")
    ap.add_argument("--methods", default="", help="comma list: only these pipeline rows")
    args = ap.parse_args()
    # Two batches of embed_pending (BATCH = 32) at least: decoding ahead overlaps from the second.
    sizes = {"1600x1200": 4, "4000x3000": 2} if args.quick else {"1600x1200": 64, "4000x3000": 32}
    sizes = {k: v for k, v in sizes.items() if k in args.sizes.split(",")}
    rounds = 1 if args.quick else args.rounds
    torch.set_num_threads(1)
    load_before = loadavg()
    print(f"load average before: {load_before}")
    makers = {"demo": demo, "ViT-B-32": vit_b32}
    bundles = {k: makers[k]() for k in args.models.split(",")}
    models = {k: ServingModel(b, k, None) for k, b in bundles.items()}
    with tempfile.TemporaryDirectory(prefix="polar-index-speed-") as tmp:
        root = Path(tmp)
        pictures = [synthetic_photo((1600, 1200), seed) for seed in range(4)]
        towers: list[dict[str, Any]] = []
        tower_set = Towers()
        print(f"\n{'tower':<24}{'threads':>8}{'images/s':>10}{'max |diff|':>12}")
        for name, bundle in bundles.items():
            reps = 3 if args.quick else 6
            for row in bench_tower(name, bundle, pictures, reps, root, tower_set):
                towers.append(row)
                diff = row["max_abs_diff_vs_torch"]
                print(f"{name + ' ' + row['engine']:<24}{row['threads']:>8}"
                      f"{row['images_per_s']:>10.2f}{'' if diff is None else f'{diff:.1e}':>12}"
                      f"  {row['note']}")  # fmt: skip
        only = set(args.methods.split(",")) - {""}
        runs, scan = bench_pipeline(models, sizes, rounds, root, tower_set, only)
    rows, lines = summarize(runs)
    load_after = loadavg()
    print("\n" + "\n".join(lines))
    print(f"\nload average before {load_before}, after {load_after}")
    result = {
        "benchmark": "index_speed",
        "machine": {"cpus": len(__import__("os").sched_getaffinity(0)),
                    "python": platform.python_version(), "torch": torch.__version__},
        "load_before": load_before,
        "load_after": load_after,
        "sizes": sizes,
        "rounds": rounds,
        "towers": towers,
        "scan_inspect": scan,
        "summary": rows,
        "runs": runs,
    }  # fmt: skip
    save_result(result, args.out, OUT, args.quick)


if __name__ == "__main__":
    main()
