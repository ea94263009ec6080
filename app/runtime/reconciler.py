"""The database is the queue of record: jobs that a queue lost are handed to it again.

A job committed as `queued` may never reach a worker (the broker was down when the request
handed it over, the API process died in between), and a `running` job's worker may die with it
(host lost: its message sits unacknowledged in Redis for hours). The reconciler finds both in the
`jobs` table and enqueues them again:
- `running` with no heartbeat for `dead_after_s` (run_job touches the row every 15 s) -> back
  to `queued` and re-sent;
- `queued` and untouched for `resend_after_s` -> re-sent (and touched, so at most once per
  period);
- a re-send the queue refused (the broker away) -> tried again at every pass until it goes;
- images never embedded (no embedding, no read failure) of a user with no embedding job
  queued or running, and none touched within `resend_after_s` -> a new `embed_images` job, so
  accepted photos never stay unsearchable after a job failed or was lost.
Re-sending is safe: `run_job` claims a job atomically (`mark_running`), so a duplicate delivery of
a job that is running or done does nothing, and handlers are idempotent.

The embedded runner runs one in the API process; the Celery worker runs one in its main process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from app import repositories
from app.config import JobSettings
from app.db import session_scope, transaction_lock
from app.models import JobKind, utcnow
from app.services.job_runs import SessionFactory
from app.services.jobs import JobQueue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconcilePolicy:
    """When a job counts as lost (seconds)."""

    dead_after_s: float = 120.0  # a running job without a heartbeat this long lost its worker
    resend_after_s: float = 300.0  # a queued job waiting this long is sent again
    interval_s: float = 30.0  # how often to look
    batch: int = 500  # most jobs re-sent per pass
    images_per_job: int = 5_000  # most pending images one embedding job gets

    @classmethod
    def of(cls, cfg: JobSettings) -> ReconcilePolicy:
        return cls(cfg.dead_after_s, cfg.resend_after_s, cfg.reconcile_interval_s)


@dataclass
class ReconcileReport:
    """What one pass did."""

    revived: list[str] = field(default_factory=list)  # running without heartbeat -> re-queued
    resent: list[str] = field(default_factory=list)  # queued too long -> sent again
    failed: list[str] = field(default_factory=list)  # the queue refused them (stay queued)
    embedding: list[str] = field(default_factory=list)  # new jobs for unclaimed pending images


# Serialises the check for unclaimed pending images with the jobs it creates, across every
# process reconciling one database (two passes at once would each create one).
_PENDING_IMAGES_LOCK = 0x504F4C4150  # "POLAP"


def reconcile_once(
    session_factory: SessionFactory,
    queue: JobQueue,
    policy: ReconcilePolicy,
    *,
    skip: Callable[[str], bool] = lambda _job_id: False,
    unsent: Sequence[str] = (),
) -> ReconcileReport:
    """One pass: revive dead running jobs, re-send long-waiting queued ones and those of
    `unsent` (a previous pass's refused re-sends) still queued, and give unclaimed pending
    images a job.

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
        still = set(repositories.queued_among(db_session=s, job_ids=unsent)) if unsent else set()
    embedding = _embed_unclaimed_images(session_factory, policy, now)
    report = ReconcileReport(embedding=embedding)
    retry = [j for j in unsent if j in still]
    for job_id in dict.fromkeys([*dead, *waiting, *retry, *embedding]):
        if skip(job_id):
            continue
        try:
            queue.enqueue(job_id)
        except Exception:
            log.warning("could not re-send job %s; it stays queued", job_id, exc_info=True,
                        extra={"job_id": job_id})  # fmt: skip
            report.failed.append(job_id)
            continue
        if job_id in dead:
            report.revived.append(job_id)
        elif job_id not in embedding:
            report.resent.append(job_id)
    if report.revived or report.resent:
        log.info("reconciler: %d running job(s) without heartbeat re-queued, %d waiting job(s) "
                 "re-sent", len(report.revived), len(report.resent))  # fmt: skip
    if embedding:
        log.warning("reconciler: %d embedding job(s) created for photos that no job was "
                    "embedding", len(embedding))  # fmt: skip
    return report


def _embed_unclaimed_images(
    session_factory: SessionFactory, policy: ReconcilePolicy, now: datetime
) -> list[str]:
    """A new embed_images job (committed) for each user whose pending images no job claims."""
    created: list[str] = []
    with session_scope(session_factory) as s:
        transaction_lock(s, _PENDING_IMAGES_LOCK)
        users = repositories.users_with_unclaimed_pending_images(
            db_session=s,
            quiet_since=now - timedelta(seconds=policy.resend_after_s),
            limit=policy.batch,
        )
        for user_id in users:
            ids = repositories.pending_image_ids(
                db_session=s, user_id=user_id, limit=policy.images_per_job
            )
            job = repositories.add_job(
                db_session=s,
                user_id=user_id,
                kind=JobKind.EMBED_IMAGES.value,
                payload={"image_ids": ids},
            )
            created.append(job.id)
    return created


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
        self._unsent: list[str] = []  # re-sends the queue refused, tried again next pass

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
                report = reconcile_once(
                    self.session_factory,
                    self.queue,
                    self.policy,
                    skip=self.skip,
                    unsent=self._unsent,
                )
                self._unsent = report.failed[: self.policy.batch]
            except Exception:  # the database may be away; the next pass tries again
                log.warning("reconciler pass failed", exc_info=True)
