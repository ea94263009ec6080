"""PostgreSQL restarted under search load: 503s while it is away, no 500, no error after (issue 13).

A private PostgreSQL (initdb as the `postgres` system user into the test's folder, its own port
and socket directory) serves the API in embedded mode; client threads search without pause while
the database is stopped for a few seconds and started again.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.demo.run_demo import free_port, local_server
from app.ml.model import DEMO_MODEL_NAME, demo_checkpoint_path
from tests.faults.conftest import ROOT, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(600)]

PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), None)


class PrivatePostgres:
    """initdb + pg_ctl as the `postgres` user (the server refuses to run as root)."""

    def __init__(self, root: Path, port: int) -> None:
        assert PG_BIN is not None
        self.root, self.port = root, port
        self.data, self.sock = root / "pgdata", root / "pgsock"
        self.sock.mkdir(parents=True)
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_postgres:
            shutil.chown(root, "postgres")
            shutil.chown(self.sock, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        assert PG_BIN is not None
        subprocess.run([*self.as_postgres, str(PG_BIN / tool), *args], check=True,
                       capture_output=True, timeout=120)  # fmt: skip

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "pg.log"),
                  "-w", "start")  # fmt: skip

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")


@pytest.fixture
def postgres() -> Iterator[PrivatePostgres]:
    if PG_BIN is None or (os.geteuid() == 0 and shutil.which("runuser") is None):
        pytest.fail("PostgreSQL's server binaries (Debian's postgresql package) are needed")
    # Not under pytest's tmp folder: the postgres user cannot enter root's private /tmp dirs.
    root = Path(tempfile.mkdtemp(prefix="polar-faults-pg-"))
    try:
        pg = PrivatePostgres(root, free_port())
        pg.start()
        try:
            yield pg
        finally:
            with contextlib.suppress(subprocess.CalledProcessError):
                pg.stop()  # unless already stopped
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_database_restart_under_search_load(tmp_path: Path, postgres: PrivatePostgres):
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLAR_")}
    env |= {
        "POLAR_DATA_DIR": str(tmp_path / "data"),
        "POLAR_DATABASE_URL": postgres.url,
        "POLAR_BROKER_URL": "",
        "POLAR_MODEL__NAME": DEMO_MODEL_NAME,
        "POLAR_MODEL__PRETRAINED": str(demo_checkpoint_path()),
        "POLAR_MODEL__THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    subprocess.run([sys.executable, "-m", "app.cli", "migrate"], env=env, cwd=ROOT, check=True,
                   capture_output=True)  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "app.cli", "create-user", "alice"], env=env,
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout  # fmt: skip
    key = next(line.split()[-1] for line in out.splitlines() if "api_key" in line)
    with local_server(env, free_port(), tmp_path / "api.log") as base:
        headers = {"Authorization": f"Bearer {key}"}
        statuses: collections.Counter[tuple[int, str]] = collections.Counter()
        phase = {"name": "before"}
        stop = threading.Event()
        lock = threading.Lock()

        def load() -> None:
            with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
                while not stop.is_set():
                    try:
                        r = client.get("/search", params={"q": "a hat on the beach"})
                    except httpx.TransportError as exc:  # the server cut the connection
                        with lock:
                            statuses[(0, f"{phase['name']}:{type(exc).__name__}")] += 1
                        continue
                    code = r.json().get("error", {}).get("code", "") if r.status_code >= 400 else ""
                    with lock:
                        statuses[(r.status_code, f"{phase['name']}:{code}")] += 1

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(2)
            phase["name"] = "outage"
            postgres.stop()
            time.sleep(4)
            postgres.start()
            phase["name"] = "recovering"
            wait_until(lambda: httpx.get(f"{base}/search", params={"q": "hat"}, headers=headers,
                                         timeout=30).status_code == 200,
                       60, "search never recovered")  # fmt: skip
            phase["name"] = "after"
            time.sleep(3)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
    by_status = collections.Counter(status for status, _ in statuses.elements())
    assert 500 not in by_status, statuses
    assert set(by_status) <= {200, 503}, statuses  # 0: a connection cut without an answer
    outage_errors = {label for (status, label) in statuses if status == 503}
    assert outage_errors and all(label.endswith("database_unavailable") for label in outage_errors)
    after = {status for (status, label) in statuses if label.startswith("after")}
    assert after == {200}, statuses  # no error once it is back
