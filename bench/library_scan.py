"""Folders indexed in place vs uploads (issue 15): the same photos, one run.

Two real `polar serve`s (embedded jobs, demo model; SQLite unless --database-url), one per path,
each with its own data folder (stored files are shared by content across users), and a folder
of camera-sized JPEGs (the demo world's scenes, upscaled to --size and saved at quality 90, so
that decoding and thumbnailing cost what real photos cost). Per round, a fresh user of each:

  upload   POST /images in batches of 50 (what `polar upload` does), until every photo is
           embedded; the originals are copied into the data folder;
  scan     POST /libraries on the folder, until its scan job (walk, validate, hash, thumbnail,
           embed) ended; only thumbnails are written;
  rescan   POST /libraries/{id}/scan with nothing changed (what the periodic rescan costs:
           one stat per file), then again after --touch of the files were rewritten.

The two paths run in alternating order over --rounds rounds; medians, and the best round of
each (on a machine shared with other work the best round is the least disturbed one).
Throughput is photos per second end to end (request to searchable); the first round's growth of
each data folder says what each path stores. Prints a table, writes
bench/results/library_scan.json; never run by the tests.

    .venv/bin/python bench/library_scan.py             # 400 photos, 4 rounds: about 8 minutes
    .venv/bin/python bench/library_scan.py --quick     # 60 photos, 1 round; nothing written
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image as PILImage

from app.bench.harness import loadavg, save_result
from app.bench.served import polar_cli, server_env, wait_job
from app.demo.run_demo import (
    FIDO_CATEGORY,
    FIDO_INDEX,
    build_library,
    free_port,
    local_server,
)
from app.demo.world import World

OUT = Path(__file__).parent / "results" / "library_scan.json"


def write_photos(folder: Path, n: int, size: tuple[int, int]) -> int:
    """`n` JPEGs of distinct content in `folder` (nested like a camera roll); total bytes."""
    world = World(seed=0)
    items = build_library(world, world.instance(FIDO_INDEX, FIDO_CATEGORY), 4, max(n, 40))
    rng = np.random.default_rng(0)
    total = 0
    for i in range(n):
        base = PILImage.open(io.BytesIO(items[i % len(items)].png)).convert("RGB")
        big = np.asarray(base.resize(size, PILImage.Resampling.BICUBIC), dtype=np.float32)
        big += rng.normal(0, 4, big.shape)  # sensor noise: each photo's bytes differ
        path = folder / f"{2020 + i % 5}" / f"{i % 12 + 1:02d}" / f"IMG_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        PILImage.fromarray(np.clip(big, 0, 255).astype(np.uint8)).save(path, quality=90)
        total += path.stat().st_size
    return total


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def new_user(env: dict[str, str], base: str, name: str) -> httpx.Client:
    found = re.search(r"api_key: (\S+)", polar_cli("create-user", name, env=env))
    assert found is not None
    return httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {found.group(1)}"}, timeout=600
    )


def run_upload(client: httpx.Client, files: list[Path]) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(files), 50):
        batch = files[start : start + 50]
        parts = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in batch]
        job = client.post("/images", files=parts).raise_for_status().json()["job"]
        if job:
            wait_job(client, job["id"])
    return time.perf_counter() - t0


def run_scan(client: httpx.Client, folder: Path) -> tuple[float, str, dict[str, Any]]:
    t0 = time.perf_counter()
    lib = client.post("/libraries", json={"path": str(folder)}).raise_for_status().json()
    wait_job(client, lib["job"]["id"])
    seconds = time.perf_counter() - t0
    report = client.get(f"/libraries/{lib['id']}").raise_for_status().json()["report"]
    return seconds, str(lib["id"]), dict(report)


def run_rescan(client: httpx.Client, library_id: str) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    job = client.post(f"/libraries/{library_id}/scan").raise_for_status().json()
    wait_job(client, job["id"])
    seconds = time.perf_counter() - t0
    report = client.get(f"/libraries/{library_id}").raise_for_status().json()["report"]
    return seconds, dict(report)


def searchable(client: httpx.Client) -> int:
    return int(client.get("/index").raise_for_status().json()["embedded"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=int, default=400)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--size", default="1600x1200", help="photo size, WxH")
    p.add_argument("--touch", type=float, default=0.1, help="fraction rewritten before a rescan")
    p.add_argument("--database-url", default="", help="empty = SQLite in the work folder")
    p.add_argument("--quick", action="store_true", help="60 photos, 1 round; nothing written")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    if a.quick:
        a.photos, a.rounds = 60, 1
    w, h = (int(x) for x in a.size.lower().split("x"))
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="polar-scan-bench-") as tmp:
        work = Path(tmp)
        photos = work / "photos"
        print(f"writing {a.photos} photos of {w}x{h} ...", flush=True)
        photo_bytes = write_photos(photos, a.photos, (w, h))
        files = sorted(photos.rglob("*.jpg"))
        # One server per path, each with its own data folder: stored files are shared by
        # content across users, so one folder would hide what the second path stores.
        envs = {
            path: server_env(
                work / f"data-{path}",
                a.database_url,
                POLAR_LIBRARY__ROOTS=json.dumps([str(photos)]),
                POLAR_LIBRARY__WATCH="false",  # only the scans this script asks for
                POLAR_LIBRARY__RESCAN_INTERVAL_S="0",
            )
            for path in ("upload", "scan")
        }
        for env in envs.values():
            polar_cli("migrate", env=env)
        kinds = ("upload", "scan", "rescan", "rescan_touched")
        rows: dict[str, list[float]] = {k: [] for k in kinds}
        stored: dict[str, int] = {}
        reports: list[dict[str, Any]] = []
        with (
            local_server(envs["upload"], free_port(), work / "upload.log") as upload_base,
            local_server(envs["scan"], free_port(), work / "scan.log") as scan_base,
        ):
            bases = {"upload": upload_base, "scan": scan_base}
            for r in range(a.rounds):
                order = ("upload", "scan") if r % 2 == 0 else ("scan", "upload")
                for path in order:
                    data = work / f"data-{path}"
                    before = folder_bytes(data)
                    with new_user(envs[path], bases[path], f"{path}-{r}") as client:
                        if path == "upload":
                            rows["upload"].append(run_upload(client, files))
                        else:
                            seconds, library_id, report = run_scan(client, photos)
                            rows["scan"].append(seconds)
                            reports.append(report)
                        n = searchable(client)
                        assert n == len(files), f"{path}: {n} of {len(files)} searchable"
                        if r == 0:  # the first user of a fresh data folder: all it stores
                            stored[path] = folder_bytes(data) - before
                        if path == "scan":
                            seconds, _ = run_rescan(client, library_id)
                            rows["rescan"].append(seconds)
                            touched = files[:: max(1, round(1 / a.touch))] if a.touch else []
                            for f in touched:  # the same pixels, new bytes and mtime
                                f.write_bytes(f.read_bytes() + b"\0")
                            seconds, rep = run_rescan(client, library_id)
                            rows["rescan_touched"].append(seconds)
                            assert rep["changed"] == len(touched), rep
                            # the folder is free for the next round's user
                            client.delete(f"/libraries/{library_id}").raise_for_status()
                    print(f"  round {r + 1} {path}: {rows[path][-1]:.1f} s", flush=True)
    n = len(files)
    med = {k: statistics.median(v) for k, v in rows.items()}
    result: dict[str, Any] = {
        "benchmark": "library_scan",
        "photos": n,
        "photo_size": [w, h],
        "photo_bytes": photo_bytes,
        "rounds": a.rounds,
        "touched": round(n * a.touch) if a.touch else 0,
        "seconds": med,
        "photos_per_second": {
            "upload": n / med["upload"],
            "scan": n / med["scan"],
            "rescan_unchanged": n / med["rescan"],
        },
        "scan_over_upload_throughput": med["upload"] / med["scan"],
        "best_seconds": {k: min(v) for k, v in rows.items()},
        "scan_over_upload_throughput_best": min(rows["upload"]) / min(rows["scan"]),
        "all_seconds": rows,
        "stored_bytes": stored,
        "last_scan_report": {k: v for k, v in reports[-1].items() if k != "skipped"},
        "environment": {
            "machine": f"{platform.machine()} ({os.cpu_count()} CPUs)",
            "python": platform.python_version(),
            "loadavg_end": loadavg(),
            "database": "postgresql" if a.database_url else "sqlite",
        },
        "wall_seconds": round(time.time() - started, 1),
    }
    print()
    print(f"{'path':<22}{'seconds':>9}{'photos/s':>10}{'stored MB':>11}")
    for name, key in (("upload (POST /images)", "upload"), ("scan (in place)", "scan")):
        mb = result["stored_bytes"][key] / 1e6
        print(f"{name:<22}{med[key]:>9.1f}{n / med[key]:>10.1f}{mb:>11.1f}")
    print(f"{'rescan, unchanged':<22}{med['rescan']:>9.2f}{n / med['rescan']:>10.0f}{'':>11}")
    print(f"{'rescan, 10% rewritten':<22}{med['rescan_touched']:>9.2f}{'':>10}{'':>11}")
    print(f"\nscan throughput / upload throughput: {result['scan_over_upload_throughput']:.2f}x "
          f"(medians), {result['scan_over_upload_throughput_best']:.2f}x (best rounds); "
          f"photos {photo_bytes / 1e6:.1f} MB on disk")  # fmt: skip
    save_result(result, a.out, OUT, a.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
