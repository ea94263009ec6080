"""Shared fixtures. Integration tests use the real PostgreSQL and Redis (docs/DEVELOPMENT.md)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from collections.abc import Iterator
from pathlib import Path

import fastapi.dependencies.models as fastapi_models
import httpx
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.ml.model import DEMO_MODEL_NAME, demo_checkpoint_path, forget_clips
from app.ml.onnx_engine import forget_engines
from tests.db_fixtures import *  # noqa: F403
from tests.job_fixtures import *  # noqa: F403

# Apps built by tests load their model on first use, not at startup: most tests need none, and
# those that do install a tiny one (tests/model_fixtures.py) or load the demo model explicitly.
os.environ.setdefault("POLAR_MODEL__PRELOAD", "false")
# Jobs that need a model use the bundled demo model; nothing is fetched from the network.
os.environ.setdefault("POLAR_MODEL__NAME", "polar-demo")
os.environ.setdefault("POLAR_MODEL__PRETRAINED", str(demo_checkpoint_path()))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# FastAPI remembers what kind of callable each endpoint and dependency is in module-level LRU
# caches (fastapi.dependencies.models, 4096 entries each). Their keys hold the callables, and
# an app's endpoints are closures that reach the app: every app a test builds stayed alive with
# its models, indexes and pools, about 30 MB each, until the caches had cycled. One process
# builds one app; the suite builds thousands, so the caches are emptied after each test.
_FASTAPI_CALLABLE_CACHES = tuple(
    cache
    for name in (
        "_is_gen_callable_cached",
        "_is_async_gen_callable_cached",
        "_is_coroutine_callable_cached",
    )
    if (cache := getattr(fastapi_models, name, None)) is not None
)


@pytest.fixture(autouse=True)
def _release_apps() -> Iterator[None]:
    yield
    for cache in _FASTAPI_CALLABLE_CACHES:
        cache.cache_clear()
    _trim_heap()


@pytest.fixture(scope="module", autouse=True)
def _release_models() -> Iterator[None]:
    """The process-wide model cache keeps every model a test module loaded (real-size ViT-B-32
    checkpoints written by the Immich and speed tests: about 600 MB each). After each module
    only the demo model stays, which most tests share."""
    yield
    forget_clips(lambda bundle: bundle.fingerprint.model_id.startswith(f"{DEMO_MODEL_NAME}/"))
    forget_engines()  # their ONNX Runtime sessions hold a copy of the weights each
    _return_freed_memory()


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_LIBC = _libc()


def _trim_heap() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim): the suite's apps
    run many short-lived threads, whose freed memory stays in malloc's arenas, resident, until
    trimmed (a few milliseconds)."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def _return_freed_memory() -> None:
    """Collect cycles (a model in one), then trim the heap."""
    gc.collect()
    _trim_heap()


def _memory_kb() -> tuple[int, int]:
    """(resident now, the process's peak resident so far), in kB."""
    found = {"VmRSS:": 0, "VmHWM:": 0}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(maxsplit=1)[0]
                if key in found:
                    found[key] = int(line.split()[1])
    except OSError:
        pass
    return found["VmRSS:"], found["VmHWM:"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `real_size` (a ViT-B-32 or two, about 600 MB each, plus their load's
    transients) run first, in their order, while the process's heap is still small: later, on
    top of what the suite has grown to, they set the suite's peak resident memory."""
    items.sort(key=lambda item: item.get_closest_marker("real_size") is None)


def pytest_runtest_logfinish(nodeid: str) -> None:
    """POLAR_TEST_RSS_LOG=<file>: the suite's resident memory after each test and its peak so
    far (kB), a line each, to find what holds memory (docs/DEVELOPMENT.md)."""
    path = os.environ.get("POLAR_TEST_RSS_LOG")
    if path:
        rss, peak = _memory_kb()
        with open(path, "a") as f:
            f.write(f"{rss}\t{peak}\t{nodeid}\n")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", broker_url="")


@pytest.fixture
def client(settings: Settings) -> Iterator[httpx.Client]:
    with TestClient(create_app(settings)) as c:
        yield c
