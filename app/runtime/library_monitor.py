"""Libraries stay current without anyone asking: folders are watched, and rescanned periodically.

Two ways, both in the process that runs jobs' housekeeping (the embedded runner in the API
process, or each Celery worker's main process, beside the reconciler):

- **Watching** (`POLAR_LIBRARY__WATCH`): the library folders are watched with `watchfiles`
  (inotify on Linux, via the Rust `notify` crate). A change marks its library dirty; once the
  folder has been quiet for `watch_settle_s` and no scan of it is queued or running, a scan is
  queued. Copying 500 photos in therefore costs one scan after the copy, not 500; and a change
  seen while a scan runs is not lost, it waits for that scan to end. Network shares (NFS, SMB)
  send no events: the periodic rescan covers them.
- **Periodic rescans** (`POLAR_LIBRARY__RESCAN_INTERVAL_S`): a library whose last scan ended that
  long ago is scanned again. A rescan only stats unchanged files (size + mtime), so it is cheap.

Several processes may run a monitor (several workers): `libraries.request_scan` locks the
library's row, so they queue one scan between them.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import watchfiles

from app import repositories
from app.config import LibrarySettings
from app.db import session_scope
from app.models import utcnow
from app.services import libraries
from app.services.folders import is_real_folder, open_folder_beneath, walk
from app.services.job_runs import SessionFactory
from app.services.jobs import JobQueue
from app.storage import os_error_reason, root_of

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 2.0  # how often dirty libraries and due rescans are looked at


@dataclass
class _Dirty:
    first: float  # monotonic time of the first change not yet scanned
    last: float  # ... and of the latest one


@dataclass
class MonitorState:
    """What the monitor knows between passes (the watched folders, the dirty libraries)."""

    folders: dict[str, tuple[str, str]] = field(default_factory=dict)  # path -> (user, library)
    dirty: dict[str, _Dirty] = field(default_factory=dict)  # library id -> change times
    # library id -> monotonic time a periodic scan was last asked for (a scan that fails, say of
    # an unmounted disk, sets no scanned_at: it is not asked for again before the interval)
    requested: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def library_of(self, path: str) -> tuple[str, str] | None:
        """(user_id, library_id) of the watched folder holding `path`, if any."""
        p = Path(path)
        for folder, owner in self.folders.items():
            if p == Path(folder) or p.is_relative_to(folder):
                return owner
        return None

    def mark(self, paths: Iterable[str], now: float) -> set[str]:
        """Mark the libraries holding these changed paths dirty; their ids."""
        hit: set[str] = set()
        with self.lock:
            for path in paths:
                owner = self.library_of(path)
                if owner is None:
                    continue
                library_id = owner[1]
                hit.add(library_id)
                d = self.dirty.get(library_id)
                if d is None:
                    self.dirty[library_id] = _Dirty(now, now)
                else:
                    d.last = now
        return hit


def due_for_rescan(scanned_at: datetime | None, interval_s: float, now: datetime) -> bool:
    """A library whose last scan ended `interval_s` ago or more (never scanned: not yet due;
    its first scan was queued when it was added)."""
    if interval_s <= 0 or scanned_at is None:
        return False
    if scanned_at.tzinfo is None:  # SQLite hands back naive UTC
        now = now.replace(tzinfo=None)
    return now - scanned_at >= timedelta(seconds=interval_s)


def monitor_pass(
    session_factory: SessionFactory,
    queue: JobQueue,
    cfg: LibrarySettings,
    state: MonitorState,
    *,
    now_mono: float | None = None,
) -> list[str]:
    """One look: refresh the watched folders, queue the scans that are due; the library ids
    a scan was queued for (newly, not ones already queued or running)."""
    mono = time.monotonic() if now_mono is None else now_mono
    now = utcnow()
    queued: list[str] = []
    with session_scope(session_factory) as s:
        rows = repositories.all_libraries(db_session=s)
    with state.lock:
        state.folders = {lib.path: (lib.user_id, lib.id) for lib in rows}
        known = {lib.id for lib in rows}
        for gone in set(state.dirty) - known:
            del state.dirty[gone]
        for gone in set(state.requested) - known:
            del state.requested[gone]
        settled = {
            library_id
            for library_id, d in state.dirty.items()
            if mono - d.last >= cfg.watch_settle_s
        }
    for lib in rows:
        reason = None
        if lib.id in settled:
            reason = "changes in the folder"
        elif due_for_rescan(lib.scanned_at, cfg.rescan_interval_s, now) and (
            mono - state.requested.get(lib.id, -math.inf) >= cfg.rescan_interval_s
        ):
            reason = "periodic rescan"
        if reason is None:
            continue
        with session_scope(session_factory) as s:
            busy = repositories.open_scan_job(db_session=s, library=lib)
        if busy is not None:
            continue  # changes stay marked until that scan has ended; then one more scan
        with session_scope(session_factory) as s:
            job, created = libraries.request_scan(lib.user_id, lib.id, db_session=s, queue=queue)
        with state.lock:
            state.requested[lib.id] = mono
            d = state.dirty.get(lib.id)
            if d is not None and d.last <= mono:
                del state.dirty[lib.id]
        if created:
            log.info("library %s: scan queued (%s)", lib.id, reason,
                     extra={"job_id": job.id, "user_id": lib.user_id})  # fmt: skip
            queued.append(lib.id)
    return queued


class LibraryMonitor:
    """Watches the library folders and queues their scans; start() / stop()."""

    def __init__(
        self,
        session_factory: SessionFactory,
        queue: JobQueue,
        cfg: LibrarySettings,
        *,
        check_interval_s: float = CHECK_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session_factory = session_factory
        self.queue = queue
        self.cfg = cfg
        self.check_interval_s = check_interval_s
        self.clock = clock
        self.state = MonitorState()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watch_restart = threading.Event()  # the folder set changed: watch the new set
        self._watched: frozenset[str] = frozenset()

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.roots) and (self.cfg.watch or self.cfg.rescan_interval_s > 0)

    def start(self) -> None:
        assert not self._threads, "start() once"
        if not self.enabled:
            return
        loops = [(self._loop, "polar-library-monitor")]
        if self.cfg.watch:
            loops.append((self._watch_loop, "polar-library-watch"))
        self._threads = [threading.Thread(target=f, name=n, daemon=True) for f, n in loops]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._watch_restart.set()
        for t in self._threads:
            t.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                monitor_pass(self.session_factory, self.queue, self.cfg, self.state,
                             now_mono=self.clock())  # fmt: skip
                folders = frozenset(self.state.folders)
                if folders != self._watched:
                    self._watched = folders
                    self._watch_restart.set()
            except Exception:  # the database may be away; the next pass tries again
                log.warning("library monitor pass failed", exc_info=True)
            self._stop.wait(self.check_interval_s)

    def _watch_loop(self) -> None:
        """Watch the current folder set until it changes (or stop), then watch the new one."""
        watching: set[str] = set()
        roots = [Path(r).resolve() for r in self.cfg.roots]
        while not self._stop.is_set():
            self._watch_restart.wait()
            if self._stop.is_set():
                return
            self._watch_restart.clear()
            with self.state.lock:
                libraries_now = dict(self.state.folders)
            folders, problems = watch_plan(libraries_now, roots)
            self._note(libraries_now, problems)
            if not folders:
                continue
            tops = set(libraries_now) & set(folders)
            # What changed before a folder was watched (since the process started, or the
            # library's first scan) is found by one scan each of the newly watched folders.
            self.state.mark(tops - watching, self.clock())
            watching = tops
            try:
                # Each real folder on its own, not recursively: the watcher would follow
                # symlinked folders (a link to / would watch the whole disk); these are exactly
                # the folders a scan reads. A new folder restarts the watch to take it in.
                for changes in watchfiles.watch(
                    *folders,
                    stop_event=_Either(self._stop, self._watch_restart),
                    debounce=500,
                    recursive=False,
                    raise_interrupt=False,
                    ignore_permission_denied=True,
                ):
                    self.state.mark((path for _change, path in changes), self.clock())
                    if any(
                        change == watchfiles.Change.added and is_real_folder(path)
                        for change, path in changes
                    ):
                        self._watch_restart.set()
            except Exception as e:  # too many folders for inotify, a folder vanished, ...
                log.warning("watching the library folders failed; periodic rescans (every "
                            "%.0f s) still find changes", self.cfg.rescan_interval_s,
                            exc_info=True)  # fmt: skip
                failed = f"watching failed ({type(e).__name__}: {e}); tried again in a minute"
                everyone = {lib for _user, lib in libraries_now.values()}
                self._note(libraries_now, {lib: problems.get(lib, failed) for lib in everyone})
                self._stop.wait(60.0)
                self._watch_restart.set()

    def _note(self, libraries_now: Mapping[str, tuple[str, str]], problems: dict[str, str]) -> None:
        """Say in each library's row why it is not watched now (None: it is)."""
        notes = {lib: problems.get(lib) for _user, lib in libraries_now.values()}
        try:
            with session_scope(self.session_factory) as s:
                repositories.set_watch_errors(db_session=s, errors=notes)
        except Exception:  # the database may be away: the next restart of the watch says it
            log.warning("could not record why libraries are not watched", exc_info=True)


