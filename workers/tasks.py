"""Celery tasks: a job id in, one service call out (app.services.job_runs.run_job)."""

from __future__ import annotations

import logging
import random
from typing import Any

from celery import Task

from app.services import job_runs
from workers.celery_app import PolarCelery, celery_app
from workers.queue import RUN_JOB_TASK, runner_name

log = logging.getLogger(__name__)

MAX_RETRIES = 5
RETRY_BACKOFF_S = 2.0  # 2, 4, 8, 16, 32 s, each with jitter, capped below
RETRY_BACKOFF_MAX_S = 120.0


def retry_delay(retries: int) -> float:
    """Seconds before retry number `retries` + 1 (0-based): exponential, capped, jittered."""
    cap: float = min(RETRY_BACKOFF_MAX_S, RETRY_BACKOFF_S * 2.0**retries)
    return random.uniform(0.5, 1.0) * cap


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
        log.error("job %s: Celery gave up on it: %r", job_id, exc,
                  extra={"job_id": job_id})  # fmt: skip
        outage = job_runs.outage_of(exc) or job_runs.INTERNAL_FAULT
        try:
            job_runs.mark_failed(
                job_id,
                outage.code,
                outage.message,
                session_factory=_app(self).job_environment().session_factory,
            )
        except Exception:  # the database may be the thing that is down
            log.exception("could not mark job %s failed", job_id)


def _app(task: Task) -> PolarCelery:
    app = task.app
    assert isinstance(app, PolarCelery), "polar tasks run on a PolarCelery app"
    return app


@celery_app.task(  # type: ignore[untyped-decorator]  # celery's task decorator is untyped
    name=RUN_JOB_TASK, bind=True, base=_JobTask, max_retries=MAX_RETRIES
)
def run_job_task(self: Task, job_id: str) -> None:
    """Run one job; infrastructure errors (database, broker, file system: job_runs.is_transient) are
    retried with backoff, each retry one more `attempts`; anything else is the job's outcome."""
    try:
        job_runs.run_job(job_id, _app(self).job_environment(), runner=runner_name(self.request.id))
    except Exception as e:
        if not job_runs.is_transient(e):
            raise
        # Past MAX_RETRIES, retry() raises `e` itself: on_failure marks the job failed.
        raise self.retry(exc=e, countdown=retry_delay(self.request.retries)) from e
