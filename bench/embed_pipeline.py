"""The embedding pipeline of app.services.embedding.embed_pending: JPEG draft decoding and the
time until a new library is searchable. Every comparison is a ratio taken in the same run.

  decode    median time of `_open_rgb` on camera-like JPEGs (4032x3024 quality 90, landscape
            and EXIF-rotated portrait; and 1920x1080): full decode (min_side=0) vs draft decode
            at `decode_side` of ViT-B-32 (448), one pass over the files per mode, the modes'
            order rotating, the files in the page cache; the pictures held until the pass ends
            (as embed_pending holds a batch) or freed at once, and the JPEG decode alone;
  fidelity  what draft decoding changes in the model's view: cosine between the embedding of the
            full-decoded and of the draft-decoded picture, whole image and each of the 5 crops
            (layout "five"), for ViT-B-32 with random weights and for the bundled demo model
            (trained weights), each at its own decode_side; set against the cosine between
            different pictures, and the PSNR of the preprocessed model input;
  job       the real embed_pending on a SQLite library of 48 such JPEGs, ViT-B-32 with random
            weights (cost does not depend on the values), layout "five": wall time until every
            image has a whole embedding and the index generation is bumped (searchable) and
            until the job returns (done); with draft decoding (as shipped) and with it switched
            off (decode_side -> 0) as the baseline, alternating.

The pictures are synthetic but photo-like (smooth colour fields, soft and hard-edged shapes,
blotchy texture, patches of fine stripes and sensor-like noise; about 2.6 MB per 12 MP file at
quality 90): pure noise would make JPEGs of unrealistic size and decode cost.

Prints tables, writes bench/results/embed_pipeline.json; never run by the tests.

    .venv/bin/python bench/embed_pipeline.py           # about 4-5 minutes on 2 shared CPUs
    .venv/bin/python bench/embed_pipeline.py --quick   # smoke run, nothing written
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
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

import numpy as np
import torch
from PIL import Image as PILImage
from PIL import ImageDraw
from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from app import repositories
from app.bench.harness import demo, loadavg, vit_b32
from app.config import SearchSettings, Settings
from app.db import make_engine, make_session_factory, migrate
from app.ml.encode import encode_images
from app.ml.model import (
    DEMO_MODEL_NAME,
    ClipBundle,
)
from app.ml.regions import LAYOUTS, crop_regions, encode_regions
from app.models import Image, utcnow
from app.services import embedding
from app.services.embedding import _open_rgb, decode_side, embed_pending
from app.services.job_runs import JobContext, JobEnvironment
from app.services.model import ServingModel
from app.services.users import create_user
from app.storage import ImageStore

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "embed_pipeline.json"
CAMERA = (4032, 3024)  # a 12 MP phone photo
HD = (1920, 1080)
QUALITY = 90
LAYOUT = "five"
BOXES = LAYOUTS[LAYOUT]
PORTRAIT_EVERY = 4  # every 4th library photo is a portrait shot: EXIF orientation 6
NOISE_SIGMA = 4.0  # sensor-like noise, in 8-bit levels


# -- pictures -------------------------------------------------------------------------------

_noise_bank: dict[tuple[int, int], np.ndarray] = {}


def synthetic_photo(size: tuple[int, int], seed: int) -> PILImage.Image:
    """A photo-like RGB picture: a smooth colour field with soft-edged shapes and blotchy
    texture (drawn at a quarter of the size and upsampled), then full-resolution detail: a few
    hard-edged shapes and patches of fine stripes (2.5-8 px period, what a draft decode could
    alias), and per-pixel sensor-like noise."""
    w, h = size
    rng = np.random.default_rng(seed)
    sw, sh = w // 4, h // 4

    def shapes(draw: ImageDraw.ImageDraw, n: int, width: int, height: int) -> None:
        for _ in range(n):
            x, y = rng.uniform(0, width), rng.uniform(0, height)
            rx = rng.uniform(0.02, 0.15) * width
            ry = rx * rng.uniform(0.5, 2.0)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape([x - rx, y - ry, x + rx, y + ry], fill=colour)

    field = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
    base = PILImage.fromarray(field, "RGB").resize((sw, sh), PILImage.Resampling.BICUBIC)
    shapes(ImageDraw.Draw(base), 20, sw, sh)
    blotches = rng.normal(128, 20, size=(sh // 4, sw // 4, 3)).clip(0, 255).astype(np.uint8)
    texture = PILImage.fromarray(blotches, "RGB").resize((sw, sh), PILImage.Resampling.BICUBIC)
    small = np.asarray(base, np.int16) + np.asarray(texture, np.int16) - 128
    big = PILImage.fromarray(small.clip(0, 255).astype(np.uint8), "RGB").resize(
        (w, h), PILImage.Resampling.BICUBIC
    )
    shapes(ImageDraw.Draw(big), 6, w, h)  # hard edges at full resolution
    pixels = np.asarray(big, np.int16).copy()
    for _ in range(4):  # fine stripes, at any angle, 40 levels of contrast
        pw, ph = int(rng.uniform(0.1, 0.25) * w), int(rng.uniform(0.1, 0.25) * h)
        x0, y0 = int(rng.integers(0, w - pw)), int(rng.integers(0, h - ph))
        period, angle = rng.uniform(2.5, 8.0), rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:ph, 0:pw].astype(np.float32)
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period)
        pixels[y0 : y0 + ph, x0 : x0 + pw] += (20 * np.sign(np.sin(phase))).astype(np.int16)[
            ..., None
        ]
    if size not in _noise_bank:  # one noise field per size, cut at a random offset per photo
        g = np.random.default_rng(1)
        _noise_bank[size] = g.normal(0, NOISE_SIGMA, (h + 64, w + 64, 3)).round().astype(np.int16)
    dy, dx = (int(v) for v in rng.integers(0, 64, 2))
    pixels += _noise_bank[size][dy : dy + h, dx : dx + w]
    return PILImage.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")


def write_jpeg(store: ImageStore, picture: PILImage.Image, orientation: int) -> dict[str, Any]:
    """Store the picture as a quality-90 JPEG where uploads go; its Image row's columns."""
    buf = io.BytesIO()
    exif = PILImage.Exif()
    exif[0x0112] = orientation
    picture.save(buf, "JPEG", quality=QUALITY, exif=exif.tobytes())
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    relpath = store.original_relpath(sha, "jpg")
    path = store.path(relpath)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    w, h = picture.size
    return {
        "sha256": sha,
        "storage_path": relpath,
        "size_bytes": len(data),
        "width": h if orientation in (5, 6, 7, 8) else w,
        "height": w if orientation in (5, 6, 7, 8) else h,
        "orientation": orientation,
    }


