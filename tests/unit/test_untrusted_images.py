"""Hostile image files: every decoder failure is the file's own clear error, never a crash or a
hang (uploads, and library files validated in place)."""

from __future__ import annotations

import errno
import io
import os
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, PngImagePlugin

from app.errors import ImageTooLarge, InvalidImage, UnsupportedMedia
from app.storage import ImageStore, inspect_file, untrusted_image
from tests.db_fixtures import image_bytes, noisy_jpeg, png_claiming

MB = 1024 * 1024
pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "data")


def stage(store: ImageStore, data: bytes, max_pixels: int = 10_000_000):
    return store.stage(io.BytesIO(data), "x.tif", max_bytes=10 * MB, max_pixels=max_pixels)


def tiff_with_strip_offsets_of_type(tiff_type: int) -> bytes:
    """A TIFF whose StripOffsets entry (tag 273) has another TIFF type than LONG: Pillow's
    decoder raises TypeError on it (FLOAT, ASCII, RATIONAL, UNDEFINED bytes...)."""
    buf = io.BytesIO()
    Image.new("RGB", (50, 40), (200, 10, 10)).save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    assert data[:2] == b"II"
    ifd = struct.unpack("<I", data[4:8])[0]
    for k in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
        entry = ifd + 2 + 12 * k
        if struct.unpack("<H", data[entry : entry + 2])[0] == 273:
            data[entry + 2 : entry + 4] = struct.pack("<H", tiff_type)
            return bytes(data)
    raise AssertionError("no StripOffsets entry")


def within(seconds: float, fn: Callable[[], Any]) -> Any:
    """fn() on a thread; fails (instead of hanging the suite) if it takes longer."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # handed to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still blocked after {seconds} s"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def unblock_fifo(path: Path) -> None:
    """Open the FIFO for writing without blocking, so a reader stuck on it (a regression) ends."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    except OSError:
        pass


def refuses_a_fifo_at_once(path: Path, read: Callable[[], Any]) -> None:
    """`path` made a FIFO (nothing writes to it): `read()` must refuse it as not a regular file
    within a second, not wait for a writer."""
    os.mkfifo(path)
    try:
        with pytest.raises(InvalidImage, match="not a regular file"):
            within(1.0, read)
    finally:
        unblock_fifo(path)


# -- any exception of a decoder is the file's InvalidImage -------------------------------------


@pytest.mark.parametrize(
    "tiff_type",
    [11, 12, 2, 5, 10, 7],
    ids=["FLOAT", "DOUBLE", "ASCII", "RATIONAL", "SRATIONAL", "UNDEFINED"],
)
def test_a_tiff_whose_strip_offsets_are_not_integers_is_an_invalid_image(store, tiff_type):
    with pytest.raises(InvalidImage, match="cannot be decoded"):
        stage(store, tiff_with_strip_offsets_of_type(tiff_type))
    assert list(store.tmp_dir.iterdir()) == []  # nothing kept


@pytest.mark.parametrize(
    "error", [RuntimeError("Security limit exceeded"), TypeError(), KeyError(3)]
)
def test_whatever_a_decoder_raises_becomes_invalid_image(store, monkeypatch, error):
    def load(_self: Any) -> Any:
        raise error

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", load)
    with pytest.raises(InvalidImage, match="cannot be decoded") as caught:
        stage(store, image_bytes("PNG", (8, 8)))
    assert caught.value.__cause__ is error
    assert str(error) in caught.value.message or type(error).__name__ in caught.value.message


def test_out_of_memory_while_decoding_is_a_clear_refusal(store, monkeypatch):
    def load(_self: Any) -> Any:
        raise MemoryError

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", load)
    with pytest.raises(ImageTooLarge, match="memory"):
        stage(store, image_bytes("PNG", (8, 8)))


class FailingRead(io.BytesIO):
    """A file whose reads fail with EIO past `good` bytes, as a network share's can."""

    def __init__(self, data: bytes, good: int) -> None:
        super().__init__(data)
        self.good = good

    def read(self, size: int | None = -1) -> bytes:
        if self.tell() + (size if size is not None and size >= 0 else 1) > self.good:
            raise OSError(errno.EIO, "Input/output error")
        return super().read(size)


