"""What late-block regions (app.ml.region_late) cost on ViT-B-32 against no regions, per number
of blocks re-run: the frontier behind the "late" method's choice (issue 32, item 2).

Pre-decoded 1600x1200 photo-like pictures (bench/embed_pipeline.synthetic_photo), batches of 16,
one thread, ViT-B-32 with random weights (the cost does not depend on them), layout "five":

  off       encode_images (the whole image only: regions off)
  pooled    app.ml.region_pool.encode_with_regions (the one pass, the last block's CLS pooled)
  late kN   encode_late_regions with N of the 12 blocks re-run per box; "c": own CLS per box
  crops     encode_images, then the five crops encoded (what crops cost)

each including the preprocessing, as the service's region pass runs it. Every method once per
round, the order reversed every other round; medians, and each method's time over off's.
This is the tower alone: bench/index_speed.py (`--methods off,late`) times the whole indexing
job. Prints a table, writes bench/results/late_cost.json; never run by tests.

    .venv/bin/python bench/late_cost.py              # about 5 minutes on 2 shared CPUs
    .venv/bin/python bench/late_cost.py --quick      # smoke run, nothing written
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_pipeline import synthetic_photo

from app.bench.harness import loadavg, save_result, vit_b32
from app.ml.encode import encode_images
from app.ml.region_late import encode_late_regions
from app.ml.region_pool import encode_with_regions
from app.ml.regions import LAYOUTS, encode_boxes

OUT = Path(__file__).resolve().parent / "results" / "late_cost.json"
FIVE = LAYOUTS["five"]
# (blocks re-run of 12, own CLS per box); (0, own CLS) is the same embedding as (1, own CLS)
LATE = [(0, True), (1, True), (2, False), (2, True), (3, False), (3, True), (4, True), (6, True)]
LATE.append((12, False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run; nothing written")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n, rounds = (4, 1) if args.quick else (16, args.rounds)
    load_before = loadavg()
    bundle = vit_b32()
    pictures = [synthetic_photo((1600, 1200), seed) for seed in range(n)]
    methods: dict[str, Callable[[], Any]] = {
        "off": lambda: encode_images(bundle, pictures),
        "pooled": lambda: encode_with_regions(bundle, pictures, FIVE),
    }
    for k, own in LATE:
        methods[f"late k{k}{'c' if own else ''}"] = lambda k=k, own=own: encode_late_regions(
            bundle, pictures, FIVE, k, own
        )
    methods["crops"] = lambda: (
        encode_images(bundle, pictures),
        encode_boxes(bundle, pictures, FIVE),
    )
    for run in methods.values():  # warm-up, untimed
        run()
    times: dict[str, list[float]] = {m: [] for m in methods}
    ratios: dict[str, list[float]] = {m: [] for m in methods}
    order = list(methods)
    for r in range(rounds):
        took: dict[str, float] = {}
        for m in order if r % 2 == 0 else reversed(order):
            t0 = time.perf_counter()
            methods[m]()
            took[m] = time.perf_counter() - t0
            times[m].append(took[m])
        for m in methods:
            ratios[m].append(took[m] / took["off"])
        print(f"round {r}: " + ", ".join(f"{m} {t:.2f}s" for m, t in took.items()), flush=True)
    rows = [
        {
            "method": m,
            "seconds": round(statistics.median(times[m]), 3),
            "images_per_s": round(n / statistics.median(times[m]), 2),
            "over_off": round(statistics.median(ratios[m]), 3),
        }
        for m in methods
    ]
    print(f"\n{'ViT-B-32, 1600x1200, 1 thread':<32}{'images/s':>10}{'x off':>8}")
    for row in rows:
        print(f"  {row['method']:<30}{row['images_per_s']:>10.2f}{row['over_off']:>8.2f}")
    result = {
        "benchmark": "late_cost",
        "command": "python bench/late_cost.py " + " ".join(sys.argv[1:]),
        "model": "ViT-B-32 (random weights), 12 blocks, 7x7 patches",
        "images": n,
        "size": "1600x1200",
        "threads": 1,
        "rounds": rounds,
        "environment": {"python": platform.python_version(), "torch": torch.__version__},
        "load_before": load_before,
        "load_after": loadavg(),
        "rows": rows,
        "ratio_note": "over_off: median over rounds of the method's time / off's in that round",
    }
    save_result(result, args.out, OUT, args.quick)


if __name__ == "__main__":
    main()
