"""Interactive work first: background jobs in a process step aside while its searches run.

In embedded mode the training and embedding jobs share a process, and its cores, with the
API's searches. A training job is thousands of tiny steps that hold the GIL and a core; a
search that arrives meanwhile waited for both (one client's search p50 doubled while a concept
trained, bench/contention.py). Searches mark themselves `active()`; a job calls `wait_idle()`
at each progress report and pauses, for a bounded time, while any search is in flight. Other
processes are not affected: the job still gets its fair share of the machine.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Foreground:
    """Counts interactive work in flight in this process; background work waits on it."""

    def __init__(self, max_wait_s: float = 0.05) -> None:
        self.max_wait_s = max_wait_s  # longest one pause of a job: it always makes progress
        self._active = 0
        self._cond = threading.Condition()

    @property
    def active_count(self) -> int:
        return self._active

    @contextmanager
    def active(self) -> Iterator[None]:
        """Mark a block as interactive work (a search) for its duration."""
        with self._cond:
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if self._active == 0:
                    self._cond.notify_all()

    def wait_idle(self) -> float:
        """Block while interactive work runs, at most `max_wait_s`; the seconds waited."""
        if self._active == 0 or self.max_wait_s <= 0:  # racy read: fine, it is only a hint
            return 0.0
        started = time.monotonic()
        with self._cond:
            self._cond.wait_for(lambda: self._active == 0, self.max_wait_s)
        return time.monotonic() - started
