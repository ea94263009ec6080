"""The composition root: the one place that builds every long-lived object of a process, once,
and starts and stops them in order. The API (app/main.py), the Celery worker (workers/) and the
CLI (app/cli/) each build one `Container` and ask it for what they need; `app.state` holds only
the container.

What a process owns, and in which order it starts (stop is the reverse):
1. the database engine and its session factory, the image store (built, nothing to start);
2. the model loader (starts loading in the background when POLAR_MODEL__PRELOAD);
3. the job queue: the embedded runner's threads (no broker), or a Celery publisher;
4. the watchers: the reconciler (re-sends jobs no worker has) and the library monitor (watches
   folders), in the one process that runs them (the embedded API, or the Celery worker's main
   process); never in an API process that hands jobs to Celery.
Beside those: the per-user index cache and the adapter cache of searches, the metrics, the turns
searches take, and the Immich bridge's HTTP client (when the bridge is on).

Services receive what they need as arguments and never reach for process state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import httpx
from sqlalchemy.engine import Engine

from app.api.interactive import ImageTurns, ImmichBridge, SearchTurns
from app.api.metrics import Metrics
from app.config import Settings
from app.db import make_engine, make_session_factory
from app.ml.threads import cpu_count
from app.runtime.library_monitor import LibraryMonitor
from app.runtime.reconciler import ReconcilePolicy, Reconciler
from app.runtime.runner import JobRunner
from app.services.foreground import Foreground
from app.services.immich import ClientRateLimit
from app.services.index import IndexCache
from app.services.job_handlers import handler_table
from app.services.job_runs import JobEnvironment, JobHandler, SessionFactory
from app.services.jobs import JobQueue
from app.services.library_paths import refuse_data_folder_in_roots
from app.services.model import ModelLoader
from app.services.search import AdapterCache
from app.storage import ImageStore
from workers.queue import CeleryQueue, celery_client


class Watchers:
    """The reconciler and the library monitor of one process, started and stopped together.

    Both send jobs through `queue`; `skip` tells the reconciler which queued jobs the queue
    already holds (the embedded runner's pending ones)."""

    def __init__(
        self,
        session_factory: SessionFactory,
        queue: JobQueue,
        settings: Settings,
        *,
        skip: Callable[[str], bool] = lambda _job_id: False,
        policy: ReconcilePolicy | None = None,
    ) -> None:
        self.reconciler = Reconciler(
            session_factory, queue, policy or ReconcilePolicy.of(settings.jobs), skip=skip
        )
        self.monitor = LibraryMonitor(session_factory, queue, settings.library)
        self._started = self._stopped = False

    def start(self) -> None:
        """Start both (once; again is a no-op)."""
        if self._started:
            return
        self._started = True
        self.reconciler.start()
        self.monitor.start()

    def stop(self) -> None:
        """Stop both (the monitor first: it queues scans the reconciler may then re-send)."""
        if not self._started or self._stopped:
            return
        self._stopped = True
        self.monitor.stop()
        self.reconciler.stop()


@dataclass(frozen=True)
class Container:
    """Everything one process shares, built once."""

    settings: Settings
    engine: Engine
    session_factory: SessionFactory
    store: ImageStore
    model: ModelLoader  # the one model of this process, for searches and jobs alike
    jobs: JobEnvironment  # what job handlers get
    foreground: Foreground  # this process's searches in flight; its jobs step aside for them
    queue: JobQueue  # where this process sends new jobs
    watchers: Watchers | None  # None: another process watches (an API that uses Celery)
    index_cache: IndexCache  # per-user search indexes, bounded by bytes
    adapter_cache: AdapterCache  # per-user concept adapters of searches
    metrics: Metrics
    search_turns: SearchTurns  # searches take turns, and this process's jobs pause for them
    bridge: ImmichBridge | None  # None: the Immich bridge is off

    @property
    def runner(self) -> JobRunner | None:
        """The embedded job runner, when this process runs its own jobs."""
        return self.queue if isinstance(self.queue, JobRunner) else None

    def start(self) -> None:
        """Start, in order: the model's load, the embedded runner (which queues again the jobs a
        previous process left unfinished), the watchers."""
        self.model.start()
        if self.runner is not None:
            self.runner.start()
        if self.watchers is not None:
            self.watchers.start()

    def stop(self) -> None:
        """Stop in the reverse order, then close the caches and the database pool. The bridge's
        client is closed by `aclose` (it belongs to an event loop)."""
        if self.watchers is not None:
            self.watchers.stop()
        if self.runner is not None:
            self.runner.stop()
        self.index_cache.close()
        self.engine.dispose()

    async def aclose(self) -> None:
        """`stop`, and close the Immich bridge's client in the running event loop."""
        try:
            self.stop()
        finally:
            if self.bridge is not None:
                await self.bridge.client.aclose()


def build(
    settings: Settings,
    *,
    handlers: Mapping[str, JobHandler] | None = None,
    queue: Callable[[JobEnvironment], JobQueue] | None = None,
    watch: Callable[[JobEnvironment], JobQueue] | None = None,
) -> Container:
    """Wire one process. `handlers` replaces the service's handler table (tests). `queue` makes
    the job queue (default: the embedded runner without a broker, else a Celery publisher);
    `watch` makes the queue the watchers send through (default: the embedded runner; with a
    broker, no watchers). Misconfigured (nothing started) when the data folder lies under an
    allowed library root."""
    refuse_data_folder_in_roots(settings)
    engine = make_engine(settings.database_url, pool_size=settings.request_threads)
    session_factory = make_session_factory(engine)
    store = ImageStore(settings.data_dir)
    model = ModelLoader(settings.model)
    foreground = Foreground(max_wait_s=settings.threads.job_yield_ms / 1000)
    env = JobEnvironment(
        settings=settings,
        session_factory=session_factory,
        store=store,
        handlers=handler_table() if handlers is None else handlers,
        serving=model.get,
        foreground=foreground,
    )
    job_queue = queue(env) if queue is not None else _default_queue(env)
    watchers = None
    if watch is not None:
        watchers = Watchers(session_factory, watch(env), settings)
    elif isinstance(job_queue, JobRunner):
        watchers = Watchers(session_factory, job_queue, settings, skip=job_queue.is_pending)
    bridge = None
    if settings.immich.enabled:
        immich = settings.immich
        bridge = ImmichBridge(
            httpx.AsyncClient(),
            ImageTurns(immich.concurrent_images),
            ClientRateLimit(immich.text_rate_per_minute),
        )
    return Container(
        settings=settings,
        engine=engine,
        session_factory=session_factory,
        store=store,
        model=model,
        jobs=env,
        foreground=foreground,
        queue=job_queue,
        watchers=watchers,
        index_cache=IndexCache(
            settings.data_dir / "index", max_bytes=settings.search.index_cache_mb * 1024 * 1024
        ),
        adapter_cache=AdapterCache(),
        metrics=Metrics(),
        search_turns=SearchTurns(foreground, settings.threads.concurrent_searches or cpu_count()),
        bridge=bridge,
    )


def _default_queue(env: JobEnvironment) -> JobQueue:
    """Celery with a broker, else an embedded runner."""
    if env.settings.embedded_jobs:
        return JobRunner(env)
    return CeleryQueue(celery_client(env.settings))
