"""Fault injection: real processes (API, Celery worker, a private Redis) broken on purpose.

Each scenario starts its own Redis on a free port (never the machine's shared one), so stopping
or freezing it touches nothing else. The API and the worker share a SQLite database file in the
test's folder and serve the bundled demo model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from app.demo.run_demo import free_port, local_server
from app.ml.model import DEMO_MODEL_NAME, demo_checkpoint_path

ROOT = Path(__file__).resolve().parents[2]
REDIS_SERVER = "redis-server"


@dataclass
class PrivateRedis:
    """A redis-server of this test's own: start, stop, freeze (SIGSTOP) and thaw it."""

    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no"],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_until(lambda: _pings(self.url), 20, "private redis did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # in case it is frozen
            self.proc.kill()
            self.proc.wait(10)

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def wait_until(check: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(every)


@dataclass
class Stack:
    """One scenario's processes: its Redis, the API (Celery mode) and workers."""

    tmp: Path
    redis: PrivateRedis
    env: dict[str, str]
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def cli(self, *args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "app.cli", *args], env=self.env, cwd=ROOT,
                             check=True, capture_output=True, text=True)  # fmt: skip
        return out.stdout

    def start_worker(self, pool: str = "solo") -> subprocess.Popen[bytes]:
        """A `celery worker` (its main process); `pool="prefork"` runs tasks in one forked
        pool process, which the main process replaces when it dies."""
        n = len(self.workers)
        concurrency = ["-c", "1"] if pool == "prefork" else []
        with (self.tmp / f"worker{n}.log").open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-P",
                 pool, *concurrency, "-n", f"faults{n}-{uuid.uuid4().hex[:6]}@%h",
                 "--loglevel=INFO", "--without-gossip", "--without-mingle"],
                env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.workers.append(proc)
        return proc

    @staticmethod
    def pool_processes(worker: subprocess.Popen[bytes]) -> list[int]:
        """The pids of a prefork worker's pool processes (its main process's children)."""
        children = Path(f"/proc/{worker.pid}/task/{worker.pid}/children")
        return [int(p) for p in children.read_text().split()] if children.exists() else []

    def worker_log(self, n: int) -> str:
        return (self.tmp / f"worker{n}.log").read_text(errors="replace")

    def kill_worker(self, proc: subprocess.Popen[bytes]) -> None:
        """The host is lost: the whole process group dies at once, nothing is acknowledged."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def stop_workers(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """The scenario's database: a SQLite file (tests override it with PostgreSQL)."""
    return f"sqlite:///{(tmp_path / 'polar.db').as_posix()}"


@pytest.fixture
def env_overrides() -> dict[str, str]:
    """Settings a test module sets for every process of its scenarios."""
    return {}


@pytest.fixture
def stack(tmp_path: Path, database_url: str, env_overrides: dict[str, str]) -> Iterator[Stack]:
    private = PrivateRedis(free_port(), tmp_path / "redis.log")
    private.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLAR_")}
    env |= {
        "POLAR_DATA_DIR": str(tmp_path / "data"),
        "POLAR_DATABASE_URL": database_url,
        "POLAR_BROKER_URL": private.url,
        "POLAR_MODEL__NAME": DEMO_MODEL_NAME,
        "POLAR_MODEL__PRETRAINED": str(demo_checkpoint_path()),
        "POLAR_MODEL__THREADS": "1",
        "POLAR_SEARCH__REGIONS": "none",
        # Lost jobs are looked for every half second, so scenarios end in seconds, not minutes.
        "POLAR_JOBS__RESEND_AFTER_S": "3",
        "POLAR_JOBS__DEAD_AFTER_S": "5",
        "POLAR_JOBS__RECONCILE_INTERVAL_S": "0.5",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env |= env_overrides
    s = Stack(tmp_path, private, env)
    s.cli("migrate")
    try:
        yield s
    finally:
        s.stop_workers()
        private.stop()


@pytest.fixture
def api(stack: Stack) -> Iterator[httpx.Client]:
    """The API in Celery mode on the private Redis, with a user's key."""
    with local_server(stack.env, free_port(), stack.tmp / "api.log") as base:
        out = stack.cli("create-user", "alice")
        key = next(line.split()[-1] for line in out.splitlines() if "api_key" in line)
        # The client's timeout is the bound: a request that hangs on a broken dependency fails.
        with httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=20
        ) as client:
            yield client


def job(api: httpx.Client, job_id: str) -> dict[str, Any]:
    """GET /jobs/{id}."""
    body: dict[str, Any] = api.get(f"/jobs/{job_id}").raise_for_status().json()
    return body


def finished(api: httpx.Client, job_id: str, timeout: float = 120) -> dict[str, Any]:
    """The job once it has succeeded or failed."""
    result: dict[str, Any] = wait_until(
        lambda: (j := job(api, job_id))["state"] in ("succeeded", "failed") and j,
        timeout,
        f"job {job_id} never finished",
    )
    return result


def report_recovery(what: str, seconds: float) -> None:
    """A measured recovery time: printed (`pytest -s`), and added to the JSON file named by
    POLAR_FAULTS_TIMINGS when set (docs/ARCHITECTURE.md's "When a dependency fails" quotes them)."""
    print(f"\nrecovery: {what}: {seconds:.1f} s")
    out = os.environ.get("POLAR_FAULTS_TIMINGS")
    if out:
        path = Path(out)
        data = json.loads(path.read_text()) if path.exists() else {}
        data.setdefault(what, []).append(round(seconds, 2))
        path.write_text(json.dumps(data, indent=2) + "\n")
