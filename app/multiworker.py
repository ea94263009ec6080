"""`polar serve` with POLAR_WORKERS > 1: one listening socket per API process (SO_REUSEPORT).

uvicorn's own `workers=N` shares one listening socket between its processes, and whichever
process wakes first accepts every connection waiting at that moment. Clients that keep their
connections open (a browser, a reverse proxy, the load benchmark's 8 clients) then often all
sit on one process while the others idle: bench/load.py measured two workers at 0.99x the
throughput of one client in one run and 1.96x in the next. Here each process listens on a
socket of its own on the same port (SO_REUSEPORT), and the kernel spreads new connections over
them by their addresses, so every process gets its share, whenever the clients connected.

The parent only supervises: it reserves the port (a bound socket of the same group that never
listens, so it takes no connections), starts the processes, starts a new one when one dies,
and on SIGTERM or SIGINT lets each finish its requests (uvicorn's graceful shutdown) before it
exits. A process that dies within `FAST_EXIT_S` of its start several times in a row points at
a setting or the environment, not bad luck: the parent then stops with that exit code.

Where SO_REUSEPORT is missing (not Linux), uvicorn's shared socket is used instead.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.process
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from types import FrameType

from app.metrics import MULTIPROC_ENV, multiprocess_dir

log = logging.getLogger("polar.serve")

# A process that dies sooner than this after its start failed to start. Importing the app
# (torch, open_clip) alone takes about 9 s on a busy 2-core machine; 10 s let a failed start
# pass for a crash.
FAST_EXIT_S = 30.0
MAX_FAST_EXITS = 3  # in a row, for one slot: stop everything
STOP_GRACE_S = 30.0  # SIGTERM to SIGKILL, for requests in flight to finish
_spawn = multiprocessing.get_context("spawn")  # fresh interpreters: no torch state forked


class _MetricsDir:
    """The directory the API processes share their metrics through (app/metrics.py): a fresh
    one of this supervisor's own, or the operator's PROMETHEUS_MULTIPROC_DIR with the values of
    earlier runs removed (prometheus_client needs it emptied between runs)."""

    def __init__(self) -> None:
        given = multiprocess_dir()
        self.owned = given is None
        self.path = tempfile.mkdtemp(prefix="polar-metrics-") if given is None else given
        if given is not None:
            os.makedirs(given, exist_ok=True)
            for name in os.listdir(given):
                if name.endswith(".db"):
                    os.unlink(os.path.join(given, name))
        os.environ[MULTIPROC_ENV] = self.path  # inherited by the spawned processes

    def cleanup(self) -> None:
        if self.owned:
            os.environ.pop(MULTIPROC_ENV, None)
            shutil.rmtree(self.path, ignore_errors=True)


def mark_process_dead(pid: int) -> None:
    from prometheus_client import multiprocess

    shared = multiprocess_dir()
    if shared is not None:
        multiprocess.mark_process_dead(pid, shared)  # type: ignore[no-untyped-call]


def reuse_port_supported() -> bool:
    """Whether this platform spreads connections over sockets bound with SO_REUSEPORT."""
    return sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")


def bind_reuse_port(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) in the port's SO_REUSEPORT group, not yet listening."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def serve_one(host: str, port: int, log_level: str) -> None:
    """One API process (a child): its own socket on the shared port, then uvicorn until told
    to stop."""
    import uvicorn

    from app.config import get_settings
    from app.logs import configure_logging

    _stop_with_parent()
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    sock = bind_reuse_port(host, port)
    config = uvicorn.Config(
        "app.main:create_worker_app",
        factory=True,
        host=host,
        port=port,
        log_level=log_level,
        log_config=None,
    )
    uvicorn.Server(config).run(sockets=[sock])


def _stop_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent dies (even by SIGKILL), so no
    API process outlives its supervisor and keeps the port."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        log.debug("cannot tie this process's life to its parent's", exc_info=True)


@dataclass
class _Slot:
    """One API process and how its recent starts went."""

    process: multiprocessing.process.BaseProcess | None = None
    started_at: float = 0.0
    fast_exits: int = 0


class Supervisor:
    """Runs `workers` API processes on (host, port) until SIGTERM/SIGINT; the exit code."""

    def __init__(self, host: str, port: int, workers: int, log_level: str) -> None:
        self.host, self.port, self.workers, self.log_level = host, port, workers, log_level
        self.slots = [_Slot() for _ in range(workers)]
        self._stop_signal: int | None = None

    def _start(self, slot: _Slot) -> None:
        proc = _spawn.Process(
            target=serve_one, args=(self.host, self.port, self.log_level), name="polar-api"
        )
        proc.start()
        slot.process, slot.started_at = proc, time.monotonic()
        log.info("started API process %s on %s:%s", proc.pid, self.host, self.port)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._stop_signal = signum

    def run(self) -> int:
        # Reserve the port and learn it (port 0 = any free one): a bound socket of the group
        # that never listens, so the kernel hands it no connection.
        reserved = bind_reuse_port(self.host, self.port)
        self.port = reserved.getsockname()[1]
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        code = 0
        metrics_dir = _MetricsDir()
        try:
            for slot in self.slots:
                self._start(slot)
            while self._stop_signal is None:
                failed = self._watch()
                if failed is not None:
                    code = failed
                    break
                time.sleep(0.2)
        finally:
            self._stop_all()
            for s, handler in previous.items():
                signal.signal(s, handler)
            reserved.close()
            metrics_dir.cleanup()
        return code

    def _watch(self) -> int | None:
        """Start a new process for each one that died; an exit code when the service must stop."""
        for slot in self.slots:
            proc = slot.process
            if proc is None or proc.is_alive() or self._stop_signal is not None:
                continue
            exitcode = proc.exitcode if proc.exitcode is not None else 1
            if proc.pid is not None:  # its live gauges no longer count
                mark_process_dead(proc.pid)
            lived = time.monotonic() - slot.started_at
            slot.fast_exits = slot.fast_exits + 1 if lived < FAST_EXIT_S else 0
            if slot.fast_exits >= MAX_FAST_EXITS:
                log.error(
                    "API process %s exited with code %s %d times within %.0f s of starting; "
                    "stopping (see its error above)",
                    proc.pid, exitcode, slot.fast_exits, FAST_EXIT_S,
                )  # fmt: skip
                return exitcode or 1
            log.warning(
                "API process %s exited with code %s after %.1f s; starting another",
                proc.pid, exitcode, lived,
            )  # fmt: skip
            self._start(slot)
        return None

    def _stop_all(self) -> None:
        """SIGTERM to every process (uvicorn finishes its requests), SIGKILL after the grace."""
        live = [s.process for s in self.slots if s.process is not None and s.process.is_alive()]
        for proc in live:
            proc.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in live:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("API process %s did not stop in %.0f s; killing it", proc.pid,
                            STOP_GRACE_S)  # fmt: skip
                proc.kill()
                proc.join()
