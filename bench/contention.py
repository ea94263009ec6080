"""Thread discipline under contention: each workload idle vs with N busy processes on the same
cores, with the threads it had before (torch's default: all cores, for everything) and with the
threads it gets now (POLAR_THREADS__*: one each for training, search and image embedding).

  model    in this process, ViT-B-32 with random weights (cost does not depend on the values):
           training one concept with the demo model's recipe (the keep term, the costlier
           objective; other models train with the paper's), 5 photos, encoding one
           query, embedding a batch of 8 images; medians, idle then with `--busy` spinning
           processes (default: one per core), the two policies interleaved;
  api      a real `polar serve` (embedded jobs, SQLite, demo model): one client's search
           latency on an otherwise idle machine, with no job running vs while training jobs
           run in the same process, for each policy (one server each); "before" also turns
           off the jobs' yielding to searches and their lower CPU priority (POLAR_JOBS__NICE).

Targets (issue 16): with as many busy processes as cores, each model figure at most 3x its idle
value; search p50 while training at most 1.5x its idle p50. Prints tables, writes
bench/results/contention.json; never run by the tests.

    .venv/bin/python bench/contention.py            # about 4 minutes on 2 shared CPUs
    .venv/bin/python bench/contention.py --quick    # smoke run (about 1 minute), nothing written
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image as PILImage

from app.bench.harness import loadavg, save_result, vit_b32
from app.bench.served import ONE_CONCEPT_QUERIES, create_concept, served_library, server_env
from app.config import ThreadSettings
from app.demo.run_demo import FIDO_CATEGORY, FIDO_INDEX, concept_photos
from app.ml.encode import encode_images, encode_texts
from app.ml.model import ClipBundle
from app.ml.selective import train_selective
from app.ml.threads import cpu_count, cpu_threads

OUT = Path(__file__).parent / "results" / "contention.json"
QUERY = "a photo of sks dog playing on the beach at sunset"


@contextmanager
def busy_processes(n: int) -> Iterator[None]:
    """`n` processes spinning in pure Python (another app's CPU work) until the block ends."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(1.0)  # let them be scheduled before anything is timed
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def timed(fn: Callable[[], object], reps: int) -> float:
    """Median wall seconds of `reps` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def workloads(bundle: ClipBundle, steps: int) -> dict[str, tuple[Callable[[], object], str]]:
    """name -> (one unit of work, which POLAR_THREADS__* setting runs it in the service)."""
    gen = torch.Generator().manual_seed(1)
    photos = F.normalize(torch.randn(5, bundle.embed_dim, generator=gen), dim=-1)
    rng = np.random.default_rng(0)
    images = [
        PILImage.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)) for _ in range(8)
    ]

    def train() -> object:
        # As app/services/training.py runs the demo model's recipe: the keep term, λ 0, lr 3e-3.
        return train_selective(
            bundle, photos, "sks", "dog", lam=0.0, steps=steps, lr=3e-3, keep=3.0, others=0
        )

    return {
        f"training, {steps} steps (s/concept)": (train, "training"),
        "query encoding (s/query)": (lambda: encode_texts(bundle, [QUERY]), "search"),
        "image embedding, batch of 8 (s/batch)": (
            lambda: encode_images(bundle, images),
            "embedding",
        ),
    }


def bench_model(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each workload idle and busy, with all cores (before) and its setting (now)."""
    cores = cpu_count()
    now = ThreadSettings()
    bundle = vit_b32()
    work = workloads(bundle, args.steps)
    reps = {"training": args.train_reps, "search": args.query_reps, "embedding": args.embed_reps}
    rows: dict[tuple[str, str], dict[str, Any]] = {}

    def measure(phase: str) -> None:
        for name, (fn, group) in work.items():
            for policy, n in (("before", cores), ("now", getattr(now, group) or cores)):
                with cpu_threads(n):
                    s = timed(fn, reps[group])
                row = rows.setdefault(
                    (name, policy), {"workload": name, "policy": policy, "threads": n}
                )
                row[f"{phase}_s"] = round(s, 5)
                print(f"  {phase:<5} {name:<40}{policy:<8}{n:>3} threads {s:>9.4f} s", flush=True)

    load = {"idle_before": loadavg()}
    measure("idle")
    with busy_processes(args.busy):
        load["busy_during"] = loadavg()
        measure("busy")
    for row in rows.values():
        row["busy_over_idle"] = round(row["busy_s"] / row["idle_s"], 2)
        row["target_met"] = row["busy_over_idle"] <= 3.0
    out = list(rows.values())
    out.append({"loadavg": load, "busy_processes": args.busy, "cores": cores})
    return out


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def bench_api(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    """One client's search latency, idle vs during training jobs, per thread policy."""
    policies = {
        "before": {
            "POLAR_THREADS__TRAINING": "0",
            "POLAR_THREADS__SEARCH": "0",
            "POLAR_THREADS__JOB_YIELD_MS": "0",  # jobs did not step aside for searches
            "POLAR_JOBS__NICE": "0",  # nor run at a lower priority
            "POLAR_THREADS__CONCURRENT_SEARCHES": "40",  # searches did not take turns
        },
        "now": {},
    }
    rows = []
    for policy, extra in policies.items():
        data = workdir / policy
        env = server_env(data / "data", **extra)
        with served_library(data, env, others=args.others) as served, served.client() as client:
            fido = served.world.instance(FIDO_INDEX, FIDO_CATEGORY)

            def search(n: int) -> float:
                q = ONE_CONCEPT_QUERIES[n % len(ONE_CONCEPT_QUERIES)]
                t0 = time.perf_counter()
                client.get("/search", params={"q": q, "k": 20}).raise_for_status()
                return time.perf_counter() - t0

            for n in range(5):  # warm-up: index cache, adapter cache
                search(n)
            idle = [search(n) for n in range(args.searches)]
            during: list[float] = []
            job_s: list[float] = []
            for j in range(args.jobs):
                photos = concept_photos(served.world, fido, stream_index=30_000 + j)
                _, job_id = create_concept(client, f"Fido{j}", FIDO_CATEGORY, photos, wait=False)
                t0, n = time.perf_counter(), 0
                while True:
                    state = client.get(f"/jobs/{job_id}").raise_for_status().json()["state"]
                    if state in ("succeeded", "failed"):
                        break
                    if state == "running":
                        during.append(search(n))
                        n += 1
                    else:
                        time.sleep(0.01)
                job_s.append(time.perf_counter() - t0)
            idle_after = [search(n) for n in range(args.searches)]
        base = idle + idle_after
        row = {
            "policy": policy,
            "settings": extra or "defaults",
            "idle_searches": len(base),
            "searches_during_training": len(during),
            "idle_p50_ms": round(1000 * percentile(base, 50), 2),
            "training_p50_ms": round(1000 * percentile(during, 50), 2) if during else None,
            "training_p95_ms": round(1000 * percentile(during, 95), 2) if during else None,
            "training_job_s": [round(s, 2) for s in job_s],
        }
        if during:
            row["p50_ratio"] = round(row["training_p50_ms"] / row["idle_p50_ms"], 2)
            row["target_met"] = row["p50_ratio"] <= 1.5
        print(
            f"  {policy:<7} idle p50 {row['idle_p50_ms']:>7.1f} ms  during training p50 "
            f"{row['training_p50_ms']} ms (x{row.get('p50_ratio')}, {len(during)} searches)  "
            f"jobs {row['training_job_s']} s",
            flush=True,
        )
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few repetitions; no JSON")
    p.add_argument("--busy", type=int, default=cpu_count(), help="busy processes (default: cores)")
    p.add_argument("--steps", type=int, default=200, help="Adam steps per timed training")
    p.add_argument("--train-reps", type=int, default=3)
    p.add_argument("--query-reps", type=int, default=15)
    p.add_argument("--embed-reps", type=int, default=3)
    p.add_argument("--searches", type=int, default=30, help="idle searches, before and after")
    p.add_argument("--jobs", type=int, default=3, help="training jobs searched against")
    p.add_argument("--others", type=int, default=60, help="other objects in the API's library")
    p.add_argument("--skip-api", action="store_true")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--out", type=Path, default=None, help=f"JSON path (default {OUT.name})")
    args = p.parse_args()
    if args.quick:
        args.steps, args.train_reps, args.query_reps, args.embed_reps = 50, 1, 3, 1
        args.searches, args.jobs, args.others = 10, 1, 20
    started = time.perf_counter()
    print(f"model workloads, ViT-B-32 (random weights), idle vs {args.busy} busy processes")
    model_rows = [] if args.skip_model else bench_model(args)
    api_rows: list[dict[str, Any]] = []
    if not args.skip_api:
        print("API search latency (demo model, embedded), idle vs while a training job runs")
        with tempfile.TemporaryDirectory(prefix="polar-contention-") as tmp:
            api_rows = bench_api(args, Path(tmp))

    print(f"\n{'workload':<40}{'policy':<8}{'thr':>4}{'idle s':>10}{'busy s':>10}{'busy/idle':>11}")
    for r in model_rows:
        if "workload" in r:
            print(
                f"{r['workload']:<40}{r['policy']:<8}{r['threads']:>4}{r['idle_s']:>10.4f}"
                f"{r['busy_s']:>10.4f}{r['busy_over_idle']:>10.2f}x"
            )
    if api_rows:
        head = f"{'API search, one client':<24}{'idle p50 ms':>12}{'training p50':>14}"
        print(f"\n{head}{'ratio':>8}")
        for r in api_rows:
            print(
                f"{r['policy']:<24}{r['idle_p50_ms']:>12.1f}{r['training_p50_ms'] or 0:>14.1f}"
                f"{r.get('p50_ratio') or 0:>7.2f}x"
            )
    result = {
        "what": __doc__.split("\n\n")[0],
        "model": model_rows,
        "api": api_rows,
        "targets": {"model_busy_over_idle_max": 3.0, "api_p50_ratio_max": 1.5},
        "seconds": round(time.perf_counter() - started, 1),
        "cpu": platform.processor() or platform.machine(),
        "cores": cpu_count(),
        "torch": torch.__version__,
        "command": " ".join(["bench/contention.py", *sys.argv[1:]]),
    }
    save_result(result, args.out, OUT, args.quick)


if __name__ == "__main__":
    main()
