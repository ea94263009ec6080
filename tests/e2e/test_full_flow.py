"""The acceptance story end to end, with real processes and the demo model.

Celery mode: `polar serve` and a real `celery worker` against the real Redis and PostgreSQL.
Embedded mode: `polar serve` alone, SQLite and the in-process job runner (what `make run` does).
Both: create a user (admin CLI), upload a library, register a concept from five photos, wait for
its job, and find the concept first in a contextual search that plain CLIP gets wrong.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from app.demo.run_demo import (
    FIDO_CATEGORY,
    FIDO_INDEX,
    build_library,
    concept_photos,
    free_port,
    local_server,
)
from app.demo.world import World
from app.ml.model import DEMO_MODEL_NAME, demo_checkpoint_path

pytestmark = pytest.mark.slow

REDIS_URL = os.environ.get("POLAR_TEST_REDIS_URL", "redis://127.0.0.1:6379")
ROOT = Path(__file__).resolve().parents[2]


def _env(data_dir: Path, database_url: str, broker_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLAR_")}
    return env | {
        "POLAR_DATA_DIR": str(data_dir),
        "POLAR_DATABASE_URL": database_url,
        "POLAR_BROKER_URL": broker_url,
        "POLAR_MODEL__NAME": DEMO_MODEL_NAME,
        "POLAR_MODEL__PRETRAINED": str(demo_checkpoint_path()),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _cli(env: dict[str, str], *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout


def _serve(env: dict[str, str], log: Path) -> AbstractContextManager[str]:
    return local_server(env, free_port(), log)


def _wait_job(client: httpx.Client, job_id: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    seen_progress: set[float] = set()
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").raise_for_status().json()
        seen_progress.add(job["progress"])
        if job["state"] == "succeeded":
            assert job["progress"] == 1.0
            return dict(job)
        assert job["state"] != "failed", job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish; progress seen {sorted(seen_progress)}")


def _story(base: str, env: dict[str, str]) -> None:
    key = re.search(r"api_key: (\S+)", _cli(env, "create-user", "alice"))
    assert key is not None
    client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key[1]}"}, timeout=60)
    ready = httpx.get(f"{base}/readyz").json()
    assert ready["status"] == "ready" and ready["demo_model"] is True

    world = World(seed=0)
    fido = world.instance(FIDO_INDEX, FIDO_CATEGORY)
    library = build_library(world, fido, per_scene=1, others=30)
    files = [("files", (i.filename, i.png, "image/png")) for i in library]
    upload = client.post("/images", files=files)
    assert upload.status_code == 202, upload.text
    _wait_job(client, upload.json()["job"]["id"])

    photos = [
        ("files", (f"p{i}.png", p, "image/png")) for i, p in enumerate(concept_photos(world, fido))
    ]
    created = client.post("/concepts", data={"name": "Fido", "category": "hat"}, files=photos)
    assert created.status_code == 202, created.text
    assert created.json()["concept"]["state"] == "training"
    _wait_job(client, created.json()["job"]["id"])
    concept = client.get(f"/concepts/{created.json()['concept']['id']}").json()
    assert concept["state"] == "ready" and concept["version"] == 1

    found = client.get("/search", params={"q": "Fido on the beach", "k": 50}).json()
    assert found["personalized"] is True
    assert found["concepts"][0]["name"] == "Fido" and found["concepts"][0]["applied"] is True
    token = concept["token"]
    assert found["rewritten"] == f"{token} hat on the beach"
    plain = client.get(
        "/search", params={"q": "a hat on the beach", "k": 50, "personalize": "false"}
    ).json()

    def rank(body: dict[str, Any]) -> int:
        names = [h["image"]["filename"] for h in body["hits"]]
        return names.index("fido-beach-0.png") + 1

    # Only Fido's shape twin (a look-alike the demo model cannot see) may come before it.
    assert rank(found) <= 2, found["hits"][:3]
    assert rank(found) < rank(plain)


@pytest.fixture
def redis_db() -> Iterator[str]:
    """A Redis database number no other test uses, emptied before and after."""
    url = f"{REDIS_URL}/11"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()


@pytest.mark.postgres
@pytest.mark.redis
def test_story_with_a_real_celery_worker(tmp_path, postgres_schema_url, redis_db):
    env = _env(tmp_path / "data", postgres_schema_url, redis_db)
    _cli(env, "migrate")
    queue_log = tmp_path / "worker.log"
    with queue_log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-P", "solo",
             "-n", f"e2e-{uuid.uuid4().hex[:8]}@%h", "--loglevel=INFO"],
            env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        with _serve(env, tmp_path / "api.log") as base:
            _story(base, env)
        assert "polar.run_job" in queue_log.read_text()  # the worker, not the API, ran the jobs
    finally:
        _stop(worker)


def test_story_in_embedded_mode(tmp_path):
    env = _env(tmp_path / "data", "", "")
    with _serve(env, tmp_path / "api.log") as base:
        _story(base, env)
