"""Reading stored and library files again after they were validated (embedding, a concept's
training photos): a file swapped for a FIFO, a bomb or hostile bytes is skipped (embedding) or
fails the job naming it (training), at once; never a hang, never the whole batch."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from app.errors import InvalidImage, NotFound
from app.services.embedding import _open_rgb
from app.services.training import _load_photo
from app.storage import ImageStore
from tests.db_fixtures import image_bytes, png_claiming
from tests.unit.test_untrusted_images import (
    refuses_a_fifo_at_once,
    tiff_with_strip_offsets_of_type,
    unblock_fifo,
    within,
)

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "data")


# -- embedding: one unreadable file is skipped (logged), never the batch, never a hang --------


def test_embedding_skips_a_file_swapped_for_a_fifo_at_once(store, caplog):
    store.root.mkdir(parents=True)
    fifo = store.root / "swapped.jpg"
    os.mkfifo(fifo)
    try:
        with caplog.at_level(logging.WARNING, logger="app.services.embedding"):
            assert within(1.0, lambda: _open_rgb(store, "swapped.jpg")) is None
    finally:
        unblock_fifo(fifo)
    assert "swapped.jpg" in caplog.text and "not a regular file" in caplog.text


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (png_claiming(30_000, 30_000), "30000×30000"),  # Pillow's DecompressionBombError
        (image_bytes("PNG", (200, 100)), "more than the limit of 10000"),  # our max_pixels
        (image_bytes("ICO", (16, 16)), "not accepted"),  # outside the upload allow-list
        (tiff_with_strip_offsets_of_type(11), "cannot be decoded"),  # TypeError in Pillow
        (b"", "not an image"),
    ],
    ids=["bomb", "over-max-pixels", "ico", "float-strip-offsets", "empty"],
)
def test_embedding_checks_a_file_as_an_upload_and_skips_a_bad_one(store, caplog, data, reason):
    store.root.mkdir(parents=True)
    (store.root / "bad").write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="app.services.embedding"):
        assert _open_rgb(store, "bad", max_pixels=10_000) is None
    assert reason in caplog.text
    (store.root / "good.jpg").write_bytes(image_bytes("JPEG", (64, 48)))
    good = _open_rgb(store, "good.jpg", max_pixels=10_000)
    assert good is not None and good.size == (64, 48)


# -- training: a concept photo that no longer decodes fails the job, naming the photo ----------


def _stored(store: ImageStore, data: bytes, sha: str = "ab" * 32) -> str:
    rel = store.original_relpath(sha, "jpg")
    store.path(rel).parent.mkdir(parents=True, exist_ok=True)
    store.path(rel).write_bytes(data)
    return rel


def test_a_concept_photo_that_no_longer_decodes_is_a_clear_failure_naming_it(store):
    rel = _stored(store, tiff_with_strip_offsets_of_type(11))
    with pytest.raises(InvalidImage) as caught:
        _load_photo(store, rel)
    assert "abababababab" in caught.value.message and "cannot be decoded" in caught.value.message
    assert caught.value.detail == {"sha256": "ab" * 32}


def test_a_concept_photo_swapped_for_a_fifo_fails_at_once(store):
    rel = _stored(store, b"")
    path = store.path(rel)
    path.unlink()
    refuses_a_fifo_at_once(path, lambda: _load_photo(store, rel))


def test_a_missing_concept_photo_is_still_file_missing(store):
    with pytest.raises(NotFound) as caught:
        _load_photo(store, store.original_relpath("cd" * 32, "jpg"))
    assert caught.value.code == "file_missing"


def test_a_readable_concept_photo_loads_upright(store):
    photo = _load_photo(store, _stored(store, image_bytes("JPEG", (40, 30))))
    assert photo.mode == "RGB" and photo.size == (40, 30)
