"""Storage: upload validation, content addressing, atomic writes, bounded reads."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

from app.errors import ImageTooLarge, InvalidImage, PayloadTooLarge, UnsupportedMedia
from app.storage import THUMB_SIZE, ImageStore, display_filename
from tests.db_fixtures import image_bytes, noisy_jpeg, png_claiming

MB = 1024 * 1024


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "data")


def stage(store: ImageStore, data: bytes, name: str | None = "x", **limits: int):
    return store.stage(
        io.BytesIO(data),
        name,
        max_bytes=limits.get("max_bytes", 10 * MB),
        max_pixels=limits.get("max_pixels", 10_000_000),
    )


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.mark.parametrize(
    ("fmt", "mime", "ext"),
    [
        ("JPEG", "image/jpeg", "jpg"),
        ("PNG", "image/png", "png"),
        ("WEBP", "image/webp", "webp"),
        ("GIF", "image/gif", "gif"),
        ("BMP", "image/bmp", "bmp"),
        ("TIFF", "image/tiff", "tiff"),
    ],
)
def test_allowed_formats_are_staged_and_committed(store, fmt, mime, ext):
    data = image_bytes(fmt, (300, 120))
    staged = stage(store, data)
    assert (staged.mime, staged.ext, staged.width, staged.height) == (mime, ext, 300, 120)
    assert staged.size_bytes == len(data)

    relpath, created = store.commit(staged)

    assert created
    assert relpath == f"originals/{staged.sha256[:2]}/{staged.sha256[2:4]}/{staged.sha256}.{ext}"
    assert store.path(relpath).read_bytes() == data
    with Image.open(store.path(store.thumbnail_relpath(relpath))) as thumb:
        assert thumb.format == "WEBP"
        assert thumb.size == (THUMB_SIZE, round(120 * THUMB_SIZE / 300))
    assert files_under(store.tmp_dir) == []


def test_same_content_is_stored_once(store):
    data = image_bytes("PNG")
    first, created1 = store.commit(stage(store, data, "a.png"))
    second, created2 = store.commit(stage(store, data, "b.png"))
    assert first == second
    assert (created1, created2) == (True, False)
    assert len(files_under(store.root / "originals")) == 1
    assert files_under(store.tmp_dir) == []


def test_commit_restores_a_missing_file(store):
    data = image_bytes("PNG")
    relpath, _ = store.commit(stage(store, data))
    store.delete(relpath)
    assert not store.path(relpath).exists()
    again, created = store.commit(stage(store, data))
    assert (again, created) == (relpath, True)
    assert store.path(relpath).read_bytes() == data
    assert store.path(store.thumbnail_relpath(relpath)).exists()


def test_gif_uses_its_first_frame(store):
    frames = [Image.new("RGB", (40, 20), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    staged = stage(store, buf.getvalue())
    relpath, _ = store.commit(staged)
    with Image.open(store.path(store.thumbnail_relpath(relpath))) as thumb:
        r, _g, b = thumb.convert("RGB").getpixel((5, 5))
    assert r > 200 and b < 50  # red, the first frame


def test_exif_orientation_is_applied_to_dimensions_and_thumbnail(store):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    data = image_bytes("JPEG", (60, 20), exif=exif.tobytes())
    staged = stage(store, data)
    assert (staged.width, staged.height) == (20, 60)
    relpath, _ = store.commit(staged)
    assert store.path(relpath).read_bytes() == data  # the original is kept as uploaded
    with Image.open(store.path(store.thumbnail_relpath(relpath))) as thumb:
        assert thumb.width < thumb.height


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_gives_the_upright_thumbnail(store, orientation):
    """The thumbnail is shrunk first and turned after: the same picture as turning the full
    image first (what a viewer shows), for each of the eight EXIF orientations."""
    import numpy as np
    from PIL import ImageOps

    yy, xx = np.mgrid[0:300, 0:900]
    pixels = np.stack([xx * 255 // 900, yy * 255 // 300, (xx // 150 % 2) * 255], axis=-1)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels.astype("uint8")).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    staged = stage(store, buf.getvalue())
    relpath, _ = store.commit(staged)
    with Image.open(io.BytesIO(buf.getvalue())) as original:
        want = ImageOps.exif_transpose(original)
        want.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.LANCZOS)
    assert (staged.width, staged.height) == (
        (300, 900) if orientation >= 5 else (900, 300)
    )  # fmt: skip
    with Image.open(store.path(store.thumbnail_relpath(relpath))) as thumb:
        got = thumb.convert("RGB")
    assert got.size == want.size
    diff = np.abs(np.asarray(got, dtype=float) - np.asarray(want.convert("RGB"), dtype=float))
    assert diff.mean() < 4.0, diff.mean()  # WebP at quality 80; a wrong turn differs by ~80


@pytest.mark.parametrize(
    ("data", "error", "words"),
    [
        (b"", InvalidImage, "empty"),
        (b"hello, I am text", InvalidImage, "not an image"),
        (noisy_jpeg()[: len(noisy_jpeg()) * 2 // 3], InvalidImage, "truncated"),
        (png_claiming(100_000, 100_000), ImageTooLarge, "pixels"),
        (png_claiming(5_000, 5_000), ImageTooLarge, "5000×5000"),
        (image_bytes("ICO", (16, 16)), UnsupportedMedia, "ICO"),
        (image_bytes("PPM", (16, 16)), UnsupportedMedia, "PPM"),
    ],
    ids=["empty", "text", "truncated-jpeg", "bomb", "over-max-pixels", "ico", "ppm"],
)
def test_bad_uploads_are_refused_and_leave_nothing(store, data, error, words):
    with pytest.raises(error, match=words):
        stage(store, data, max_pixels=1_000_000)
    assert files_under(store.root) == []


def test_pixel_limit_counts_width_times_height(store):
    data = image_bytes("PNG", (100, 50))
    with pytest.raises(ImageTooLarge):
        stage(store, data, max_pixels=4_999)
    assert stage(store, data, max_pixels=5_000).width == 100


class EndlessStream:
    """A stream that never ends, counting what was read from it."""

    def __init__(self) -> None:
        self.read_bytes = 0

    def read(self, size: int = -1, /) -> bytes:
        assert size > 0, "must read in bounded chunks"
        self.read_bytes += size
        return b"\xff" * size


def test_size_limit_is_enforced_while_reading(store):
    stream = EndlessStream()
    with pytest.raises(PayloadTooLarge):
        store.stage(stream, "huge.jpg", max_bytes=3 * MB, max_pixels=10**6)
    assert stream.read_bytes == 3 * MB + 1  # stopped one byte past the limit
    assert files_under(store.root) == []


def test_size_limit_is_inclusive(store):
    data = image_bytes("PNG")
    assert stage(store, data, max_bytes=len(data)).size_bytes == len(data)
    with pytest.raises(PayloadTooLarge):
        stage(store, data, max_bytes=len(data) - 1)


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("cat.jpg", "cat.jpg"),
        ("../../etc/passwd", "passwd"),
        ("/abs/path/dog.png", "dog.png"),
        ("C:\\Users\\me\\a.png", "a.png"),
        ("..", None),
        ("dir/", None),
        ("bad\x00name\n.png", "badname.png"),
        ("", None),
        (None, None),
        ("x" * 300 + ".png", ("x" * 300 + ".png")[-255:]),
    ],
)
def test_display_filename_keeps_only_a_safe_base_name(raw, shown):
    assert display_filename(raw) == shown


def test_stored_paths_never_use_the_client_filename(store):
    staged = stage(store, image_bytes("PNG"), "../../../../tmp/evil.png")
    relpath, _ = store.commit(staged)
    assert staged.filename == "evil.png"
    assert "evil" not in relpath
    assert store.path(relpath).is_relative_to(store.root)


def test_path_refuses_to_leave_the_data_folder(store):
    with pytest.raises(ValueError, match="escapes"):
        store.path("../outside.png")


def test_delete_removes_original_and_thumbnail(store):
    relpath, _ = store.commit(stage(store, image_bytes("PNG")))
    store.delete(relpath)
    assert files_under(store.root / "originals") == []
    assert files_under(store.root / "thumbs") == []


def test_sweep_tmp_removes_only_old_leftovers(store):
    store.tmp_dir.mkdir(parents=True)
    old, fresh = store.tmp_dir / "upload-old", store.tmp_dir / "upload-fresh"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    os.utime(old, (0, 0))
    assert store.sweep_tmp(older_than_s=3600) == 1
    assert not old.exists() and fresh.exists()


def test_heic_photos_are_accepted_thumbnailed_and_readable_for_embedding(tmp_path: Path) -> None:
    from app.services.embedding import _open_rgb

    store = ImageStore(tmp_path)  # registers the HEIF plugin
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 40)).save(buf, "HEIF")
    staged = store.stage(io.BytesIO(buf.getvalue()), "IMG_0001.HEIC", max_bytes=1 << 20,
                         max_pixels=10_000_000)  # fmt: skip
    assert (staged.format, staged.mime, staged.ext) == ("HEIF", "image/heic", "heic")
    assert (staged.width, staged.height) == (64, 48)
    path, _ = store.commit(staged)
    with Image.open(store.path(store.thumbnail_relpath(path))) as thumb:
        assert thumb.format == "WEBP" and thumb.size == (64, 48)
    pixels = _open_rgb(store, path)
    assert pixels is not None and pixels.size == (64, 48)
    r, g, b = pixels.getpixel((32, 24))  # type: ignore[misc]
    assert r > 150 and g < 90 and b < 90  # lossy, but the colour survives


def test_a_large_jpeg_is_validated_and_thumbnailed_at_a_reduced_scale(store, monkeypatch):
    """The decode that checks a JPEG and makes its thumbnail runs at the smallest JPEG scale
    keeping both sides >= twice the thumbnail (1/2 of 2400x1600 here: 1/4 would be 600x400):
    the stored size is the file's, the thumbnail as large as ever, and a cut file still fails."""
    from app import storage

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    import numpy as np

    pixels = np.random.default_rng(3).integers(0, 256, (1600, 2400, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    data = buf.getvalue()
    decoded: list[tuple[int, int]] = []
    make = storage._make_thumbnail
    monkeypatch.setattr(
        storage, "_make_thumbnail", lambda img, o=1: decoded.append(img.size) or make(img, o)
    )
    staged = stage(store, data)
    assert decoded == [(1200, 800)]
    assert (staged.width, staged.height) == (1600, 2400)  # EXIF-upright, the file's full size
    with Image.open(io.BytesIO(staged.thumbnail)) as thumb:
        assert thumb.size == (171, THUMB_SIZE)  # 256 x 1600 / 2400, rounded
    with pytest.raises(InvalidImage, match="truncated"):
        stage(store, data[: len(data) * 2 // 3])


def _gradient(w: int, h: int):
    import numpy as np

    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // w, yy * 255 // h, (xx // 97 % 2) * 255], axis=-1).astype("uint8")


@pytest.mark.parametrize("orientation", [1, 6])
def test_a_large_photo_gets_an_upright_rgb_preview_that_delete_removes(store, orientation):
    """A photo larger than PREVIEW_SIDE gets the embedding's preview: a JPEG, upright, the
    validating decode's draft (800x600 of 1600x1200: shortest side from PREVIEW_SIDE to twice
    it), showing what the original shows (the picture `_open_rgb` decodes from the original:
    EXIF-upright RGB); delete removes it with the original."""
    import numpy as np
    from PIL import ImageOps

    from app.storage import PREVIEW_SIDE

    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(_gradient(1600, 1200)).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    relpath, _ = store.commit(stage(store, buf.getvalue()))
    preview_path = store.path(store.preview_relpath(relpath))
    with Image.open(preview_path) as preview:
        assert preview.format == "JPEG" and preview.mode == "RGB"
        want_size = (800, 600) if orientation == 1 else (600, 800)
        assert preview.size == want_size and PREVIEW_SIDE <= min(preview.size) < 2 * PREVIEW_SIDE
        got = np.asarray(preview.convert("RGB"), dtype=float)
    with Image.open(io.BytesIO(buf.getvalue())) as original:
        want = ImageOps.exif_transpose(original).convert("RGB").resize(want_size)
    diff = np.abs(got - np.asarray(want, dtype=float)).mean()
    assert diff < 6.0, diff  # JPEG twice; a wrong turn or a wrong picture differs by ~70
    store.delete(relpath)
    assert not preview_path.exists() and files_under(store.root / "previews") == []


def test_a_photo_no_larger_than_the_preview_gets_none(store):
    """A photo whose shortest side is at most PREVIEW_SIDE is read from the original: as
    fast, and no copy is kept."""
    staged = stage(store, image_bytes("JPEG", (900, 512)))
    assert staged.preview is None
    relpath, _ = store.commit(staged)
    assert not store.path(store.preview_relpath(relpath)).exists()
    assert files_under(store.root / "previews") == []


def test_a_transparent_png_preview_is_the_rgb_the_embedding_would_read(store):
    """Alpha is dropped as `_open_rgb` drops it (Pillow's RGBA -> RGB), not composited; a PNG
    (no draft decoding) is shrunk by a whole factor into PREVIEW_SIDE..2 x PREVIEW_SIDE."""
    import numpy as np

    rgba = np.zeros((1100, 2400, 4), dtype="uint8")
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent red
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    staged = stage(store, buf.getvalue())
    assert staged.preview is not None
    with Image.open(io.BytesIO(staged.preview)) as preview:
        assert preview.size == (1200, 550)  # 1/2: 1100 // 512
        r, g, b = preview.convert("RGB").getpixel((300, 300))  # type: ignore[misc]
    assert r > 180 and g < 30 and b < 30


def test_a_preview_that_cannot_be_written_fails_no_upload(store, monkeypatch):
    """The preview is best effort: a full disk while writing it keeps the upload."""
    from app import storage

    real = storage._atomic_write

    def full(path: Path, data: bytes) -> None:
        if "previews" in path.parts:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(storage, "_atomic_write", full)
    relpath, created = store.commit(stage(store, image_bytes("JPEG", (1200, 900))))
    assert created and store.path(relpath).exists()
    assert store.path(store.thumbnail_relpath(relpath)).exists()
    assert not store.path(store.preview_relpath(relpath)).exists()
