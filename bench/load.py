"""Search under load: 1, 8 and 32 concurrent HTTP clients against a real `polar serve` on
PostgreSQL (a throwaway schema), each searching without pause for a fixed time, mixing plain,
one-concept and two-concept (crop re-ranked) searches on the demo model's library.

Reports throughput and p50/p95/p99 latency per client count as ratios to the single-client
figures of the same server in the same run, and counts errors (any non-200 or transport
error). Servers run on the same database one after the other: `before` (the threads and
pool a server had before issue 16: torch's default threads per search, SQLAlchemy's default
pool, every request thread searching at once), `now` (the defaults: one thread per search,
searches take turns, one per core) and `now-2w` (the defaults, two API processes). Targets on
two cores: at 8+ clients throughput at least 1.7x one client's, p99 at most 3x p50; no errors.
Writes bench/results/load.json; never run by the tests.

    .venv/bin/python bench/load.py            # about 4 minutes on 2 shared CPUs
    .venv/bin/python bench/load.py --quick    # smoke run (4 s per client count), no JSON
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from app.bench.harness import loadavg, save_result, temporary_pg_schema
from app.bench.served import (
    ONE_CONCEPT_QUERIES,
    PLAIN_QUERIES,
    TWO_CONCEPT_QUERIES,
    Served,
    served_library,
    server_env,
)
from app.demo.run_demo import free_port, local_server
from app.ml.threads import cpu_count

OUT = Path(__file__).parent / "results" / "load.json"
# Per ten requests: four plain, four naming one concept, two naming two (re-ranked by crops).
MIX = (
    [("plain", q, False) for q in PLAIN_QUERIES[:2]] * 2
    + [("one concept", q, True) for q in ONE_CONCEPT_QUERIES[:2]] * 2
    + [("two concepts", q, True) for q in TWO_CONCEPT_QUERIES]
)
# What a server had before issue 16 (settings that did not exist then take their old behaviour:
# anyio's 40 request threads; the pool was SQLAlchemy's 5 + 10 then, 40 + 8 here).
BEFORE = {
    "POLAR_THREADS__SEARCH": "0",
    "POLAR_THREADS__TRAINING": "0",
    "POLAR_THREADS__JOB_YIELD_MS": "0",
    "POLAR_REQUEST_THREADS": "40",
    "POLAR_THREADS__CONCURRENT_SEARCHES": "40",  # every request thread searched at once
}
REDIS_URL = os.environ.get("POLAR_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
# Several API processes need a broker (the embedded runner is one process); no job runs during
# the searches, so no Celery worker is started.
POLICIES = {
    "before": BEFORE,
    "now": {},
    "now-2w": {"POLAR_WORKERS": "2", "POLAR_BROKER_URL": REDIS_URL},
}


async def client_loop(
    http: httpx.AsyncClient, start: int, deadline: float, out: dict[str, Any]
) -> None:
    """Search without pause until the deadline; latency per kind, errors by reason."""
    for n in itertools.count(start):
        if time.perf_counter() >= deadline:
            return
        kind, q, personalize = MIX[n % len(MIX)]
        params: dict[str, Any] = {"q": q, "k": 20}
        if not personalize:
            params["personalize"] = "false"
        t0 = time.perf_counter()
        try:
            r = await http.get("/search", params=params)
            ok, reason = r.status_code == 200, str(r.status_code)
        except httpx.HTTPError as e:
            ok, reason = False, type(e).__name__
        took = time.perf_counter() - t0
        if ok:
            out["latency"].append(took)
            out["by_kind"].setdefault(kind, []).append(took)
        else:
            out["errors"][reason] = out["errors"].get(reason, 0) + 1


async def run_level(base: str, key: str, clients: int, seconds: float) -> dict[str, Any]:
    """`clients` concurrent searchers for `seconds` (after a short warm-up)."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(
        base_url=base, headers=headers, timeout=120, limits=limits
    ) as http:
        warm: dict[str, Any] = {"latency": [], "by_kind": {}, "errors": {}}
        await asyncio.gather(
            *(client_loop(http, i, time.perf_counter() + 1.0, warm) for i in range(clients))
        )
        out: dict[str, Any] = {"latency": [], "by_kind": {}, "errors": {}}
        started = time.perf_counter()
        deadline = started + seconds
        # Clients start at different places in the mix, so the mix holds at every moment.
        await asyncio.gather(*(client_loop(http, 3 * i, deadline, out) for i in range(clients)))
        elapsed = time.perf_counter() - started
    lat = np.asarray(out["latency"]) * 1000
    row: dict[str, Any] = {
        "clients": clients,
        "requests": len(lat),
        "errors": out["errors"],
        "error_count": sum(out["errors"].values()),
        "throughput_rps": round(len(lat) / elapsed, 2),
        "load_avg": loadavg(),
    }
    for q in (50, 95, 99):
        row[f"p{q}_ms"] = round(float(np.percentile(lat, q)), 1) if len(lat) else None
    row["p50_ms_by_kind"] = {
        k: round(float(np.percentile(np.asarray(v) * 1000, 50)), 1)
        for k, v in sorted(out["by_kind"].items())
    }
    return row