# -- decode ---------------------------------------------------------------------------------


def _pixels_only(store: ImageStore, path: str, min_side: int) -> PILImage.Image:
    """The JPEG decode alone (draft as _open_rgb sets it): no EXIF transpose, no convert."""
    with PILImage.open(store.path(path)) as im:
        if min_side:
            im.draft("RGB", (min_side, min_side))
        im.load()
        return im


# (what is called, min_side is the draft side?, the result is held until the pass ends?)
DECODE_MODES: dict[str, tuple[str, bool, bool]] = {
    "full": ("open_rgb", False, True),
    "draft": ("open_rgb", True, True),
    "full_freed": ("open_rgb", False, False),
    "draft_freed": ("open_rgb", True, False),
    "full_pixels_only": ("pixels", False, True),
    "draft_pixels_only": ("pixels", True, True),
}


def bench_decode(
    store: ImageStore, cases: dict[str, list[str]], side: int, reps: int
) -> list[dict[str, Any]]:
    """Seconds per `_open_rgb` call, full vs draft: per repetition one pass over the files per
    mode, the modes' order rotating. `full`/`draft` keep the decoded pictures until their pass
    ends, as embed_pending holds a batch; `_freed` drops each at once; `_pixels_only` is the
    decode without _open_rgb's EXIF transpose and RGB convert (each returns a copy)."""
    print(f"{'decode (ms per image)':<30}{'files':>6}{'MB':>6}{'full':>8}{'draft':>8}"
          f"{'full/draft':>12}{'freed: full':>13}{'draft':>7}{'pixels only: full':>19}"
          f"{'draft':>7}{'draft size':>12}")  # fmt: skip
    rows = []
    modes = list(DECODE_MODES)
    for name, paths in cases.items():
        for p in paths:  # warm-up: the files into the page cache, the decoder's tables
            _open_rgb(store, p, 0)
            _open_rgb(store, p, side)
        times: dict[str, list[float]] = {m: [] for m in modes}
        pair: list[float] = []
        sizes: dict[str, tuple[int, int]] = {}
        for i in range(reps):
            k = i % len(modes)
            per_rep: dict[str, list[float]] = {}
            for mode in modes[k:] + modes[:k]:  # one pass over the files per mode
                what, draft, hold = DECODE_MODES[mode]
                min_side = side if draft else 0
                held: list[PILImage.Image] = []
                for p in paths:
                    t0 = time.perf_counter()
                    if what == "open_rgb":
                        im = _open_rgb(store, p, min_side)
                    else:
                        im = _pixels_only(store, p, min_side)
                    times[mode].append(time.perf_counter() - t0)
                    per_rep.setdefault(mode, []).append(times[mode][-1])
                    assert im is not None
                    sizes[mode] = im.size
                    if hold:
                        held.append(im)
                    del im
                del held
            pair.append(statistics.median(per_rep["full"]) / statistics.median(per_rep["draft"]))
        ms = {m: 1000 * statistics.median(times[m]) for m in modes}
        mb = statistics.mean(store.path(p).stat().st_size for p in paths) / 1e6
        row: dict[str, Any] = {
            "case": name,
            "files": len(paths),
            "reps": reps,
            "mean_file_mb": round(mb, 2),
            "decoded_size_full": list(sizes["full"]),
            "decoded_size_draft": list(sizes["draft"]),
            "min_side": side,
            **{f"{m}_ms": round(v, 2) for m, v in ms.items()},
            "full_over_draft": round(ms["full"] / ms["draft"], 2),
            "per_rep_full_over_draft_median_min_max": [
                round(statistics.median(pair), 2),
                round(min(pair), 2),
                round(max(pair), 2),
            ],
            "freed_full_over_draft": round(ms["full_freed"] / ms["draft_freed"], 2),
            "pixels_only_full_over_draft": round(
                ms["full_pixels_only"] / ms["draft_pixels_only"], 2
            ),
        }
        rows.append(row)
        dsz = "x".join(str(v) for v in sizes["draft"])
        print(f"{name:<30}{len(paths):>6}{mb:>6.2f}{ms['full']:>8.1f}{ms['draft']:>8.1f}"
              f"{row['full_over_draft']:>12.2f}{ms['full_freed']:>13.1f}{ms['draft_freed']:>7.1f}"
              f"{ms['full_pixels_only']:>19.1f}{ms['draft_pixels_only']:>7.1f}{dsz:>12}",
              flush=True)  # fmt: skip
    return rows


