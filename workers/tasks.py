"""Celery tasks: a job id in, one service call out (app.services.jobs.run_job)."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from app.services import jobs
from workers.celery_app import PolarCelery, celery_app
from workers.queue import RUN_JOB_TASK

log = logging.getLogger(__name__)

MAX_RETRIES = 5


class _JobTask(Task):  # type: ignore[misc]  # celery ships no type hints: Task is Any
    """Marks the job failed once Celery gives up on it, so it never stays 'running'."""

    def on_failure(
        self,
        exc: BaseException,
        task_id: str,  # noqa: ARG002 (Celery's Task.on_failure signature)
        args: Any,
        kwargs: Any,
        einfo: Any,  # noqa: ARG002 (likewise)
    ) -> None:
        job_id = args[0] if args else kwargs.get("job_id")
        if job_id is None:
            return
        log.error("job %s: Celery gave up after retries: %r", job_id, exc,
                  extra={"job_id": job_id})  # fmt: skip
        try:
            jobs.mark_failed(
                job_id,
                jobs.RETRIES_EXHAUSTED,
                jobs.RETRIES_EXHAUSTED_MESSAGE,
                session_factory=_app(self).job_environment().session_factory,
            )
        except Exception:  # the database may be the thing that is down
            log.exception("could not mark job %s failed", job_id)


def _app(task: Task) -> PolarCelery:
    app = task.app
    assert isinstance(app, PolarCelery), "polar tasks run on a PolarCelery app"
    return app


@celery_app.task(  # type: ignore[untyped-decorator]  # celery's task decorator is untyped
    name=RUN_JOB_TASK,
    bind=True,
    base=_JobTask,
    autoretry_for=jobs.TRANSIENT_ERRORS,
    max_retries=MAX_RETRIES,
    retry_backoff=2,  # 2, 4, 8, 16, 32 s (capped below), with jitter
    retry_backoff_max=120,
    retry_jitter=True,
)
def run_job_task(self: Task, job_id: str) -> None:
    """Run one job; transient errors (database or broker connection) are retried with backoff."""
    jobs.run_job(job_id, _app(self).job_environment())
