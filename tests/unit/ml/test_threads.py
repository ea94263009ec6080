"""cpu_threads: the block runs with the asked thread counts; the previous ones come back."""

from __future__ import annotations

import threading

import faiss
import pytest
import torch

from app.ml.threads import cpu_count, cpu_threads, current_threads


@pytest.fixture
def two_threads():
    """Start every test from known counts (2, 2) and leave the process as it was."""
    before = current_threads()
    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    yield
    torch.set_num_threads(before[0])
    faiss.omp_set_num_threads(before[1])


@pytest.mark.usefixtures("two_threads")
def test_sets_both_libraries_and_restores():
    with cpu_threads(1):
        assert current_threads() == (1, 1)
        with cpu_threads(3):
            assert current_threads() == (3, 3)
        assert current_threads() == (1, 1)
    assert current_threads() == (2, 2)


@pytest.mark.usefixtures("two_threads")
def test_restores_after_an_error():
    with pytest.raises(RuntimeError), cpu_threads(1):
        raise RuntimeError("boom")
    assert current_threads() == (2, 2)


@pytest.mark.usefixtures("two_threads")
def test_zero_leaves_the_counts_alone_and_negative_is_refused():
    with cpu_threads(0):
        assert current_threads() == (2, 2)
    with pytest.raises(ValueError), cpu_threads(-1):
        pass


@pytest.mark.usefixtures("two_threads")
def test_another_thread_keeps_its_own_count():
    """A job thread at 1 thread does not change what a request thread beside it runs with."""
    inside, seen = threading.Event(), {}

    def job() -> None:
        with cpu_threads(1):
            seen["job"] = current_threads()
            inside.set()
            done.wait(5)

    done = threading.Event()
    t = threading.Thread(target=job)
    torch.get_num_threads()  # this thread has run torch before (as a request thread has)
    t.start()
    assert inside.wait(5)
    seen["main"] = current_threads()
    done.set()
    t.join(5)
    assert seen == {"job": (1, 1), "main": (2, 2)}


def test_cpu_count_is_positive():
    assert cpu_count() >= 1
