"""The API's publisher (workers/queue.py CeleryQueue): ids it could not publish are sent as soon
as the broker answers again, oldest first, without anyone enqueueing them again (issue 28)."""

from __future__ import annotations

import threading
import time
from typing import Any

from celery import Celery

from workers.queue import CeleryQueue


class Broker:
    """Celery's send_task, with a switch: down raises as a refused connection does."""

    def __init__(self) -> None:
        self.up = False
        self.sent: list[str] = []
        self.lock = threading.Lock()

    def send_task(self, _name: str, args: list[Any], retry: bool) -> None:
        assert retry is False
        with self.lock:
            if not self.up:
                raise ConnectionRefusedError("redis is down")
            self.sent.append(args[0])


def wait_for(check: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_unsent_jobs_go_out_once_the_broker_answers() -> None:
    broker = Broker()
    celery = Celery("polar-test")
    celery.send_task = broker.send_task  # type: ignore[method-assign]
    queue = CeleryQueue(celery)
    for job_id in ("a", "b", "c"):
        queue.enqueue(job_id)
    assert queue.join(10)
    assert broker.sent == [] and queue.unsent == ["a", "b", "c"]
    time.sleep(0.5)  # tried again meanwhile, still down
    assert queue.unsent == ["a", "b", "c"]

    broker.up = True  # nothing enqueued since
    wait_for(lambda: broker.sent == ["a", "b", "c"], timeout=5)
    assert queue.unsent == []
    queue.enqueue("d")
    assert queue.join(10) and broker.sent == ["a", "b", "c", "d"]