# -- fidelity -------------------------------------------------------------------------------


def _unnormalize(bundle: ClipBundle) -> Callable[[torch.Tensor], torch.Tensor]:
    """Model input tensor -> pixels in [0, 1] (inverse of the preprocess's Normalize)."""
    norm = next(t for t in getattr(bundle.preprocess, "transforms", []) if hasattr(t, "std"))
    mean = torch.tensor(norm.mean).view(3, 1, 1)
    std = torch.tensor(norm.std).view(3, 1, 1)
    return lambda x: x * std + mean


def _psnr(bundle: ClipBundle, a: list[PILImage.Image], b: list[PILImage.Image]) -> list[float]:
    """PSNR (dB) between the model inputs (after resize and centre crop) of paired pictures."""
    back = _unnormalize(bundle)
    out = []
    for x, y in zip(a, b, strict=True):
        px, py = back(bundle.preprocess(x)), back(bundle.preprocess(y))
        mse = float(((px - py) ** 2).mean())
        out.append(10 * np.log10(1.0 / max(mse, 1e-12)))
    return out


def _stats(v: np.ndarray | list[float], digits: int = 7) -> dict[str, float]:
    a = np.asarray(v, dtype=np.float64)
    return {"mean": round(float(a.mean()), digits), "min": round(float(a.min()), digits)}


