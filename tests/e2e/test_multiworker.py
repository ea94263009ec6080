"""`polar serve` with several API processes: connections spread over them, a dead one is
replaced, a stop stops them all, and a process that cannot start stops the service."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.demo.run_demo import free_port
from app.multiworker import reuse_port_supported

REDIS_URL = os.environ.get("POLAR_TEST_REDIS_URL", "redis://127.0.0.1:6379")
pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(not reuse_port_supported(), reason="SO_REUSEPORT spreading is Linux's"),
]


def _env(data: Path, **extra: str) -> dict[str, str]:
    return os.environ | {
        "POLAR_DATA_DIR": str(data),
        "POLAR_DATABASE_URL": "",
        "POLAR_WORKERS": "2",
        "POLAR_BROKER_URL": f"{REDIS_URL}/12",
        "POLAR_MODEL__PRELOAD": "false",
        "POLAR_LIBRARY__WATCH": "false",
        **extra,
    }


def _api_processes(parent: int) -> set[int]:
    """The supervisor's API processes (its children that run uvicorn, not the resource tracker)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"spawn_main" in cmdline:
            found.add(int(entry))
    return found


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _answers(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def _supervisor(env: dict[str, str], log: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def _socket_inodes(pid: int) -> set[int]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", target)
        if m:
            out.add(int(m.group(1)))
    return out


def _sockets_on(port: int, state: str) -> set[int]:
    """Inodes of the local IPv4 sockets on `port` in a TCP state ("01" established, "0A"
    listening)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == state:
            inodes.add(int(fields[9]))
    return inodes


def _all_listening(parent: int, port: int) -> bool:
    """Whether two API processes run and each listens on the port with its own socket (a
    process still loading the app takes no connection yet)."""
    workers = _api_processes(parent)
    listening = _sockets_on(port, "0A")
    return len(workers) == 2 and all(_socket_inodes(pid) & listening for pid in workers)


def _response_status(conn: socket.socket) -> int:
    """Read one whole HTTP/1.1 response (headers and Content-Length body) off `conn`."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"connection closed mid-response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))
    while len(body) < length:
        chunk = conn.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    assert len(body) == length, "more bytes than the response said"
    return int(head.split(b" ", 2)[1])


def _unauthorized_images(base: str) -> float:
    """polar_http_requests_total for GET /images answered 401, from one scrape."""
    text = httpx.get(f"{base}/metrics", timeout=10, headers={"Connection": "close"}).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "polar_http_requests_total"
                and labels.get("route") == "/images"
                and labels.get("method") == "GET"
                and labels.get("status") == "401"
            ):
                total += sample.value
    return total


def test_connections_spread_over_the_processes_and_a_dead_one_is_replaced(tmp_path):
    with _supervisor(_env(tmp_path / "data"), tmp_path / "serve.log") as (proc, port):
        base = f"http://127.0.0.1:{port}"
        _wait(lambda: _all_listening(proc.pid, port), 300, "2 processes listening")
        _wait(lambda: _answers(base), 60, "the API")
        workers = _api_processes(proc.pid)
        # Sixteen kept-open connections made at once, as a proxy or a benchmark opens them:
        # each process holds some (one shared socket gave them all to one process).
        conns = []
        for _ in range(16):
            c = socket.create_connection(("127.0.0.1", port))
            conns.append(c)
        for c in conns:
            c.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        for c in conns:
            assert _response_status(c) == 200
        accepted = _sockets_on(port, "01")
        held = {pid: len(_socket_inodes(pid) & accepted) for pid in workers}
        # A counted request on each connection (no key: 401), so both processes count some.
        for c in conns:
            c.sendall(b"GET /images HTTP/1.1\r\nHost: test\r\n\r\n")
        for c in conns:
            assert _response_status(c) == 401
        for c in conns:
            c.close()
        assert sum(held.values()) == 16, held
        assert all(n > 0 for n in held.values()), held
        # /metrics adds up every process's counts, whichever process a scrape reaches (each
        # scrape on a new connection; one process's share alone is below 16).
        for _ in range(6):
            assert _unauthorized_images(base) == 16

        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        _wait(
            lambda: victim not in _api_processes(proc.pid) and len(_api_processes(proc.pid)) == 2,
            60,
            "a new process in place of the dead one",
        )
        _wait(lambda: _answers(base), 60, "the API after the restart")
        assert "starting another" in (tmp_path / "serve.log").read_text()
        # What the killed process counted still counts (requests it served happened).
        assert _unauthorized_images(base) == 16

        survivors = _api_processes(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        for pid in survivors:
            assert (
                not Path(f"/proc/{pid}").exists()
                or "zombie" in Path(f"/proc/{pid}/status").read_text()
            )
        assert not _answers(base)


def test_a_process_that_cannot_start_stops_the_service_with_its_exit_code(tmp_path):
    env = _env(tmp_path / "data", POLAR_DATABASE_URL="postgresql+psycopg://127.0.0.1:1/nothing")
    with _supervisor(env, tmp_path / "serve.log") as (proc, _port):
        code = proc.wait(180)
    log = (tmp_path / "serve.log").read_text()
    assert code != 0, log[-2000:]
    assert "times within" in log and "stopping" in log
