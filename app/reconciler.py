"""The database is the queue of record: jobs that a queue lost are handed to it again.

A job committed as `queued` may never reach a worker (the broker was down when the request
handed it over, the API process died in between), and a `running` job's worker may die with it
(host lost: its message sits unacknowledged in Redis for hours). The reconciler finds both in the
`jobs` table and enqueues them again:
- `running` with no heartbeat for `dead_after_s` (run_job touches the row every 15 s) -> back
  to `queued` and re-sent;
- `queued` and untouched for `resend_after_s` -> re-sent (and touched, so at most once per
  period).
Re-sending is safe: `run_job` claims a job atomically (`mark_running`), so a duplicate delivery of
a job that is running or done does nothing, and handlers are idempotent.

The embedded runner runs one in the API process; the Celery worker runs one in its main process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from app import repositories
from app.config import JobSettings
from app.db import session_scope
from app.models import utcnow
from app.services.jobs import JobQueue, SessionFactory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconcilePolicy:
    """When a job counts as lost (seconds)."""

    dead_after_s: float = 120.0  # a running job without a heartbeat this long lost its worker
    resend_after_s: float = 300.0  # a queued job waiting this long is sent again
    interval_s: float = 30.0  # how often to look
    batch: int = 500  # most jobs re-sent per pass

    @classmethod
    def of(cls, cfg: JobSettings) -> ReconcilePolicy:
        return cls(cfg.dead_after_s, cfg.resend_after_s, cfg.reconcile_interval_s)


@dataclass
class ReconcileReport:
    """What one pass did."""

    revived: list[str] = field(default_factory=list)  # running without heartbeat -> re-queued
    resent: list[str] = field(default_factory=list)  # queued too long -> sent again
    failed: list[str] = field(default_factory=list)  # the queue refused them (stay queued)


def reconcile_once(
    session_factory: SessionFactory,
    queue: JobQueue,
    policy: ReconcilePolicy,
    *,
    skip: Callable[[str], bool] = lambda _job_id: False,
) -> ReconcileReport:
    """One pass: revive dead running jobs and re-send long-waiting queued ones.

    `skip(job_id)` says a job is known to be on its way already (the embedded runner's own
    backlog), so it is not sent twice.
    """
    now = utcnow()
    with session_scope(session_factory) as s:
        dead = repositories.requeue_stale_running_jobs(
            db_session=s, before=now - timedelta(seconds=policy.dead_after_s)
        )
        waiting = repositories.take_waiting_jobs(
            db_session=s, before=now - timedelta(seconds=policy.resend_after_s), limit=policy.batch
        )
    report = ReconcileReport()
    for job_id in [*dead, *(j for j in waiting if j not in dead)]:
        if skip(job_id):
            continue
        try:
            queue.enqueue(job_id)
        except Exception:
            log.warning("could not re-send job %s; it stays queued", job_id, exc_info=True,
                        extra={"job_id": job_id})  # fmt: skip
            report.failed.append(job_id)
            continue
        (report.revived if job_id in dead else report.resent).append(job_id)
    if report.revived or report.resent:
        log.info("reconciler: %d running job(s) without heartbeat re-queued, %d waiting job(s) "
                 "re-sent", len(report.revived), len(report.resent))  # fmt: skip
    return report


class Reconciler:
    """Runs `reconcile_once` every `policy.interval_s` in a daemon thread; start() / stop()."""

    def __init__(
        self,
        session_factory: SessionFactory,
        queue: JobQueue,
        policy: ReconcilePolicy | None = None,
        *,
        skip: Callable[[str], bool] = lambda _job_id: False,
    ) -> None:
        self.session_factory = session_factory
        self.queue = queue
        self.policy = policy or ReconcilePolicy()
        self.skip = skip
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        assert self._thread is None, "start() once"
        self._thread = threading.Thread(target=self._loop, name="polar-reconciler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self.policy.interval_s):
            try:
                reconcile_once(self.session_factory, self.queue, self.policy, skip=self.skip)
            except Exception:  # the database may be away; the next pass tries again
                log.warning("reconciler pass failed", exc_info=True)
