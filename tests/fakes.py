"""Test doubles for the service's ports: a job queue that only records what it was given."""

from __future__ import annotations

from typing import Any

from app.api.deps import get_queue


class RecordingQueue:
    """A JobQueue that runs nothing: job ids are kept in order; `fail` makes enqueue raise."""

    def __init__(self, *, fail: bool = False) -> None:
        self.job_ids: list[str] = []
        self.fail = fail

    def enqueue(self, job_id: str) -> None:
        if self.fail:
            raise ConnectionError("the broker is down (RecordingQueue)")
        self.job_ids.append(job_id)


def use_queue(client: Any, queue: RecordingQueue) -> RecordingQueue:
    """Make a test client's app hand new jobs to `queue` instead of running them."""
    client.app.dependency_overrides[get_queue] = lambda: queue
    return queue
