"""Background jobs yield the CPU to requests: their threads run at a lower priority (nice).

On a small machine the API's searches and the training/embedding jobs compete for the same
cores. Jobs are throughput work and searches are latency work, so jobs run niced
(`POLAR_JOBS__NICE`, default 10): when both want a core, the scheduler runs the search first;
when the machine is otherwise idle, the job still gets every cycle. The embedded runner lowers
its own job threads (Linux schedules threads separately, so the request threads keep their
priority); a Celery worker lowers its task processes. A nice value can only be raised without
privileges, so it is done once per thread or process, where only jobs run.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger(__name__)


def lower_this_thread(increment: int) -> int | None:
    """Raise the calling thread's nice value by `increment` (at most to 19); its new nice value,
    or None where that is not possible (not Linux, increment 0, refused)."""
    if increment <= 0 or sys.platform != "linux":
        return None
    tid = threading.get_native_id()  # on Linux, PRIO_PROCESS with a thread id is that thread
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + increment))
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:
        log.warning("could not lower the priority of a job thread", exc_info=True)
        return None


def lower_this_process(increment: int) -> int | None:
    """Raise the whole process's nice value by `increment` (a Celery task process); its new nice
    value, or None where that is not possible."""
    if increment <= 0 or not hasattr(os, "nice"):
        return None
    try:
        current = os.nice(0)
        return os.nice(max(0, min(19, current + increment) - current))
    except OSError:
        log.warning("could not lower the priority of the worker process", exc_info=True)
        return None
