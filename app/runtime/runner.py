"""The embedded job queue: a small thread pool in the API process, used when no broker is set.

It is a `JobQueue` (app/services/jobs.py) like the Celery queue in workers/queue.py, and runs the
same `run_job` with the same job states and progress. Jobs found 'queued' or 'running' at start
(the process died with them) are queued again. One process only: two API processes on one
database would each re-run the other's jobs at start. The reconciler and the library monitor
that feed it are the container's (app/runtime/container.py), started after it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from app import repositories
from app.db import session_scope
from app.runtime.priority import lower_this_thread
from app.services import job_runs
from app.services.job_runs import JobEnvironment, JobInterrupted

log = logging.getLogger(__name__)

# Waits before each retry after a transient error (the Celery task backs off similarly).
RETRY_DELAYS_S: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)


class JobRunner:
    """A bounded pool of threads that run jobs by id; start() it, stop() it."""

    def __init__(
        self,
        env: JobEnvironment,
        *,
        max_workers: int = 1,
        retry_delays: Sequence[float] = RETRY_DELAYS_S,
    ) -> None:
        # Jobs are CPU/GPU heavy and share one model: more threads than this only contend.
        assert 1 <= max_workers <= 2, "the embedded runner is for one small machine"
        self.env = env
        self.session_factory = env.session_factory
        self.max_workers = max_workers
        self.retry_delays = tuple(retry_delays)
        self._stopping = threading.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: set[str] = set()  # submitted here and not finished yet
        self._pending_lock = threading.Lock()

    @property
    def running(self) -> bool:
        """Started and not stopped."""
        return self._executor is not None and not self._stopping.is_set()

    def start(self) -> list[str]:
        """Start the threads and queue again the jobs a previous process left unfinished."""
        assert self._executor is None, "start() once"
        self._executor = ThreadPoolExecutor(
            self.max_workers,
            thread_name_prefix="polar-job",
            # Searches first: job threads run at a lower CPU priority (app/runtime/priority.py).
            initializer=lower_this_thread,
            initargs=(self.env.settings.jobs.nice,),
        )
        recovered = self.requeue_unfinished()
        for job_id in recovered:
            self.submit(job_id)
        if recovered:
            log.info("re-queued %d unfinished job(s) from a previous run", len(recovered))
        return recovered

    def requeue_unfinished(self) -> list[str]:
        """Set every 'running' job back to 'queued'; the ids of all queued jobs, oldest first."""
        with session_scope(self.session_factory) as s:
            repositories.requeue_running_jobs(db_session=s)
            return repositories.queued_job_ids(db_session=s)

    def enqueue(self, job_id: str) -> None:
        """Run the (committed) job when a thread is free (the JobQueue protocol)."""
        self.submit(job_id)

    def submit(self, job_id: str) -> Future[None]:
        """Queue a job id; it runs when a thread is free."""
        if self._executor is None or self._stopping.is_set():
            raise RuntimeError("the job runner is not running")
        with self._pending_lock:
            self._pending.add(job_id)
        return self._executor.submit(self._run, job_id)

    def is_pending(self, job_id: str) -> bool:
        """Submitted here and not finished (the reconciler leaves such jobs alone)."""
        with self._pending_lock:
            return job_id in self._pending

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop taking jobs, interrupt running ones at their next progress report, and wait.

        Jobs that did not finish stay (or go back to) 'queued' and run after the next start.
        """
        executor = self._executor
        if executor is None or self._stopping.is_set():
            return
        self._stopping.set()
        executor.shutdown(wait=False, cancel_futures=True)
        # Wait in a helper thread, so that the wait itself can time out.
        waiter = threading.Thread(target=executor.shutdown, name="polar-job-stop", daemon=True)
        waiter.start()
        waiter.join(timeout)
        if waiter.is_alive():
            log.warning("job threads still busy after %.0f s; leaving them to finish", timeout)

    def _run(self, job_id: str) -> None:
        """run_job with retries after transient errors; never raises (it runs in a pool)."""
        try:
            self._run_with_retries(job_id)
        finally:
            with self._pending_lock:
                self._pending.discard(job_id)

    def _run_with_retries(self, job_id: str) -> None:
        for attempt in range(len(self.retry_delays) + 1):
            if self._stopping.is_set():
                return  # still 'queued' in the database
            try:
                job_runs.run_job(
                    job_id,
                    self.env,
                    should_stop=self._stopping.is_set,
                    runner=job_runs.embedded_runner_name(),
                )
                return
            except JobInterrupted:
                log.info("job %s interrupted by shutdown; it will run after the next start", job_id)
                return
            except Exception as e:
                outage = job_runs.outage_of(e)
                if outage is None:
                    log.exception("job %s: the runner caught an unexpected error", job_id)
                    return
                if attempt == len(self.retry_delays):
                    self._give_up(job_id, e, outage)
                    return
                # wait() returns early on shutdown: the job stays queued for the next start.
                self._stopping.wait(self.retry_delays[attempt])

    def _give_up(self, job_id: str, error: BaseException, outage: job_runs.Outage) -> None:
        try:
            log.error("job %s: giving up after %d retries: %s", job_id, len(self.retry_delays),
                      error, extra={"job_id": job_id})  # fmt: skip
            job_runs.mark_failed(
                job_id, outage.code, outage.message, session_factory=self.session_factory
            )
        except Exception:
            log.exception("could not mark job %s failed", job_id)