def _gap(cos: np.ndarray) -> dict[str, float]:
    """1 - cosine, mean and max, three significant digits."""
    a = 1 - np.asarray(cos, dtype=np.float64)
    return {"mean": float(f"{a.mean():.3g}"), "max": float(f"{a.max():.3g}")}


def bench_fidelity(
    name: str, bundle: ClipBundle, store: ImageStore, paths: list[str]
) -> dict[str, Any]:
    """Full vs draft decode of the same files, in the model's embedding space."""
    side = decode_side(bundle)
    full = [_open_rgb(store, p, 0) for p in paths]
    draft = [_open_rgb(store, p, side) for p in paths]
    assert all(im is not None for im in full + draft)
    fulls = [im for im in full if im is not None]
    drafts = [im for im in draft if im is not None]
    whole_f, whole_d = encode_images(bundle, fulls), encode_images(bundle, drafts)  # (N, D)
    crops_f = encode_regions(bundle, fulls, LAYOUT)  # (N, R, D)
    crops_d = encode_regions(bundle, drafts, LAYOUT)
    cos_whole = (whole_f * whole_d).sum(-1)  # (N,)
    cos_crops = (crops_f * crops_d).sum(-1)  # (N, R)
    n = len(paths)
    # Scale: the same crop box of two different pictures, and two different pictures whole.
    off = ~np.eye(n, dtype=bool)
    between_whole = (whole_f @ whole_f.T)[off]
    between_crops = np.einsum("ird,jrd->rij", crops_f, crops_f)[:, off]
    # Is each draft embedding nearest to its own full-decode embedding (of all N)?
    top1_whole = int((np.argmax(whole_d @ whole_f.T, axis=1) == np.arange(n)).sum())
    psnr_whole = _psnr(bundle, fulls, drafts)
    psnr_crops = _psnr(
        bundle,
        [c for im in fulls for c in crop_regions(im, BOXES)],
        [c for im in drafts for c in crop_regions(im, BOXES)],
    )
    gap_whole = float((1 - cos_whole).mean() / (1 - between_whole).mean())
    gap_crops = float((1 - cos_crops).mean() / (1 - between_crops).mean())
    row = {
        "model": name,
        "decode_side": side,
        "images": n,
        "draft_size": list(drafts[0].size),
        "full_size": list(fulls[0].size),
        "cos_full_vs_draft_whole": _stats(cos_whole),
        "cos_full_vs_draft_crops": _stats(cos_crops),
        "cos_full_vs_draft_per_crop_box": [_stats(cos_crops[:, r]) for r in range(len(BOXES))],
        "one_minus_cos_full_vs_draft_whole": _gap(cos_whole),
        "one_minus_cos_full_vs_draft_crops": _gap(cos_crops),
        "one_minus_cos_between_pictures_whole": _gap(between_whole),
        "one_minus_cos_between_pictures_same_crop_box": _gap(between_crops),
        "cos_between_pictures_whole": {
            **_stats(between_whole, 4),
            "max": round(float(between_whole.max()), 4),
        },
        "cos_between_pictures_same_crop_box": {
            **_stats(between_crops, 4),
            "max": round(float(between_crops.max()), 4),
        },
        "draft_gap_over_between_gap_whole": float(f"{gap_whole:.3g}"),
        "draft_gap_over_between_gap_crops": float(f"{gap_crops:.3g}"),
        "draft_nearest_own_full_whole": f"{top1_whole}/{n}",
        "psnr_db_model_input_whole": _stats(psnr_whole, 2),
        "psnr_db_model_input_crops": _stats(psnr_crops, 2),
    }
    print(
        f"{name:<31}{side:>5}{1 - cos_whole.mean():>10.1e}{1 - cos_whole.min():>9.1e}"
        f"{1 - cos_crops.mean():>10.1e}{1 - cos_crops.min():>9.1e}"
        f"{1 - between_whole.mean():>9.3f}{1 - between_crops.mean():>9.3f}"
        f"{np.mean(psnr_whole):>8.1f}{np.mean(psnr_crops):>8.1f}{top1_whole:>5}/{n}",
        flush=True,
    )
    return row


# -- the job --------------------------------------------------------------------------------


@contextmanager
def patched(module: Any, name: str, replacement: Any) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


