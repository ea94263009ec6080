"""The Celery side of the `JobQueue` protocol (app/services/jobs.py): a job id becomes a task."""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from datetime import timedelta
from typing import Any

from celery import Celery

from app.config import Settings

log = logging.getLogger(__name__)

# The one task every job runs through (workers/tasks.py).
RUN_JOB_TASK = "polar.run_job"
# Bounds on every broker call, so a frozen Redis costs seconds, never a stuck thread.
BROKER_TIMEOUT_S = 5.0
# Job ids waiting to be published; beyond this, new ones are left to the reconciler.
PUBLISH_BACKLOG = 10_000
# After a failed publish, the broker is tried again this often (doubling up to the max), so
# jobs accepted while it was away are sent within about a second of its return.
REPUBLISH_FIRST_S = 0.25
REPUBLISH_MAX_S = 1.0


def runner_name(task_id: str) -> str:
    """The `runner` of a job run by the Celery task `task_id` (jobs.runner)."""
    return f"celery:{task_id}"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings shared by the API's client and the worker: broker = settings.broker_url."""
    return {
        "broker_url": settings.broker_url or None,
        "result_backend": settings.broker_url or None,
        # A task is acknowledged only once it has finished, so a worker whose host is lost
        # mid-task leaves it in Redis; run_job is idempotent, so a rerun is safe. A pool process
        # that dies under a living worker is reported (WorkerLostError) and its job re-queued
        # and sent again at once (workers/celery_app.py): the message is acknowledged, not put
        # back, as the job would still read 'running' when it came round.
        "task_acks_late": True,
        "task_reject_on_worker_lost": False,
        # Training and embedding are long and hold the model: take one task at a time.
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        # The database holds each job's state; results are only kept for `celery inspect`.
        "result_expires": timedelta(days=1),
        # With acks_late, Redis redelivers a task that has not been acknowledged within this
        # time, so it must exceed the longest job (embedding a large library).
        "broker_transport_options": {
            "visibility_timeout": int(timedelta(hours=6).total_seconds()),
            "socket_timeout": BROKER_TIMEOUT_S,
            "socket_connect_timeout": BROKER_TIMEOUT_S,
        },
        "broker_connection_timeout": BROKER_TIMEOUT_S,
        "redis_socket_timeout": BROKER_TIMEOUT_S,
        "redis_socket_connect_timeout": BROKER_TIMEOUT_S,
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
    """Publishes job ids to the broker by task name, so the API never imports the task module.

    `enqueue` never blocks the caller: ids go to one publishing thread. If the broker is down
    or frozen the publish fails after BROKER_TIMEOUT_S and the job stays `queued` in the
    database; the thread keeps the ids that failed and tries the broker again every second at
    most, so they are sent as soon as it answers. (Should this process die first, the
    reconciler, app/runtime/reconciler.py, finds them in the database and sends them.)
    """

    def __init__(self, celery: Celery, *, background: bool = True) -> None:
        self.celery = celery
        self.background = background
        self._ids: queue.Queue[str] = queue.Queue(PUBLISH_BACKLOG)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # Ids whose publish failed, oldest first (only the publishing thread touches it).
        self._unsent: OrderedDict[str, None] = OrderedDict()

    def enqueue(self, job_id: str) -> None:
        """Have the job published; raises only in the foreground mode (the reconciler's)."""
        if not self.background:
            self.publish(job_id)
            return
        try:
            self._ids.put_nowait(job_id)
        except queue.Full:
            log.warning("publish backlog full; job %s waits for the reconciler", job_id)
            return
        self._ensure_thread()

    def publish(self, job_id: str) -> None:
        """Send the task now, without Celery's own retries (bounded by the socket timeouts)."""
        self.celery.send_task(RUN_JOB_TASK, args=[job_id], retry=False)

    def join(self, timeout: float = 10.0) -> bool:
        """Wait until every enqueued id was tried once (tests)."""
        done = threading.Event()

        def wait() -> None:
            self._ids.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        return done.wait(timeout)

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._publish_forever, name="polar-publish", daemon=True
                )
                self._thread.start()

    @property
    def unsent(self) -> list[str]:
        """Ids whose publish failed and that wait for the broker, oldest first."""
        return list(self._unsent)

    def _publish_forever(self) -> None:
        wait = REPUBLISH_FIRST_S
        while True:
            try:
                # With nothing unsent, wait for work; else only until the next try.
                job_id = self._ids.get(timeout=wait if self._unsent else None)
            except queue.Empty:
                wait = REPUBLISH_FIRST_S if self._republish() else min(2 * wait, REPUBLISH_MAX_S)
                continue
            try:
                self.publish(job_id)
            except Exception:
                log.warning("publishing job %s failed; it stays queued and is sent again once "
                            "the broker answers", job_id, exc_info=True,
                            extra={"job_id": job_id})  # fmt: skip
                self._keep(job_id)
            else:
                if self._unsent:  # the broker answers again
                    self._republish()
                    wait = REPUBLISH_FIRST_S
            finally:
                self._ids.task_done()

    def _keep(self, job_id: str) -> None:
        if len(self._unsent) >= PUBLISH_BACKLOG:
            log.warning("too many unsent jobs; job %s waits for the reconciler", job_id)
            return
        self._unsent[job_id] = None

    def _republish(self) -> bool:
        """Send the unsent ids, oldest first, until one fails; whether all went."""
        sent = 0
        while self._unsent:
            job_id = next(iter(self._unsent))
            try:
                self.publish(job_id)
            except Exception:
                if sent:
                    log.info("broker back: %d waiting job(s) sent, more wait", sent)
                return False
            del self._unsent[job_id]
            sent += 1
        log.info("broker back: %d waiting job(s) sent", sent)
        return True
