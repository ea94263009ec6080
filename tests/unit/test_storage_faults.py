"""A full or read-only disk becomes a domain error that says so, and leaves nothing behind."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import Any

import pytest

from app import storage
from app.errors import StorageFull, StorageUnavailable
from app.storage import ImageStore
from tests.db_fixtures import image_bytes

LIMITS: dict[str, Any] = {"max_bytes": 1 << 20, "max_pixels": 10_000_000}


def oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


@pytest.mark.parametrize(("code", "error"), [(errno.ENOSPC, StorageFull),
                                             (errno.EDQUOT, StorageFull),
                                             (errno.EROFS, StorageUnavailable),
                                             (errno.EACCES, StorageUnavailable)])  # fmt: skip
def test_staging_on_a_full_or_read_only_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, error: type[Exception]
) -> None:
    store = ImageStore(tmp_path)

    def no_room(*_: Any) -> None:
        raise oserror(code)

    monkeypatch.setattr(storage, "_copy_limited", no_room)
    with pytest.raises(error) as raised:
        store.stage(io.BytesIO(image_bytes("PNG", (8, 8), (1, 2, 3))), "a.png", **LIMITS)
    assert raised.value.code == error.code and "nothing was stored" in raised.value.message
    assert files_under(tmp_path) == []  # the temp file is gone


def test_committing_to_a_read_only_folder_keeps_the_staged_file_for_discard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ImageStore(tmp_path)
    staged = store.stage(io.BytesIO(image_bytes("PNG", (8, 8), (1, 2, 3))), "a.png", **LIMITS)

    def read_only(*_: Any) -> None:
        raise oserror(errno.EROFS)

    monkeypatch.setattr(storage.os, "replace", read_only)
    with pytest.raises(StorageUnavailable):
        store.commit(staged)
    monkeypatch.undo()
    store.discard(staged)
    assert files_under(tmp_path) == []


def test_other_io_errors_are_not_disguised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: Any) -> None:
        raise oserror(errno.EIO)

    monkeypatch.setattr(storage, "_copy_limited", broken)
    with pytest.raises(OSError) as raised:
        ImageStore(tmp_path).stage(io.BytesIO(b"x"), "a.png", **LIMITS)
    assert not isinstance(raised.value, StorageUnavailable) and raised.value.errno == errno.EIO


def test_a_disk_that_fills_up_between_original_and_thumbnail_leaves_no_original(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 28: the original fitted, its thumbnail did not; the upload fails, and no file is
    left that no row will ever reference."""
    store = ImageStore(tmp_path)
    staged = store.stage(io.BytesIO(image_bytes("PNG", (8, 8), (1, 2, 3))), "a.png", **LIMITS)

    def full(*_: Any) -> None:
        raise oserror(errno.ENOSPC)

    monkeypatch.setattr(storage, "_atomic_write", full)
    with pytest.raises(StorageFull):
        store.commit(staged)
    monkeypatch.undo()
    store.discard(staged)
    assert files_under(tmp_path) == []


def test_a_duplicate_that_fills_the_disk_keeps_the_original_it_did_not_create(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ImageStore(tmp_path)
    data = image_bytes("PNG", (8, 8), (1, 2, 3))
    first, _ = store.commit(store.stage(io.BytesIO(data), "a.png", **LIMITS))
    store.path(store.thumbnail_relpath(first)).unlink()  # a damaged store: thumbnail lost
    again = store.stage(io.BytesIO(data), "a.png", **LIMITS)

    def full(*_: Any) -> None:
        raise oserror(errno.ENOSPC)

    monkeypatch.setattr(storage, "_atomic_write", full)
    with pytest.raises(StorageFull):
        store.commit(again)
    assert store.path(first).is_file()  # another row's file stays