def build_library(
    factory: sessionmaker[Session], files: list[dict[str, Any]]
) -> tuple[str, list[str]]:
    """A user with one un-embedded Image row per stored file; (user id, image ids)."""
    now = utcnow()
    with factory() as s:
        user_id = create_user("pipeline", db_session=s).id
        rows = []
        for i, f in enumerate(files):
            rows.append(
                {
                    "id": f"00000000-0000-4000-8000-{i:012d}",
                    "user_id": user_id,
                    "vec_id": i + 1,
                    "sha256": f["sha256"],
                    "original_filename": f"IMG_{i:04d}.jpg",
                    "mime": "image/jpeg",
                    "size_bytes": f["size_bytes"],
                    "width": f["width"],
                    "height": f["height"],
                    "storage_path": f["storage_path"],
                    "created_at": now,
                }
            )
        s.execute(insert(Image), rows)
        s.commit()
    return user_id, [r["id"] for r in rows]


def run_job(
    settings: Settings,
    factory: sessionmaker[Session],
    user_id: str,
    ids: list[str],
    serving: ServingModel,
    draft: bool,
) -> dict[str, Any]:
    """One embed_pending over the whole library (reset first); times of its milestones."""
    model_id, n = serving.model_id, len(ids)
    with factory() as s:
        s.execute(
            update(Image).values(
                embedding=None, embedding_model=None, region_embeddings=None, region_layout=None
            )
        )
        s.commit()
    gc.collect()
    current = Image.embedding_model == model_id

    def counts(s: Session) -> tuple[int, int]:
        row = s.execute(
            select(
                func.count(Image.id).filter(current),
                func.count(Image.id).filter(current, Image.region_layout == LAYOUT),
            ).where(Image.user_id == user_id)
        ).one()
        return int(row[0]), int(row[1])

    t0 = time.perf_counter()
    progress: list[tuple[float, float, int, int]] = []  # (s, fraction, whole, with crops)
    bumps: list[tuple[float, int]] = []  # (s, images embedded as the bump's session sees it)
    decode_s: list[float] = []
    encode_whole_s: list[float] = []
    encode_crops_s: list[float] = []

    def on_progress(fraction: float) -> None:
        with factory() as s:
            whole, crops = counts(s)
        progress.append((time.perf_counter() - t0, fraction, whole, crops))

    bump = repositories.bump_index_generation

    def timed_bump(*, db_session: Session, user_id: str) -> None:
        bump(db_session=db_session, user_id=user_id)
        bumps.append((time.perf_counter() - t0, counts(db_session)[0]))

    def timed(fn: Callable[..., Any], into: list[float]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                into.append(time.perf_counter() - t)

        return wrapper

    env = JobEnvironment(settings, factory, ImageStore(settings.data_dir), {}, lambda: serving)
    ctx = JobContext("bench", user_id, "embed_images", {}, env, on_progress)
    with (
        patched(repositories, "bump_index_generation", timed_bump),
        patched(embedding, "_open_rgb", timed(embedding._open_rgb, decode_s)),
        patched(embedding, "encode_pixels", timed(embedding.encode_pixels, encode_whole_s)),
        patched(embedding, "encode_regions", timed(embedding.encode_regions, encode_crops_s)),
        patched(embedding, "decode_side", embedding.decode_side if draft else lambda _bundle: 0),
    ):
        t0 = time.perf_counter()
        touched = embed_pending(ctx, ids, serving)
        done = time.perf_counter() - t0
    with factory() as s:
        assert counts(s) == (n, n) and touched == n, (counts(s), touched)
    all_whole = next(t for t, _, whole, _ in progress if whole == n)
    searchable = next(t for t, seen in bumps if seen == n)
    first_crops = next(t for t, _, _, crops in progress if crops > 0)
    assert all(crops == 0 for t, _, _, crops in progress if t <= all_whole)
    assert len(decode_s) == 2 * n  # each image decoded once per pass
    return {
        "decode": "draft" if draft else "full",
        "searchable_s": round(searchable, 2),
        "done_s": round(done, 3),
        "searchable_over_done": round(searchable / done, 3),
        "all_whole_committed_s": round(all_whole, 2),
        "first_bump_s": round(bumps[0][0], 2),
        "bumps": len(bumps),
        "first_crops_committed_s": round(first_crops, 2),
        "progress_at_searchable": round(
            max(f for t, f, _, _ in progress if t <= all_whole + 1e-9), 4
        ),
        "whole_pass_decode_s": round(sum(decode_s[:n]), 2),
        "whole_pass_encode_s": round(sum(encode_whole_s), 2),
        "crop_pass_decode_s": round(sum(decode_s[n:]), 2),
        "decode_median_ms_per_image": round(1000 * statistics.median(decode_s), 1),
        "crop_pass_encode_s": round(sum(encode_crops_s), 2),
    }


def bench_job(
    store_root: Path, files: list[dict[str, Any]], serving: ServingModel, reps: int
) -> list[dict[str, Any]]:
    """embed_pending on the library, draft and full decoding alternating (ABBA...)."""
    db_path = store_root / "polar.db"
    settings = Settings(
        data_dir=store_root,
        database_url=f"sqlite:///{db_path.as_posix()}",
        search=SearchSettings(regions=LAYOUT),
    )
    engine = make_engine(settings.database_url)
    runs = []
    print(f"\n{'job, ' + str(len(files)) + ' photos':<18}{'searchable s':>14}{'done s':>9}"
          f"{'searchable/done':>17}{'progress':>10}{'decode s':>10}{'encode s':>10}"
          f"{'crops: decode s':>17}{'encode s':>10}")  # fmt: skip
    try:
        migrate(engine)
        factory = make_session_factory(engine)
        user_id, ids = build_library(factory, files)
        for i in range(reps):
            order = (True, False) if i % 2 == 0 else (False, True)
            for draft in order:
                r = run_job(settings, factory, user_id, ids, serving, draft)
                r["rep"] = i
                runs.append(r)
                print(f"{r['decode']:<18}{r['searchable_s']:>14.2f}{r['done_s']:>9.2f}"
                      f"{r['searchable_over_done']:>17.3f}{r['progress_at_searchable']:>10.3f}"
                      f"{r['whole_pass_decode_s']:>10.2f}{r['whole_pass_encode_s']:>10.2f}"
                      f"{r['crop_pass_decode_s']:>17.2f}{r['crop_pass_encode_s']:>10.2f}",
                      flush=True)  # fmt: skip
    finally:
        engine.dispose()
    return runs


def summarize_jobs(runs: list[dict[str, Any]], n: int) -> dict[str, Any]:
    med: dict[str, dict[str, float]] = {}
    for mode in ("draft", "full"):
        rs = [r for r in runs if r["decode"] == mode]
        med[mode] = {
            k: round(statistics.median(float(r[k]) for r in rs), 3)
            for k in (
                "searchable_s",
                "done_s",
                "searchable_over_done",
                "whole_pass_decode_s",
                "whole_pass_encode_s",
                "crop_pass_decode_s",
                "crop_pass_encode_s",
            )
        }
    d, f = med["draft"], med["full"]
    out = {
        "medians": med,
        "full_over_draft_searchable": round(f["searchable_s"] / d["searchable_s"], 3),
        "full_over_draft_done": round(f["done_s"] / d["done_s"], 3),
        "draft_images_per_s_done": round(n / d["done_s"], 3),
        "draft_images_per_s_searchable": round(n / d["searchable_s"], 3),
    }
    print(
        f"\nmedians: draft searchable {d['searchable_s']:.1f} s of {d['done_s']:.1f} s "
        f"({d['searchable_over_done']:.3f}); full decode searchable {f['searchable_s']:.1f} s "
        f"of {f['done_s']:.1f} s ({f['searchable_over_done']:.3f}); full/draft: searchable "
        f"{out['full_over_draft_searchable']:.2f}x, done {out['full_over_draft_done']:.2f}x"
    )
    return out


# -- main -----------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small library, one rep; no JSON")
    p.add_argument("--library", type=int, default=48, help="photos in the job's library")
    p.add_argument("--decode-files", type=int, default=6, help="files per decode case")
    p.add_argument("--decode-reps", type=int, default=5, help="passes over each decode case")
    p.add_argument("--fidelity-images", type=int, default=10, help="photos for the cosines")
    p.add_argument("--job-reps", type=int, default=2, help="draft/full pairs of jobs (ABBA)")
    p.add_argument("--out", type=Path, default=None, help=f"JSON path (default {OUT.name})")
    args = p.parse_args()
    if args.quick:
        args.library, args.decode_files, args.decode_reps = 12, 2, 2
        args.fidelity_images, args.job_reps = 4, 1
    # One thread: the cores are shared, and the service runs torch with one (ModelSettings).
    torch.set_num_threads(1)
    load_before = loadavg()
    t_start = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="polar-pipeline-") as tmp:
        root = Path(tmp)
        store = ImageStore(root)
        t = time.perf_counter()
        library = [
            write_jpeg(
                store,
                synthetic_photo(CAMERA, seed),
                6 if seed % PORTRAIT_EVERY == PORTRAIT_EVERY - 1 else 1,
            )
            for seed in range(args.library)
        ]
        hd = [
            write_jpeg(store, synthetic_photo(HD, 1000 + seed), 1)
            for seed in range(args.decode_files)
        ]
        made_s = time.perf_counter() - t
        mb = statistics.mean(f["size_bytes"] for f in library) / 1e6
        print(
            f"{len(library)} camera photos ({mb:.2f} MB each) and {len(hd)} HD in {made_s:.0f} s\n"
        )
        landscape = [f["storage_path"] for f in library if f["orientation"] == 1]
        portrait = [f["storage_path"] for f in library if f["orientation"] == 6]
        vit = vit_b32()
        side = decode_side(vit)
        cases = {
            "4032x3024 landscape": landscape[: args.decode_files],
            "4032x3024 portrait (EXIF 6)": portrait[: args.decode_files],
            "1920x1080": [f["storage_path"] for f in hd],
        }
        decode_rows = bench_decode(store, cases, side, args.decode_reps)

        print(f"\n{'1 - cos, full vs draft decode':<31}{'side':>5}{'whole':>10}{'max':>9}"
              f"{'crops':>10}{'max':>9}{'betw. W':>9}{'betw. C':>9}"
              f"{'PSNR W':>8}{'PSNR C':>8}{'top1':>7}")  # fmt: skip
        picks = [f["storage_path"] for f in library[: args.fidelity_images]]
        fidelity_rows = [
            bench_fidelity("ViT-B-32 (random weights)", vit, store, picks),
            bench_fidelity(f"{DEMO_MODEL_NAME} (bundled, trained)", demo(), store, picks),
        ]
        gc.collect()

        serving = ServingModel(vit, "ViT-B-32/random", None)
        runs = bench_job(root, library, serving, args.job_reps)
        job_summary = summarize_jobs(runs, len(library))

    result = {
        "pictures": {
            "camera_size": list(CAMERA),
            "hd_size": list(HD),
            "jpeg_quality": QUALITY,
            "noise_sigma": NOISE_SIGMA,
            "camera_mean_mb": round(mb, 3),
            "library": len(library),
            "library_portrait_exif6": sum(f["orientation"] == 6 for f in library),
            "what": "synthetic photo-like: colour field, soft and hard shapes, texture, fine "
            "stripes, sensor noise",
        },
        "decode": {
            "what": "_open_rgb(store, path, min_side): full = 0, draft = decode_side(ViT-B-32)",
            "rows": decode_rows,
        },
        "fidelity": {
            "what": "cosine of embeddings of the full- vs the draft-decoded picture, whole and "
            "the 5 crops; 'between' = different pictures (same crop box); gap = mean(1 - cos "
            "full vs draft) / mean(1 - cos between pictures); PSNR of the preprocessed input",
            "layout": LAYOUT,
            "rows": fidelity_rows,
        },
        "job": {
            "what": "embed_pending(ctx, ids, serving) on SQLite, ViT-B-32 random weights, "
            "layout five, batch 32; searchable = the generation bump that publishes the last "
            "whole embedding; done = embed_pending returns; baseline: decode_side -> 0",
            "images": len(library),
            "batch": embedding.BATCH,
            "publish_interval_s": embedding.PUBLISH_INTERVAL_S,
            "runs": runs,
            **job_summary,
        },
        "threads": 1,
        "total_s": round(time.perf_counter() - t_start, 1),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "pillow": PILImage.__version__,
        "command": "bench/embed_pipeline.py " + " ".join(sys.argv[1:]),
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
