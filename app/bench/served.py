"""A real `polar serve` on the demo model with a generated library and two trained concepts, for
the benchmarks that time the HTTP API (bench/load.py, bench/contention.py). Nothing here is timed.

The library is the demo's (app/demo/run_demo.py): Fido and its look-alikes in every scene, other
objects, and Fido beside Rex in three scenes, so one-concept ("Fido on the beach") and
two-concept ("Fido and Rex on the beach", re-ranked by crops) searches do their real work.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.demo.run_demo import (
    FIDO_CATEGORY,
    FIDO_INDEX,
    REX_CATEGORY,
    REX_INDEX,
    build_library,
    concept_photos,
    free_port,
    local_server,
)
from app.demo.world import World
from app.ml.model import DEMO_MODEL_NAME, demo_checkpoint_path

# Queries of the three kinds the service answers; concept names are the ones trained below.
PLAIN_QUERIES = ("a hat on the beach", "a ball in the snow", "a cup in the kitchen")
ONE_CONCEPT_QUERIES = ("Fido on the beach", "Fido in the snow", "Rex in the kitchen")
TWO_CONCEPT_QUERIES = ("Fido and Rex on the beach", "Fido and Rex in the snow")


@dataclass
class Served:
    """A running server with one user whose library is embedded and whose concepts are ready."""

    base: str
    key: str
    env: dict[str, str]
    images: int
    concepts: dict[str, str] = field(default_factory=dict)  # name -> id
    world: World = field(default_factory=lambda: World(seed=0))

    def client(self, timeout: float = 120) -> httpx.Client:
        return httpx.Client(
            base_url=self.base, headers={"Authorization": f"Bearer {self.key}"}, timeout=timeout
        )


def server_env(data_dir: Path, database_url: str = "", **settings: str) -> dict[str, str]:
    """The environment of a demo-model server on `data_dir` (SQLite unless `database_url`),
    embedded jobs; `settings` are more POLAR_* variables (e.g. POLAR_THREADS__SEARCH="0")."""
    return os.environ | {
        "POLAR_DATA_DIR": str(data_dir),
        "POLAR_DATABASE_URL": database_url,
        "POLAR_BROKER_URL": "",
        "POLAR_MODEL__NAME": DEMO_MODEL_NAME,
        "POLAR_MODEL__PRETRAINED": str(demo_checkpoint_path()),
        "POLAR_LOG_LEVEL": "warning",
        "HF_HUB_OFFLINE": "1",
        **settings,
    }


def polar_cli(*args: str, env: Mapping[str, str]) -> str:
    """Run the `polar` admin CLI of this interpreter; its stdout."""
    cmd = [sys.executable, "-m", "app.cli", *args]
    return subprocess.run(cmd, env=dict(env), check=True, capture_output=True, text=True).stdout


def wait_job(client: httpx.Client, job_id: str, timeout: float = 600) -> dict[str, Any]:
    """Poll a job until it succeeds (RuntimeError if it fails or takes too long)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = dict(client.get(f"/jobs/{job_id}").raise_for_status().json())
        if job["state"] == "succeeded":
            return job
        if job["state"] == "failed":
            raise RuntimeError(f"job {job_id} failed: {job['error']}")
        time.sleep(0.1)
    raise RuntimeError(f"job {job_id} did not finish in {timeout:.0f} s")


def upload(client: httpx.Client, files: list[tuple[str, bytes]]) -> None:
    """Upload PNGs in batches of 50 and wait for each batch's embedding job."""
    for start in range(0, len(files), 50):
        parts = [("files", (n, b, "image/png")) for n, b in files[start : start + 50]]
        r = client.post("/images", files=parts).raise_for_status().json()
        if r["job"]:
            wait_job(client, r["job"]["id"])


def create_concept(
    client: httpx.Client, name: str, category: str, photos: list[bytes], wait: bool = True
) -> tuple[str, str]:
    """POST /concepts; (concept id, job id), after the training job finished if `wait`."""
    files = [("files", (f"{name}-{i}.png", p, "image/png")) for i, p in enumerate(photos)]
    r = client.post("/concepts", data={"name": name, "category": category}, files=files)
    created = r.raise_for_status().json()
    if wait:
        wait_job(client, created["job"]["id"])
    return str(created["concept"]["id"]), str(created["job"]["id"])


@contextmanager
def served_library(
    workdir: Path, env: dict[str, str], *, others: int = 60, per_scene: int = 1
) -> Iterator[Served]:
    """Migrate, start the server, create a user, upload the library, train Fido and Rex."""
    if not demo_checkpoint_path().is_file():
        raise SystemExit("the demo model is missing (python -m app.demo.pretrain makes one)")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    polar_cli("migrate", env=env)
    with local_server(env, free_port(), workdir / "server.log") as base:
        found = re.search(r"api_key: (\S+)", polar_cli("create-user", "bench", env=env))
        assert found is not None
        world = World(seed=0)
        fido = world.instance(FIDO_INDEX, FIDO_CATEGORY)
        rex = world.instance(REX_INDEX, REX_CATEGORY)
        library = build_library(world, fido, per_scene, others, rex)
        served = Served(base, found.group(1), env, len(library), world=world)
        with served.client() as client:
            upload(client, [(i.filename, i.png) for i in library])
            for name, category, inst, stream in (
                ("Fido", FIDO_CATEGORY, fido, 20_000),
                ("Rex", REX_CATEGORY, rex, 20_001),
            ):
                photos = concept_photos(world, inst, stream_index=stream)
                served.concepts[name] = create_concept(client, name, category, photos)[0]
        yield served
