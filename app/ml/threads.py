"""CPU threads per workload: torch's and FAISS's intra-op threads, set for one block of work.

Why per block rather than once per process: the workloads want different numbers. Training
steps are tiny tensors, so extra threads only wait on each other (on busy cores a 2-thread
trainer took 33x its idle time, a 1-thread one far less: bench/contention.py); one query is
one short text, better run one thread per request with requests side by side; image batches
are large and do scale with threads on idle cores.

Both torch (OpenMP build) and FAISS keep the thread count of a parallel region per calling
thread once that thread has run one: setting it here changes the calling thread's regions,
not those of a request thread or a job thread running beside it. `torch.get_num_threads()` is
called first because torch initialises a thread's count lazily from a process-wide value on
its first parallel call, which would otherwise undo the setting made here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import faiss
import torch


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def current_threads() -> tuple[int, int]:
    """(torch, faiss) intra-op threads of the calling thread."""
    return torch.get_num_threads(), int(faiss.omp_get_max_threads())


def _set(torch_threads: int, faiss_threads: int) -> None:
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)


@contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Run the block with `n` torch and FAISS threads in the calling thread, then restore the
    previous counts (also on error). n = 0 leaves the current counts alone."""
    if n < 0:
        raise ValueError("thread count must be >= 0")
    if n == 0:
        yield
        return
    before = current_threads()  # also pins this thread's counts (see the module docstring)
    _set(n, n)
    try:
        yield
    finally:
        _set(*before)
