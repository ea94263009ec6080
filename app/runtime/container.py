"""The composition root: the one place that wires settings, database, storage, the model, the
job handlers and the job queue, for the API (app/main.py) and the Celery worker (workers/).

Services receive what they need as arguments and never reach for process state; entry points
build one `Container` and pass its parts on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy.engine import Engine

from app.config import Settings
from app.db import make_engine, make_session_factory
from app.runtime.runner import JobRunner
from app.services.foreground import Foreground
from app.services.job_handlers import handler_table
from app.services.job_runs import JobEnvironment, JobHandler, SessionFactory
from app.services.jobs import JobQueue
from app.services.library_paths import refuse_data_folder_in_roots
from app.services.model import ModelLoader
from app.storage import ImageStore
from workers.queue import CeleryQueue, celery_client


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


def build(settings: Settings, *, handlers: Mapping[str, JobHandler] | None = None) -> Container:
    """Wire one process; `handlers` replaces the service's handler table (tests). Misconfigured
    (nothing started) when the data folder lies under an allowed library root."""
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
    return Container(settings, engine, session_factory, store, model, env, foreground)


def job_queue(container: Container) -> JobQueue:
    """Where this process sends new jobs: Celery with a broker, else an embedded runner (which
    the caller starts and stops: `isinstance(queue, JobRunner)`)."""
    if container.settings.embedded_jobs:
        return JobRunner(container.jobs)
    return CeleryQueue(celery_client(container.settings))
