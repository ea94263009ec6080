"""The Celery app: `celery -A workers.celery_app worker`, configured from the same Settings.

The worker's wiring (database, storage, model, handler table, its publisher, the reconciler and
the library monitor) comes from the composition root (app/runtime/container.py), built once per
worker process on first use and kept on the Celery app. The main process runs the watchers; the
pool processes run the tasks.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from billiard.exceptions import WorkerLostError
from celery import Celery, signals

from app.config import Settings, get_settings
from app.logs import configure_logging
from app.runtime.container import Container, build
from app.runtime.priority import lower_this_process
from app.services import job_runs
from app.services.job_runs import JobEnvironment, JobHandler
from app.services.jobs import JobQueue
from workers.queue import CeleryQueue, celery_config, runner_name

log = logging.getLogger(__name__)


class PolarCelery(Celery):  # type: ignore[misc]  # celery ships no type hints: Celery is Any
    """A Celery app that carries its process's settings and wiring."""

    def __init__(self, settings: Settings, *, warm_model: bool = True) -> None:
        super().__init__("polar", include=["workers.tasks"])
        self.conf.update(celery_config(settings))
        self.settings = settings
        self.warm_model_at_start = warm_model  # tests start workers that need no model
        self._lock = threading.RLock()  # the container is built under it
        self._container: Container | None = None
        self._handlers: Mapping[str, JobHandler] | None = None  # None: the service's table
        self._built_in = os.getpid()  # the process that built _container

    def container(self) -> Container:
        """This process's wiring (built on first use)."""
        with self._lock:
            if self._container is None:
                self._container = self._build()
            return self._container

    def _build(self) -> Container:
        """The container of a worker process: jobs go out through this Celery app (a background
        publisher; the watchers send in the foreground, so a failed send is retried by them)."""
        self._built_in = os.getpid()
        return build(
            self.settings,
            handlers=self._handlers,
            queue=lambda _env: CeleryQueue(self),
            watch=lambda _env: CeleryQueue(self, background=False),
        )

    def forget_parent(self) -> None:
        """In a pool process just forked from the worker's main process: drop the wiring it
        inherited (its pooled database connections are the parent's, open in the parent; its
        locks may have been held by a thread that did not come along), and build afresh."""
        if self._built_in == os.getpid():
            return  # not forked (the solo pool runs tasks in the main process)
        self._lock = threading.RLock()
        container, self._container = self._container, None
        if container is not None:
            container.engine.dispose(close=False)  # not closed: they are the parent's

    def resume_lost_run(self, job_id: str, task_id: str) -> threading.Thread:
        """A pool process died running `job_id` (task `task_id`): put the job back to 'queued'
        and send it again now, not after the heartbeat deadline. In a thread: the worker's
        main loop must not wait on the database."""

        def resume() -> None:
            try:
                factory = self.job_environment().session_factory
                requeued = job_runs.requeue_lost_run(
                    job_id, runner_name(task_id), session_factory=factory
                )
                if not requeued:
                    return  # finished meanwhile, or another delivery holds it
                log.warning("job %s lost its worker process; re-queued and sent again", job_id,
                            extra={"job_id": job_id})  # fmt: skip
                self.publisher().enqueue(job_id)
            except Exception:  # the database may be away: the heartbeat deadline catches it
                log.warning("could not re-queue job %s after its process was lost", job_id,
                            exc_info=True, extra={"job_id": job_id})  # fmt: skip

        thread = threading.Thread(target=resume, name="polar-resume-lost", daemon=True)
        thread.start()
        return thread

    def publisher(self) -> JobQueue:
        """This process's background publisher (sends again once the broker answers)."""
        return self.container().queue

    def use_handlers(self, handlers: Mapping[str, JobHandler]) -> None:
        """Run jobs with this handler table instead of the service's (tests)."""
        with self._lock:
            self._handlers = handlers
            self._container = self._build()

    def job_environment(self) -> JobEnvironment:
        return self.container().jobs

    def warm_model(self) -> threading.Thread | None:
        """Start loading the model in the background; tasks that need it wait on the loader."""
        serving = self.job_environment().serving

        def load() -> None:
            try:
                # The same loader as the API: the configured model, or the demo model, loudly.
                serving()
            except Exception:  # the first task that needs the model reports the error properly
                log.exception("preloading the model failed")

        # In a thread, because Celery gives worker_process_init only a few seconds to return.
        thread = threading.Thread(target=load, name="polar-model-warmup", daemon=True)
        thread.start()
        return thread

    def start_reconciler(self) -> None:
        """Re-send jobs that no worker has (lost messages, dead workers), and watch the library
        folders (app/runtime/library_monitor.py), from this process: the container's watchers."""
        watchers = self.container().watchers
        assert watchers is not None, "a worker's container always has watchers"
        watchers.start()

    def stop_reconciler(self) -> None:
        with self._lock:
            container = self._container
        if container is not None and container.watchers is not None:
            container.watchers.stop()


def create_celery(settings: Settings | None = None, *, warm_model: bool = True) -> PolarCelery:
    """A Celery app whose broker and result backend are `settings.broker_url`."""
    return PolarCelery(settings or get_settings(), warm_model=warm_model)


celery_app = create_celery()


@signals.setup_logging.connect  # type: ignore[untyped-decorator]  # celery is untyped
def _on_setup_logging(**_: Any) -> None:
    """Our format instead of Celery's (connecting here stops Celery configuring its own)."""
    configure_logging(celery_app.settings.log_level, celery_app.settings.log_format)


@signals.worker_ready.connect  # type: ignore[untyped-decorator]  # celery is untyped
def _on_worker_ready(**_: Any) -> None:
    """The worker's main process looks for lost jobs (one per worker; duplicates are safe)."""
    celery_app.start_reconciler()


@signals.worker_shutdown.connect  # type: ignore[untyped-decorator]  # celery is untyped
def _on_worker_shutdown(**_: Any) -> None:
    celery_app.stop_reconciler()


@signals.task_failure.connect  # type: ignore[untyped-decorator]  # celery is untyped
def _on_task_failure(
    task_id: str | None = None,
    exception: BaseException | None = None,
    args: Any = None,
    kwargs: Any = None,
    **_: Any,
) -> None:
    """The worker's main process saw a pool process die mid-task (WorkerLostError: killed,
    out of memory): its job resumes at once."""
    if not isinstance(exception, WorkerLostError) or task_id is None:
        return
    job_id = args[0] if args else (kwargs or {}).get("job_id")
    if isinstance(job_id, str):
        celery_app.resume_lost_run(job_id, task_id)


@signals.worker_process_init.connect  # type: ignore[untyped-decorator]  # celery is untyped
def _on_worker_process_init(**_: Any) -> None:
    """Each worker process starts with wiring of its own (nothing of the main process's
    crosses the fork: app/db.py), runs at the jobs' lower CPU priority (app/runtime/priority.py) and
    loads the model once, before its first task needs it."""
    celery_app.forget_parent()
    lower_this_process(celery_app.settings.jobs.nice)
    if celery_app.warm_model_at_start:
        celery_app.warm_model()