def test_a_read_error_stays_an_os_error_and_a_decoding_error_does_not():
    """EIO says nothing of the file's bytes (the caller may try again); Pillow's own decoding
    errors are OSErrors too, but without an errno, and are the file's fault."""
    data = noisy_jpeg((64, 64))
    with (
        pytest.raises(OSError) as caught,
        untrusted_image(FailingRead(data, 200), max_pixels=None) as im,
    ):
        im.load()
    assert caught.value.errno == errno.EIO and not isinstance(caught.value, InvalidImage)
    with (
        pytest.raises(InvalidImage, match="truncated or corrupt"),
        untrusted_image(data[:200], max_pixels=None) as im,
    ):
        im.load()


def test_keyboard_interrupt_is_not_swallowed(monkeypatch):
    def load(_self: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", load)
    with (
        pytest.raises(KeyboardInterrupt),
        untrusted_image(image_bytes("PNG"), max_pixels=None) as im,
    ):
        im.load()


def test_deliberate_refusals_keep_their_own_errors(store):
    with pytest.raises(UnsupportedMedia):
        stage(store, image_bytes("ICO", (16, 16)))
    with pytest.raises(ImageTooLarge, match="100×100"):
        stage(store, image_bytes("PNG", (100, 100)), max_pixels=99)
    with pytest.raises(InvalidImage, match="not an image"):
        stage(store, b"just text")


def test_a_broken_exif_block_never_rejects_a_photo_that_decodes(store, monkeypatch):
    def getexif(_self: Any) -> Any:
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr(Image.Image, "getexif", getexif)
    staged = stage(store, image_bytes("JPEG", (30, 20)))
    assert (staged.width, staged.height, staged.taken_at) == (30, 20, None)


# -- past Pillow's own limit: the message quotes the configured limit and the size -------------


def test_an_image_past_pillows_hard_limit_is_refused_with_the_configured_limit(store):
    with pytest.raises(ImageTooLarge) as caught:
        stage(store, png_claiming(30_000, 30_000), max_pixels=50_000_000)
    err = caught.value
    assert err.message == "the image has 30000×30000 pixels, more than the limit of 50000000"
    assert err.detail == {"width": 30_000, "height": 30_000, "max_pixels": 50_000_000}


# -- FIFOs and other non-regular files are refused on the opened descriptor, at once -----------


def test_inspect_file_refuses_a_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "p0001.jpg"
    os.mkfifo(fifo)
    try:
        with pytest.raises(InvalidImage, match="not a regular file"):
            within(1.0, lambda: inspect_file(fifo, max_bytes=MB, max_pixels=10_000_000))
    finally:
        unblock_fifo(fifo)


def test_inspect_file_refuses_a_folder_and_a_symlink(tmp_path):
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(InvalidImage, match="folder"):
        inspect_file(tmp_path / "dir.jpg", max_bytes=MB, max_pixels=10_000_000)
    (tmp_path / "real.jpg").write_bytes(image_bytes("JPEG"))
    (tmp_path / "link.jpg").symlink_to(tmp_path / "real.jpg")
    with pytest.raises(OSError):
        inspect_file(tmp_path / "link.jpg", max_bytes=MB, max_pixels=10_000_000)


def test_inspect_file_turns_decoder_errors_into_invalid_image(tmp_path):
    p = tmp_path / "x.tif"
    p.write_bytes(tiff_with_strip_offsets_of_type(11))
    with pytest.raises(InvalidImage, match="cannot be decoded"):
        inspect_file(p, max_bytes=MB, max_pixels=10_000_000)


def test_the_fifo_guard_is_quick(tmp_path):
    """The refusal costs no wait: many FIFOs are refused well within a second."""
    start = time.monotonic()
    for n in range(20):
        fifo = tmp_path / f"f{n}"
        os.mkfifo(fifo)
        with pytest.raises(InvalidImage):
            within(1.0, lambda fifo=fifo: inspect_file(fifo, max_bytes=MB, max_pixels=100))
    assert time.monotonic() - start < 1.0
