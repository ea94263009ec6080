"""Foreground: jobs pause while searches run, never longer than max_wait_s, not at all when idle."""

from __future__ import annotations

import threading
import time

from app.services.foreground import Foreground


def test_idle_means_no_wait():
    assert Foreground(max_wait_s=1.0).wait_idle() == 0.0


def test_waits_until_the_search_ends():
    fg = Foreground(max_wait_s=5.0)
    entered, release = threading.Event(), threading.Event()

    def search() -> None:
        with fg.active():
            entered.set()
            release.wait(5)

    t = threading.Thread(target=search)
    t.start()
    assert entered.wait(5)
    assert fg.active_count == 1
    threading.Timer(0.1, release.set).start()
    waited = fg.wait_idle()
    t.join(5)
    assert 0.05 < waited < 4.0
    assert fg.active_count == 0


def test_wait_is_bounded_and_counts_nest():
    fg = Foreground(max_wait_s=0.05)
    with fg.active(), fg.active():
        assert fg.active_count == 2
        started = time.monotonic()
        fg.wait_idle()
        assert time.monotonic() - started < 1.0
    assert fg.active_count == 0


def test_zero_max_wait_never_waits():
    fg = Foreground(max_wait_s=0)
    with fg.active():
        assert fg.wait_idle() == 0.0


def test_count_drops_after_an_error():
    fg = Foreground()
    try:
        with fg.active():
            raise RuntimeError
    except RuntimeError:
        pass
    assert fg.active_count == 0
