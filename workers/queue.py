"""The Celery side of the `JobQueue` protocol (app/services/jobs.py): a job id becomes a task."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from celery import Celery

from app.config import Settings

# The one task every job runs through (workers/tasks.py).
RUN_JOB_TASK = "polar.run_job"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings shared by the API's client and the worker: broker = settings.broker_url."""
    return {
        "broker_url": settings.broker_url or None,
        "result_backend": settings.broker_url or None,
        # A task is acknowledged only once it has finished, so a worker that dies mid-task
        # (OOM, node lost) hands it back to the queue; run_job is idempotent, so a rerun is safe.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # Training and embedding are long and hold the model: take one task at a time.
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        # The database holds each job's state; results are only kept for `celery inspect`.
        "result_expires": timedelta(days=1),
        # With acks_late, Redis redelivers a task that has not been acknowledged within this
        # time, so it must exceed the longest job (embedding a large library).
        "broker_transport_options": {"visibility_timeout": int(timedelta(hours=6).total_seconds())},
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "task_track_started": True,
    }


def celery_client(settings: Settings) -> Celery:
    """A Celery app that only publishes (the API's side); it loads no task module."""
    client = Celery("polar")
    client.conf.update(celery_config(settings))
    return client


class CeleryQueue:
    """Publishes job ids to the broker by task name, so the API never imports the task module."""

    def __init__(self, celery: Celery) -> None:
        self.celery = celery

    def enqueue(self, job_id: str) -> None:
        """Send the task; raises if the broker cannot take it (the job stays queued)."""
        self.celery.send_task(RUN_JOB_TASK, args=[job_id])
