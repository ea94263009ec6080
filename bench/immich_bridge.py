"""A user's /search while Immich's bridge traffic is in flight, against the same search idle.

A real `polar serve` (demo model, embedded jobs, SQLite) with the Immich bridge on, a library
of the demo's photos and the concept Fido; the bridge forwards face requests to a stand-in for
Immich's machine learning that answers after `--upstream-s` seconds (2 s: a busy real one).

  idle     one client's /search, one request after another, nothing else running;
  loaded   the same while `--images` clients each keep one unauthenticated visual CLIP request
           of a pixel-limit image (about POLAR_LIMITS__MAX_PIXELS) in flight, and `--forwards`
           clients keep one face request each waiting on the slow upstream.

Idle is measured before and after the loaded phase (its p50 is the median of both). Target
(issue 29): the loaded p50 within 2x the idle p50. Prints a table, writes
bench/results/immich_bridge.json; never run by the tests.

    .venv/bin/python bench/immich_bridge.py            # about 3 minutes on 2 shared CPUs
    .venv/bin/python bench/immich_bridge.py --quick    # smoke run, nothing written
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import re
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageDraw

from app.bench.harness import loadavg, save_result
from app.bench.served import create_concept, polar_cli, server_env, upload
from app.demo.run_demo import (
    FIDO_CATEGORY,
    FIDO_INDEX,
    build_library,
    concept_photos,
    free_port,
    local_server,
)
from app.demo.world import World
from app.ml.model import DEMO_MODEL_NAME
from app.ml.threads import cpu_count

OUT = Path(__file__).parent / "results" / "immich_bridge.json"
QUERIES = ("Fido on the beach", "a hat on the beach", "a ball in the snow")
FACES = json.dumps(
    {
        "facial-recognition": {
            "detection": {"modelName": "buffalo_l", "options": {"minScore": 0.7}},
            "recognition": {"modelName": "buffalo_l"},
        }
    }
)


@contextmanager
def slow_upstream(delay_s: float) -> Iterator[str]:
    """A stand-in for Immich's machine learning: every POST answers after `delay_s`."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", "0")))
            time.sleep(delay_s)
            body = b'{"facial-recognition": [], "imageHeight": 8, "imageWidth": 8}'
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def pixel_limit_jpeg(max_pixels: int) -> bytes:
    """A JPEG just under the pixel limit (shapes, so it stays a few MB)."""
    side = int(max_pixels**0.5) - 8
    img = Image.new("RGB", (side, side), (90, 140, 200))
    draw = ImageDraw.Draw(img)
    for i in range(0, side, side // 16):
        draw.rectangle((i, i, i + side // 8, i + side // 8), fill=(200, 120 + i % 100, 40))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return buf.getvalue()


def p50_search(client: httpx.Client, n: int) -> list[float]:
    """Seconds of `n` searches, one after another."""
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        client.get("/search", params={"q": QUERIES[i % len(QUERIES)], "k": 20}).raise_for_status()
        times.append(time.perf_counter() - t0)
    return times


def keep_sending(base: str, stop: threading.Event, files: dict[str, Any], counts: list[int]):
    """One client: the same bridge request again and again until `stop`."""
    with httpx.Client(base_url=base, timeout=600) as client:
        while not stop.is_set():
            r = client.post("/predict", data={"entries": files["entries"]}, files=files["files"])
            counts.append(r.status_code)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer searches; nothing written")
    ap.add_argument("--images", type=int, default=20, help="bridge image clients")
    ap.add_argument("--forwards", type=int, default=2, help="slow forwarded face clients")
    ap.add_argument("--upstream-s", type=float, default=2.0, help="the upstream's answer time")
    ap.add_argument("--searches", type=int, default=40, help="searches per phase")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    n = 8 if args.quick else args.searches
    max_pixels = 50_000_000
    workdir = Path(tempfile.mkdtemp(prefix="polar-immich-bench-"))
    env = server_env(workdir / "data", POLAR_LIMITS__MAX_PIXELS=str(max_pixels))
    polar_cli("migrate", env=env)
    found = re.search(r"api_key: (\S+)", polar_cli("create-user", "bench", env=env))
    assert found is not None
    key = found.group(1)
    image = pixel_limit_jpeg(max_pixels)
    print(f"pixel-limit image: {len(image) / 1e6:.1f} MB; cores {cpu_count()}, load {loadavg()}")
    try:
        with slow_upstream(args.upstream_s) as upstream:
            env |= {"POLAR_IMMICH__API_KEY": key, "POLAR_IMMICH__FORWARD_URL": upstream}
            with local_server(env, free_port(), workdir / "server.log") as base:
                headers = {"Authorization": f"Bearer {key}"}
                with httpx.Client(base_url=base, headers=headers, timeout=600) as client:
                    world = World(seed=0)
                    fido = world.instance(FIDO_INDEX, FIDO_CATEGORY)
                    library = build_library(world, fido, per_scene=1, others=20)
                    upload(client, [(i.filename, i.png) for i in library])
                    photos = concept_photos(world, fido, stream_index=20_000)
                    create_concept(client, "Fido", FIDO_CATEGORY, photos)
                    p50_search(client, 3)  # warm-up
                    idle = p50_search(client, n)
                    stop = threading.Event()
                    counts: dict[str, list[int]] = {"images": [], "forwards": []}
                    visual = json.dumps({"clip": {"visual": {"modelName": DEMO_MODEL_NAME}}})
                    senders = [
                        threading.Thread(
                            target=keep_sending,
                            args=(
                                base,
                                stop,
                                {"entries": visual, "files": {"image": ("blob", image)}},
                                counts["images"],
                            ),
                        )
                        for _ in range(args.images)
                    ] + [
                        threading.Thread(
                            target=keep_sending,
                            args=(
                                base,
                                stop,
                                {"entries": FACES, "files": {"image": ("blob", b"\xff\xd8")}},
                                counts["forwards"],
                            ),
                        )
                        for _ in range(args.forwards)
                    ]
                    for t in senders:
                        t.start()
                    time.sleep(3.0)  # every sender has a request in flight
                    loaded = p50_search(client, n)
                    stop.set()
                    for t in senders:
                        t.join()
                    idle += p50_search(client, n)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    idle_p50 = statistics.median(idle)
    loaded_p50 = statistics.median(loaded)
    ratio = loaded_p50 / idle_p50
    rows = [
        ("idle", idle_p50, max(idle), len(idle)),
        (f"{args.images} images + {args.forwards} slow forwards", loaded_p50, max(loaded), n),
    ]
    print(f"\n{'/search while':<36} {'p50 ms':>8} {'max ms':>8} {'n':>4}")
    for label, p50, worst, count in rows:
        print(f"{label:<36} {p50 * 1000:>8.1f} {worst * 1000:>8.1f} {count:>4}")
    print(f"ratio loaded/idle p50: {ratio:.2f}x (target <= 2x)")
    print(
        f"bridge answers while searching: images {sorted(set(counts['images']))} "
        f"x{len(counts['images'])}, forwards {sorted(set(counts['forwards']))} "
        f"x{len(counts['forwards'])}"
    )
    result = {
        "benchmark": "immich_bridge",
        "machine": {"cpus": cpu_count(), "platform": platform.platform(), "load": loadavg()},
        "settings": {
            "images": args.images,
            "forwards": args.forwards,
            "upstream_s": args.upstream_s,
            "searches_per_phase": n,
            "max_pixels": max_pixels,
            "model": DEMO_MODEL_NAME,
        },
        "idle_p50_ms": round(idle_p50 * 1000, 2),
        "loaded_p50_ms": round(loaded_p50 * 1000, 2),
        "idle_max_ms": round(max(idle) * 1000, 2),
        "loaded_max_ms": round(max(loaded) * 1000, 2),
        "ratio_loaded_over_idle_p50": round(ratio, 3),
        "target_ratio": 2.0,
        "bridge_images_answered": len(counts["images"]),
        "bridge_forwards_answered": len(counts["forwards"]),
        "bridge_statuses": sorted(set(counts["images"] + counts["forwards"])),
    }
    save_result(result, args.out, OUT, args.quick)


if __name__ == "__main__":
    main()
