"""The Celery app: `celery -A workers.celery_app worker`, configured from the same Settings."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Any

from celery import Celery, signals

from app.config import Settings, get_settings

log = logging.getLogger(__name__)

# Set to False by tests that start a worker without a model.
WARM_MODEL = True


def create_celery(settings: Settings | None = None) -> Celery:
    """A Celery app whose broker and result backend are `settings.broker_url`."""
    settings = settings or get_settings()
    app = Celery("polar", include=["workers.tasks"])
    app.conf.update(
        broker_url=settings.broker_url or None,
        result_backend=settings.broker_url or None,
        # A task is acknowledged only once it has finished, so a worker that dies mid-task
        # (OOM, node lost) hands it back to the queue; run_job is idempotent, so a rerun is safe.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Training and embedding are long and hold the model: take one task at a time.
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # The database holds each job's state; results are only kept for `celery inspect`.
        result_expires=timedelta(days=1),
        # With acks_late, Redis redelivers a task that has not been acknowledged within this
        # time, so it must exceed the longest job (embedding a large library).
        broker_transport_options={"visibility_timeout": int(timedelta(hours=6).total_seconds())},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_track_started=True,
    )
    return app


celery_app = create_celery()


def warm_model() -> threading.Thread | None:
    """Start loading the model in the background; tasks that need it wait on the loader's lock."""
    try:
        from app.services.model import load_serving_model
    except ImportError:  # the ML engine is optional for workers that only run light jobs
        log.warning("the model loader is not available; the model is not preloaded")
        return None
    model = get_settings().model

    def load() -> None:
        try:
            # The same loader as the API: the configured model, or the demo model, loudly.
            load_serving_model(model)
        except Exception:  # the first task that needs the model reports the error properly
            log.exception("preloading the model failed")

    # In a thread, because Celery gives worker_process_init only a few seconds to return.
    thread = threading.Thread(target=load, name="polar-model-warmup", daemon=True)
    thread.start()
    return thread


@signals.worker_process_init.connect
def _on_worker_process_init(**_: Any) -> None:
    """Each worker process loads the model once, before its first task needs it."""
    if WARM_MODEL:
        warm_model()
