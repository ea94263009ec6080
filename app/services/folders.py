"""Folders by identity, walked without following any link.

A folder's name is not who it is: on a case-insensitive file system (SMB/CIFS shares, exFAT,
APFS, ext4 casefold) `Alice` and `ALICE` are one folder, and a bind mount shows a folder under a
second path. So folders are compared by identity (`folder_key`: device and inode), and a folder
is opened one component at a time from an allowed root with O_NOFOLLOW | O_DIRECTORY, never by
name in one go, so a folder swapped for a link at any moment is refused, never followed.

Why not os.walk: it follows a top folder that is a link, lists a folder by name (a swap between
listing and entering is followed), and in Python 3.11 recurses (a tree 1000 levels deep raises
RecursionError). This walk is iterative, opens each folder from the root down (a cost of one
openat per level, negligible at the depths photo folders have), and reads the identity of the
folder it opened from its descriptor.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

_DIR_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_DIRECTORY", 0)
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
)


def folder_key(st: os.stat_result) -> str:
    """A folder's identity as text: "device:inode" (the same folder under any name)."""
    return f"{st.st_dev}:{st.st_ino}"


def ancestry_keys(path: Path) -> list[str]:
    """The identities of `path` (resolved, absolute) and of each folder above it, up to `/`;
    OSError if one cannot be looked at."""
    keys = [folder_key(os.stat(path))]
    keys += [folder_key(os.stat(parent)) for parent in path.parents]
    return keys


def open_folder_beneath(path: Path, root: Path) -> int:
    """A descriptor of the folder `path` (absolute, `root` itself or under it), opened from
    `root` one folder at a time relative to the one before, none of them followed if it is a
    link (ELOOP or ENOTDIR: refused). The caller closes it. ValueError if `path` is not under
    `root`."""
    parts = path.relative_to(root).parts
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{str(path)!r} does not name a folder under {str(root)!r}")
    fd = os.open(root, _DIR_FLAGS & ~getattr(os, "O_NOFOLLOW", 0))  # the root: trusted as set
    try:
        for name in parts:
            inner = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def link_error(e: OSError, path: Path) -> OSError:
    """`e` (from opening `path` with no link followed) worded as what it most likely means."""
    if e.errno in (errno.ELOOP, errno.ENOTDIR):
        return OSError(e.errno, "a link or not a folder now; not followed", str(path))
    return e


@dataclass
class Folder:
    """One folder of a walk: open (`fd`) while the walk is at it, its entries sorted by name."""

    path: Path
    fd: int
    key: str
    depth: int
    entries: list[os.DirEntry[str]]
    # The names of the entries to descend into, set by the caller while it holds the folder;
    # None: every entry that is a folder and not a link.
    descend: list[str] | None = None


def walk(
    top: Path,
    root: Path,
    *,
    unreadable: Callable[[Path, OSError], None],
    refused: Callable[[Path, str], None],
    refuse: Mapping[str, str] | None = None,
) -> Iterator[Folder]:
    """Every folder from `top` down (`top` first, then depth first in name order), each opened
    from `root` with no link followed (`open_folder_beneath`): a folder that is a link, or was
    swapped for one since its parent was listed, is never entered (`unreadable` with ELOOP or
    ENOTDIR, named by its own path). A folder whose identity is in `refuse` (key -> reason) is
    not entered either (`refused`). Whatever the file system refuses for one folder skips that
    folder's subtree (`unreadable`), never the walk; `top` itself too (a caller that must
    fail when its top cannot be walked checks it first: `open_folder_beneath`).

    A symlinked folder among the entries is left to the caller (as every entry is: a walk
    descends only into entries that are folders and not links)."""
    refuse = refuse or {}
    stack: list[tuple[Path, int]] = [(top, 0)]
    while stack:
        path, depth = stack.pop()
        try:
            fd = open_folder_beneath(path, root)
        except OSError as e:
            unreadable(path, link_error(e, path))
            continue
        try:
            st = os.fstat(fd)
            key = folder_key(st)
            if key in refuse:
                refused(path, refuse[key])
                continue
            try:
                with os.scandir(fd) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as e:
                unreadable(path, e)
                continue
            folder = Folder(path, fd, key, depth, entries)
            yield folder
            names = folder.descend
            if names is None:
                names = [e.name for e in entries if is_folder_entry(e)]
            stack.extend((path / name, depth + 1) for name in reversed(names))
        finally:
            os.close(fd)


def is_folder_entry(entry: os.DirEntry[str]) -> bool:
    """Whether a walked entry is a folder (not a link to one); False if it cannot be told."""
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def is_real_folder(path: str | Path) -> bool:
    """Whether `path` is a folder and not a link (lstat)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False