def watch_plan(
    libraries_now: Mapping[str, tuple[str, str]], roots: Sequence[Path]
) -> tuple[list[str], dict[str, str]]:
    """(every folder to watch, library id -> why it is not watched): each library's folder and
    the real folders under it, walked as a scan walks them (app.services.folders.walk: opened
    from the allowed root down, no link followed, no recursion limit). A library whose folder is
    a link now, is gone or cannot be walked is left out, with the reason; the others are
    watched whatever happens to it."""
    out: list[str] = []
    problems: dict[str, str] = {}
    for path, (_user, library_id) in sorted(libraries_now.items()):
        try:
            out.extend(real_folders([path], roots))
        except ValueError:
            problems[library_id] = "its folder is no longer under an allowed root"
        except OSError as e:
            problems[library_id] = f"its folder {_why(e)}; periodic rescans still run"
        except Exception as e:  # whatever goes wrong in one library stays its own
            log.warning("library %s: cannot list its folders to watch", library_id, exc_info=True)
            problems[library_id] = f"its folders could not be listed ({type(e).__name__}: {e})"
    return out, problems


def _why(e: OSError) -> str:
    if e.errno in (errno.ELOOP, errno.ENOTDIR):
        return "is a link now (never followed) or not a folder"
    if e.errno == errno.ENOENT:
        return "is missing (a share not mounted?)"
    return f"cannot be opened ({os_error_reason(e)})"


def real_folders(tops: Iterable[str], roots: Sequence[Path]) -> list[str]:
    """Every folder under the given ones (each under one of the resolved `roots`), themselves
    included, entering no symlinked folder, not even one swapped in during the walk (the same
    folders a scan walks). ValueError if a top is outside the roots; OSError if a top cannot be
    opened as a folder without following a link."""
    out: list[str] = []
    for top in tops:
        folder = Path(top)
        root = root_of(folder, roots)
        os.close(open_folder_beneath(folder, root))  # the top: an error is the caller's
        for here in walk(folder, root, unreadable=_ignored, refused=_ignored):
            out.append(str(here.path))
    return out


def _ignored(_path: Path, _why: object) -> None:
    """A folder the watcher cannot enter is not watched; its library's scan says why."""


class _Either:
    """An event that counts as set when either of two events is (watchfiles' stop_event)."""

    def __init__(self, a: threading.Event, b: threading.Event) -> None:
        self.a, self.b = a, b

    def is_set(self) -> bool:
        return self.a.is_set() or self.b.is_set()