def bench_policy(
    name: str, env: dict[str, str], served: Served, levels: list[int], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Start a server with `env` on the prepared database; run every client count."""
    rows = []
    log = Path(env["POLAR_DATA_DIR"]).parent / f"server-{name}.log"
    with local_server(env, free_port(), log) as base:
        for clients in levels:
            row = asyncio.run(run_level(base, served.key, clients, args.seconds))
            row["policy"] = name
            rows.append(row)
            print(
                f"  {name:<7}{clients:>3} clients {row['throughput_rps']:>7.1f} req/s  "
                f"p50 {row['p50_ms']} p95 {row['p95_ms']} p99 {row['p99_ms']} ms  "
                f"errors {row['error_count']}  load {row['load_avg']}",
                flush=True,
            )
    one = rows[0]
    for row in rows:
        row["throughput_ratio"] = round(row["throughput_rps"] / one["throughput_rps"], 2)
        row["p50_ratio"] = round(row["p50_ms"] / one["p50_ms"], 2)
        row["p99_over_p50"] = round(row["p99_ms"] / row["p50_ms"], 2)
        if row["clients"] >= 8:
            row["target_met"] = (
                row["throughput_ratio"] >= 1.7
                and row["p99_over_p50"] <= 3.0
                and row["error_count"] == 0
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 s per client count; no JSON")
    p.add_argument("--clients", default="1,8,32", help="concurrent client counts")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per count")
    p.add_argument("--others", type=int, default=60, help="other objects in the library")
    p.add_argument("--policies", default=",".join(POLICIES), help="which servers to run")
    p.add_argument("--out", type=Path, default=None, help=f"JSON path (default {OUT.name})")
    args = p.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    if args.quick:
        levels, args.seconds, args.others = [1, 8, 32], 4.0, 20
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="polar-load-") as tmp,
        temporary_pg_schema() as url,
    ):
        env = server_env(Path(tmp) / "data", url)
        print("preparing the library (upload, embed, train Fido and Rex)", flush=True)
        with served_library(Path(tmp), env, others=args.others) as served:
            pass  # prepared; each policy gets its own server on this database
        print(f"{served.images} images; searching with {levels} clients", flush=True)
        for name in args.policies.split(","):
            rows += bench_policy(name, env | POLICIES[name], served, levels, args)

    head = f"{'policy':<8}{'clients':>8}{'req/s':>8}{'x1':>6}{'p50 ms':>8}{'p95 ms':>8}"
    print(f"\n{head}{'p99 ms':>8}{'p99/p50':>9}{'errors':>8}")
    for r in rows:
        print(
            f"{r['policy']:<8}{r['clients']:>8}{r['throughput_rps']:>8.1f}"
            f"{r['throughput_ratio']:>6.2f}{r['p50_ms']:>8.1f}{r['p95_ms']:>8.1f}"
            f"{r['p99_ms']:>8.1f}{r['p99_over_p50']:>9.2f}{r['error_count']:>8}"
        )
    result = {
        "what": __doc__.split("\n\n")[0],
        "images": served.images,
        "mix": [k for k, _, _ in MIX],
        "seconds_per_level": args.seconds,
        "before_settings": BEFORE,
        "rows": rows,
        "targets": {"throughput_ratio_min_at_8": 1.7, "p99_over_p50_max": 3.0, "errors": 0},
        "seconds": round(time.perf_counter() - started, 1),
        "cpu": platform.processor() or platform.machine(),
        "cores": cpu_count(),
        "command": " ".join(["bench/load.py", *sys.argv[1:]]),
    }
    save_result(result, args.out, OUT, args.quick)


if __name__ == "__main__":
    main()
