"""Content-addressed image files under settings.data_dir, and upload validation with Pillow.

Layout (paths in the database are relative to data_dir, so the folder can move):
    originals/ab/cd/<sha256>.<ext>   the uploaded bytes, unchanged (EXIF and all)
    thumbs/ab/cd/<sha256>.webp       256 px (longest side), EXIF orientation applied, made once
    previews/ab/cd/<sha256>-512.jpg  512-1023 px (shortest side), upright RGB, for photos larger
                                     than that: what the embedding job decodes, not the original
    tmp/                             staging; same filesystem, so os.replace is atomic
One file serves every row (any user, images or concept examples) with the same content; callers
delete it only when no row references it any more (see services/images.delete_image).

An upload is staged first (streamed to tmp/ with its size checked while reading, hashed, fully
decoded), then committed (moved into place) or discarded: a rejected file leaves nothing behind.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import stat
import tempfile
import time
import weakref
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path, PosixPath
from typing import BinaryIO, Protocol

import pillow_heif
from PIL import Image, UnidentifiedImageError

from app.errors import (
    DomainError,
    ImageTooLarge,
    InvalidImage,
    PayloadTooLarge,
    StorageFull,
    StorageUnavailable,
    UnsupportedMedia,
)

# Pillow format name -> (MIME type, file extension). Anything else is refused.
ALLOWED_FORMATS: dict[str, tuple[str, str]] = {
    "JPEG": ("image/jpeg", "jpg"),
    "PNG": ("image/png", "png"),
    "WEBP": ("image/webp", "webp"),
    "GIF": ("image/gif", "gif"),
    "BMP": ("image/bmp", "bmp"),
    "TIFF": ("image/tiff", "tiff"),
    "HEIF": ("image/heic", "heic"),  # iPhone photos; decoded by pillow-heif's Pillow plugin
}
THUMB_SIZE = 256
THUMB_DRAFT = 2 * THUMB_SIZE  # smallest side a JPEG is decoded at for validation and thumbnail
THUMB_MIME = "image/webp"
# The embedding's preview (`_make_preview`): the shortest side of the picture the validating
# decode already holds, re-encoded once at scan or upload time, so that the embedding job reads
# a ~100 KB JPEG instead of decoding the original a second time (a 12 MP JPEG: ~25 ms of entropy
# decoding that no draft scale saves; HEIC and PNG have no draft at all). 512 covers a 224 px
# model's whole pass and its crops' (twice the input side); a pass that needs more reads the
# original. The side is in the file name, so another side never reads a stale preview.
PREVIEW_SIDE = 512
PREVIEW_QUALITY = 90
_CHUNK = 1024 * 1024
_MAX_NAME_CHARS = 255


class BinaryStream(Protocol):
    """What an upload must offer: `read(n)` returning at most n bytes, b"" at the end."""

    def read(self, size: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class StagedImage:
    """A validated upload waiting in tmp/ to be committed or discarded."""

    temp_path: Path
    sha256: str
    size_bytes: int
    format: str  # Pillow format name, one of ALLOWED_FORMATS
    width: int  # after EXIF orientation
    height: int
    filename: str | None  # sanitised display name, never used in a path
    thumbnail: bytes  # WebP
    taken_at: datetime | None = None  # EXIF DateTimeOriginal, aware (UTC unless EXIF says)
    preview: bytes | None = None  # JPEG for the embedding (`_make_preview`); None: small photo

    @property
    def mime(self) -> str:
        return ALLOWED_FORMATS[self.format][0]

    @property
    def ext(self) -> str:
        return ALLOWED_FORMATS[self.format][1]


def display_filename(raw: str | None) -> str | None:
    """The base name of a client-supplied filename, for display only ("../../a.png" -> "a.png")."""
    if not raw:
        return None
    base = re.split(r"[\\/]", raw)[-1]  # both separators: clients on Windows send C:\...\a.png
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    if base in ("", ".", ".."):
        return None
    return base[-_MAX_NAME_CHARS:] if len(base) > _MAX_NAME_CHARS else base


_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


@contextmanager
def storage_writes() -> Iterator[None]:
    """Turn the OS's "disk full" and "read-only" into domain errors that say so (507 / 503)."""
    try:
        yield
    except OSError as e:
        if e.errno in _FULL_ERRNOS:
            raise StorageFull(
                "the server's disk is full; nothing was stored. Try again once space is freed",
            ) from e
        if e.errno in _READ_ONLY_ERRNOS:
            raise StorageUnavailable(
                "the server's data folder is read-only or not writable; nothing was stored. "
                "Reading and searching still work",
            ) from e
        raise


def _atomic_write(dest: Path, data: bytes) -> None:
    """Write `data` to `dest` so readers see the old file or the whole new one, never a part."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# EXIF orientation -> the transposition that shows the image upright (EXIF 2.3, tag 0x0112).
_UPRIGHT: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(0x0112, 1))
    except Exception:  # EXIF is parsed from the file's bytes: any failure means "no value"
        return 1
    return value if value in _UPRIGHT else 1


def _make_thumbnail(img: Image.Image, orientation: int = 1) -> bytes:
    """A WebP at most THUMB_SIZE px on its longest side, upright for the EXIF `orientation`,
    alpha kept when the image has any. Shrinks `img` in place (the caller is done with it):
    shrinking first and turning the small result costs no full-size copies."""
    has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
    if img.mode not in ("RGB", "RGBA", "L", "LA"):
        img = img.convert("RGBA" if has_alpha else "RGB")  # P, CMYK, I;16... do not resample well
    img.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.LANCZOS)
    thumb = img.convert("RGBA" if has_alpha else "RGB")
    if orientation in _UPRIGHT:
        thumb = thumb.transpose(_UPRIGHT[orientation])
    buf = io.BytesIO()
    thumb.save(buf, "WEBP", quality=80, method=4)
    return buf.getvalue()


def _make_preview(img: Image.Image, orientation: int = 1) -> bytes | None:
    """The picture the embedding would decode from the original, made from the one decoded
    already: RGB as `app.services.embedding._open_rgb` converts it (alpha dropped, palettes
    and CMYK converted), upright, as a JPEG; its shortest side from PREVIEW_SIDE up to twice
    that. A JPEG's draft is already that small and is stored as it is; a larger picture (a
    format without draft decoding) is shrunk by a whole factor (`Image.reduce`, a box filter):
    no resampling, so the preview costs the scan little more than one JPEG encode (~1.5 ms at
    800x600). None when the picture is no larger than PREVIEW_SIDE: the original decodes as
    fast."""
    short = min(img.size)
    if short <= PREVIEW_SIDE:
        return None
    rgb = img.convert("RGB")  # a copy: the thumbnail is made from `img` next
    factor = short // PREVIEW_SIDE
    if factor >= 2:
        rgb = rgb.reduce(factor)
    if orientation in _UPRIGHT:
        rgb = rgb.transpose(_UPRIGHT[orientation])
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=PREVIEW_QUALITY)
    return buf.getvalue()


def _sniff_format(path: Path | BinaryIO) -> str | None:
    """The format Pillow would recognise without our allow-list (to word the error)."""
    try:
        if not isinstance(path, Path):
            path.seek(0)
        with Image.open(path) as img:
            return str(img.format)
    except Exception:
        return None


class ImageStore:
    """The image files of one data folder."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.tmp_dir = self.root / "tmp"
        # Pillow opens HEIC/HEIF once the plugin is registered (process-wide, idempotent); every
        # process that reads stored photos (API, worker, embedded jobs) has a store.
        pillow_heif.register_heif_opener()

    # -- paths ------------------------------------------------------------------------------

    @staticmethod
    def original_relpath(sha256: str, ext: str) -> str:
        """Relative path of the original with this content."""
        return f"originals/{sha256[:2]}/{sha256[2:4]}/{sha256}.{ext}"

    @staticmethod
    def thumbnail_relpath(storage_path: str) -> str:
        """Relative path of the thumbnail belonging to an original."""
        sha = Path(storage_path).stem
        return f"thumbs/{sha[:2]}/{sha[2:4]}/{sha}.webp"

    @staticmethod
    def preview_relpath(storage_path: str) -> str:
        """Relative path of the embedding's preview of an original (it may not exist)."""
        sha = Path(storage_path).stem
        return f"previews/{sha[:2]}/{sha[2:4]}/{sha}-{PREVIEW_SIDE}.jpg"

    def path(self, relpath: str) -> Path:
        """Absolute path of a stored file; refuses anything outside the data folder."""
        p = (self.root / relpath).resolve()
        if not p.is_relative_to(self.root):
            raise ValueError(f"storage path escapes the data folder: {relpath!r}")
        return p

    # -- upload -----------------------------------------------------------------------------

    def stage(
        self, stream: BinaryStream, filename: str | None, *, max_bytes: int, max_pixels: int
    ) -> StagedImage:
        """Copy an upload to tmp/ and validate it; raises a DomainError and keeps nothing if bad."""
        with storage_writes():
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=self.tmp_dir, prefix="upload-")
        tmp = Path(tmp_name)
        try:
            with storage_writes(), os.fdopen(fd, "wb") as out:
                sha, size = _copy_limited(stream, out, max_bytes)
            if size == 0:
                raise InvalidImage("the file is empty (0 bytes)")
            with open(tmp, "rb") as f:
                fmt, width, height, thumb, taken_at, preview = _inspect(f, max_pixels)
            return StagedImage(
                temp_path=tmp,
                sha256=sha,
                size_bytes=size,
                format=fmt,
                width=width,
                height=height,
                filename=display_filename(filename),
                thumbnail=thumb,
                taken_at=taken_at,
                preview=preview,
            )
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def commit(self, staged: StagedImage) -> tuple[str, bool]:
        """Move a staged upload into place; returns (storage_path, whether this call created it).

        If the content is already stored the temp file is dropped; a missing thumbnail is
        (re)written either way, so re-uploading heals a damaged store.
        """
        with storage_writes():
            return self._commit(staged)

    def _commit(self, staged: StagedImage) -> tuple[str, bool]:
        relpath = self.original_relpath(staged.sha256, staged.ext)
        dest = self.path(relpath)
        created = False
        if _touch(dest):  # stored already; touched, so the startup sweep leaves it alone
            staged.temp_path.unlink(missing_ok=True)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(staged.temp_path, "rb") as f:
                os.fsync(f.fileno())  # the bytes must be on disk before the name points at them
            os.replace(staged.temp_path, dest)
            created = True
        thumb = self.path(self.thumbnail_relpath(relpath))
        if not thumb.exists():
            try:
                _atomic_write(thumb, staged.thumbnail)
            except BaseException:
                if created:  # the disk filled up between the two: no original without a row
                    dest.unlink(missing_ok=True)
                raise
        self._write_preview(relpath, staged.preview)
        return relpath, created

    def _write_preview(self, relpath: str, preview: bytes | None) -> None:
        """Store an original's preview unless stored already. Best effort: without it the
        embedding decodes the original, so a full disk here fails nothing."""
        if preview is None:
            return
        dest = self.path(self.preview_relpath(relpath))
        if dest.exists():
            return
        try:
            _atomic_write(dest, preview)
        except OSError:
            dest.unlink(missing_ok=True)

    def originals(self) -> Iterator[tuple[str, float]]:
        """(storage_path, modification time) of every stored original."""
        base = self.root / "originals"
        if not base.is_dir():
            return
        for path in base.glob("*/*/*"):
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield path.relative_to(self.root).as_posix(), st.st_mtime

    def delete_if_older(self, storage_path: str, cutoff: float) -> bool:
        """Delete an original (and its thumbnail) unless it was written or touched since
        `cutoff` (an upload may be storing it right now); whether it was deleted."""
        try:
            if self.path(storage_path).lstat().st_mtime >= cutoff:
                return False
        except FileNotFoundError:
            return False
        self.delete(storage_path)
        return True

    def cache_thumbnail(
        self, sha256: str, ext: str, thumbnail: bytes, preview: bytes | None = None
    ) -> str:
        """Cache a library file's thumbnail (and its embedding preview); returns the content
        address (storage_path) that names them. No original is stored under that address: the
        library keeps the file."""
        relpath = self.original_relpath(sha256, ext)
        thumb = self.path(self.thumbnail_relpath(relpath))
        with storage_writes():
            if not thumb.exists():
                _atomic_write(thumb, thumbnail)
            self._write_preview(relpath, preview)
        return relpath

    def discard(self, staged: StagedImage) -> None:
        """Drop a staged upload (no-op once committed)."""
        staged.temp_path.unlink(missing_ok=True)

    def sweep_tmp(self, older_than_s: float = 3600.0) -> int:
        """Remove staging files a crashed process left behind; returns how many."""
        if not self.tmp_dir.is_dir():
            return 0
        cutoff = time.time() - older_than_s  # not 0: another process may be staging right now
        removed = 0
        for p in self.tmp_dir.iterdir():
            if p.is_file() and p.stat().st_mtime < cutoff:
                p.unlink(missing_ok=True)
                removed += 1
        return removed

    def delete(self, storage_path: str) -> None:
        """Remove an original, its thumbnail and its preview (callers check nothing references
        them)."""
        self.path(storage_path).unlink(missing_ok=True)
        self.path(self.thumbnail_relpath(storage_path)).unlink(missing_ok=True)
        self.path(self.preview_relpath(storage_path)).unlink(missing_ok=True)


def _touch(path: Path) -> bool:
    """Set the file's modification time to now; False when there is no such file."""
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    return True


def _copy_limited(stream: BinaryStream, out: BinaryIO, max_bytes: int) -> tuple[str, int]:
    """Copy in chunks, hashing; stop as soon as the limit is passed (never read it all)."""
    digest = hashlib.sha256()
    size = 0
    while chunk := stream.read(min(_CHUNK, max_bytes + 1 - size)):
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(
                f"the file is larger than the limit of {max_bytes} bytes",
                detail={"max_bytes": max_bytes},
            )
        digest.update(chunk)
        out.write(chunk)
    return digest.hexdigest(), size


_EXIF_IFD = 0x8769
_DATETIME_ORIGINAL = 0x9003
_OFFSET_TIME_ORIGINAL = 0x9011
_DATETIME = 0x0132  # IFD0 "DateTime": when the file was last changed by the camera or an editor


def exif_taken_at(img: Image.Image) -> datetime | None:
    """When the photo was taken, from EXIF DateTimeOriginal ("2024:06:01 14:30:00").

    EXIF times are local wall-clock times; OffsetTimeOriginal ("+02:00"), when the camera wrote
    it, places them; without it they are taken as UTC. None when absent or unreadable.
    """
    try:
        exif = img.getexif()
        sub = exif.get_ifd(_EXIF_IFD)
        raw = sub.get(_DATETIME_ORIGINAL) or exif.get(_DATETIME)
        if not isinstance(raw, str):
            return None
        stamp = datetime.strptime(raw.strip("\x00 ")[:19], "%Y:%m:%d %H:%M:%S")
        zone: timezone = UTC
        offset = sub.get(_OFFSET_TIME_ORIGINAL)
        match = (
            re.fullmatch(r"([+-])(\d\d):(\d\d)", offset.strip("\x00 "))
            if isinstance(offset, str)
            else None
        )
        if match:
            minutes = int(match[2]) * 60 + int(match[3])
            zone = timezone(timedelta(minutes=minutes if match[1] == "+" else -minutes))
        return stamp.replace(tzinfo=zone).astimezone(UTC)
    except Exception:  # hostile bytes may raise anything (struct.error, IndexError...)
        return None  # a broken EXIF block never rejects a photo that decodes


@dataclass(frozen=True)
class InspectedFile:
    """A library file validated in place (nothing copied)."""

    sha256: str
    size_bytes: int
    format: str
    width: int
    height: int
    thumbnail: bytes
    taken_at: datetime | None
    preview: bytes | None = None  # JPEG for the embedding (`_make_preview`); None: small photo

    @property
    def mime(self) -> str:
        return ALLOWED_FORMATS[self.format][0]

    @property
    def ext(self) -> str:
        return ALLOWED_FORMATS[self.format][1]


def inspect_file(
    path: Path, *, max_bytes: int, max_pixels: int, within: Path | None = None
) -> InspectedFile:
    """Validate a file where it lies, like an upload (hash, size limit, full decode); never
    blocks on a FIFO or device put in its place (InvalidImage: not a regular file). With
    `within` (an allowed root above it), opened by `open_beneath`: no symlink below `within`
    is followed, in any component; without, only the last component is refused as a link."""
    opened = open_beneath(path, within) if within is not None else open_regular_file(path)
    with opened as f:
        digest, size = hashlib.sha256(), 0
        while chunk := f.read(_CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLarge(f"the file is larger than the limit of {max_bytes} bytes")
            digest.update(chunk)
        sha = digest.hexdigest()
        if size == 0:
            raise InvalidImage("the file is empty (0 bytes)")
        f.seek(0)
        fmt, width, height, thumb, taken_at, preview = _inspect(f, max_pixels)
    return InspectedFile(sha, size, fmt, width, height, thumb, taken_at, preview)


def root_of(folder: str | Path, roots: Sequence[Path]) -> Path:
    """The allowed root (resolved) that `folder` lies under, or ValueError."""
    for r in roots:
        root = r.resolve()
        if Path(folder).is_relative_to(root):
            return root
    raise ValueError(f"{str(folder)!r} is outside the allowed roots")


def confined_file(source_path: str, folder: str, roots: Sequence[Path]) -> Path:
    """The real path of a library file, or ValueError if it (through any symlink) leaves its
    library folder or the allowed roots, or cannot be resolved (a symlink loop, a path too long).

    Only a check of names: open the result with `open_beneath` (or use `open_library_file`),
    never by name, or a folder swapped for a link after this check is followed."""
    try:
        real = Path(source_path).resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop, before Python 3.13
        raise ValueError(f"{source_path!r} cannot be resolved: {e}") from None
    base = Path(folder)
    if not real.is_relative_to(base) or not any(base.is_relative_to(r.resolve()) for r in roots):
        raise ValueError(f"{source_path!r} is outside its library or the allowed roots")
    return real


def _signed64(n: int) -> int:
    """`n` (an unsigned 64-bit inode number) as the signed 64-bit number a BIGINT column holds."""
    return n - (1 << 64) if n >= (1 << 63) else n


@dataclass(frozen=True)
class FileStamp:
    """What says a library file is the one a scan read: its size and mtime, which a user's tools
    can set back (`cp -p`, `rsync -a`, `touch -r`), and its ctime and inode, which nobody can
    (any write or rename into place moves ctime; a file renamed over it has another inode).
    `ctime_ns` and `ino` None: not known (a row indexed before they were kept)."""

    size: int
    mtime_ns: int
    ctime_ns: int | None
    ino: int | None

    @classmethod
    def of(cls, st: os.stat_result) -> FileStamp:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, _signed64(st.st_ino))

    def same_file(self, st: os.stat_result) -> bool:
        """Whether `st` (a stat now) is the file this stamp was taken of, unchanged; a part of
        the stamp that is not known is not compared (the next scan fills it in)."""
        now = FileStamp.of(st)
        return (
            (self.size, self.mtime_ns) == (now.size, now.mtime_ns)
            and self.ctime_ns in (None, now.ctime_ns)
            and self.ino in (None, now.ino)
        )


# Errors after which a path is taken for gone: it does not exist, or can never be read as it is
# named. Any other (EIO, ESTALE or ETIMEDOUT from a network share, EACCES) says nothing of the
# file and may pass.
_GONE_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP})


def os_error_reason(e: OSError) -> str:
    """A few words on why a path could not be read, for a report or an image's embed_error."""
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return f"unreadable: {e.strerror or e}"


def is_gone_error(e: OSError) -> bool:
    """Whether an error reading a path says it is gone or can never be read as named (what was
    indexed there may be dropped), rather than that it cannot be read right now."""
    return e.errno in _GONE_ERRNOS


def open_library_file(
    source_path: str, folder: str, roots: Sequence[Path]
) -> tuple[Path, BinaryIO]:
    """(its real path, the open file) of a library file, for reading: a link to a file inside
    the library is read as that file, at its own path (`confined_file`); the real path is then
    opened from the allowed root down by `open_beneath`, so nothing outside the library and
    the roots is read even when a folder on the way is swapped for a link meanwhile. ValueError
    (outside, unresolvable), InvalidImage (not a regular file) or OSError (missing, a link met
    on the way: ELOOP or ENOTDIR, no permission)."""
    real = confined_file(source_path, folder, roots)
    return real, open_beneath(real, root_of(folder, roots))


_DIR_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_DIRECTORY", 0)
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
)


def open_beneath(path: Path, base: Path) -> BinaryIO:
    """Open the file `path` (absolute, under the folder `base`) for reading without following
    any symlink below `base`: `base` is opened, then each folder of `path` in turn relative to
    the one before (dir_fd) with O_NOFOLLOW | O_DIRECTORY, then the file with O_NOFOLLOW, as
    `open_regular_file` (never waits on a FIFO; InvalidImage unless a regular file). A link in
    any component, put there at any time before the open, is refused (OSError ELOOP, or
    ENOTDIR for a link or file where a folder was), never followed: the check of a resolved
    path and this open cannot be raced. ValueError if `path` is not under `base`."""
    parts = path.relative_to(base).parts
    if not parts or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{str(path)!r} does not name a file under {str(base)!r}")
    fd = os.open(base, _DIR_FLAGS & ~getattr(os, "O_NOFOLLOW", 0))  # the root: trusted as set
    try:
        for name in parts[:-1]:
            try:
                inner = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise OSError(
                        e.errno, f"the folder {name!r} on its path is a link or not a folder now"
                    ) from None
                raise
            os.close(fd)
            fd = inner
        return open_regular_file(Path(parts[-1]), dir_fd=fd)
    finally:
        os.close(fd)


def open_regular_file(
    path: Path, *, follow_symlinks: bool = False, dir_fd: int | None = None
) -> BinaryIO:
    """Open an untrusted path for reading, or raise InvalidImage if it is not a regular file.

    The check is made on the opened descriptor (fstat), so a FIFO, device or folder swapped in
    after any earlier stat is refused instead of read; O_NONBLOCK keeps the open itself from
    waiting for a FIFO's writer. A symlink at the last component is refused (OSError ELOOP)
    unless `follow_symlinks`. `dir_fd`: `path` is relative to that open folder. OSError as
    os.open raises it (missing, no permission...).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO, socket or device"
            raise InvalidImage(f"not a regular file ({kind})")
        if flags & getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)  # no effect on a regular file's reads; restore the default
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# Where an open descriptor can be opened again by name, whatever happened to the file's own
# name meanwhile (Linux: a "magic link" to the open file; BSD and macOS: the descriptor itself).
_FD_DIR = next((d for d in ("/proc/self/fd", "/dev/fd") if os.path.isdir(d)), None)


class HeldFile(PosixPath):
    """A file opened and checked, as a path for code that reads a path (a FileResponse, the
    API's ETag from `path.stat()`): `str()` is its real path, but every file system call made
    with it (os.stat, open, Path.stat, is_file) reaches it through its open descriptor
    (/proc/self/fd/N), so what is read is the file that was opened, never what its name points
    at by then (a folder on the way swapped for a link meanwhile). The descriptor is closed by
    `close()`, or when the object is collected. Paths derived from it (`.parent`) are names.
    """

    _held: str | None = None
    _closer: weakref.finalize[[], HeldFile] | None = None

    @classmethod
    def hold(cls, f: BinaryIO, name: Path) -> HeldFile:
        """`f` (open, now owned by the result) as a path named `name`."""
        if _FD_DIR is None:
            raise OSError(errno.ENOSYS, "no /proc/self/fd or /dev/fd to hold a file open by")
        path = cls(name)
        path._held = f"{_FD_DIR}/{f.fileno()}"
        path._closer = weakref.finalize(path, f.close)
        return path

    def __fspath__(self) -> str:
        return self._held if self._held is not None else str(self)

    def close(self) -> None:
        """Close the descriptor (the path then names nothing that can be read)."""
        if self._closer is not None:
            self._closer()


def _claimed_size(fp: BinaryIO, formats: Collection[str] | None) -> tuple[int, int] | None:
    """The size an image's header claims, read by Pillow's format plugins without its
    decompression-bomb check (only to word the refusal of an image Pillow refused for size);
    None when it cannot be told."""
    try:
        fp.seek(0)
        prefix = fp.read(16)
        Image.init()
        for fmt in formats if formats is not None else list(Image.OPEN):
            if fmt.upper() not in Image.OPEN:
                continue
            factory, accept = Image.OPEN[fmt.upper()]
            result = accept(prefix) if accept is not None else True
            if isinstance(result, str) or not result:
                continue
            fp.seek(0)
            try:
                im = factory(fp, "")
            except Exception:
                continue
            return int(im.size[0]), int(im.size[1])
    except Exception:
        return None
    return None


def _too_large(width: int, height: int, max_pixels: int) -> ImageTooLarge:
    return ImageTooLarge(
        f"the image has {width}×{height} pixels, more than the limit of {max_pixels}",
        detail={"width": width, "height": height, "max_pixels": max_pixels},
    )


def _reason(e: BaseException) -> str:
    """A decoder's exception in a few words (some carry no message: name the kind)."""
    text = str(e).strip() or type(e).__name__
    return text if len(text) <= 200 else text[:199] + "…"


@contextmanager
def untrusted_image(
    source: BinaryIO | bytes,
    *,
    max_pixels: int | None,
    formats: Collection[str] | None = tuple(ALLOWED_FORMATS),
) -> Iterator[Image.Image]:
    """Open untrusted image bytes (a binary file object or bytes) with Pillow, checked, for the
    body of the `with` to decode (load, draft, exif_transpose, convert, thumbnail...).

    Before the body: the format must be one of `formats` (None: any Pillow knows) and the
    header's width × height at most `max_pixels` (None: Pillow's own bomb guard only). Anything
    that fails while opening or in the body becomes a DomainError about the file:
    ImageTooLarge (too many pixels, or MemoryError while decoding), UnsupportedMedia (a format
    outside `formats`), InvalidImage (not an image; any other Exception a decoder raises on
    hostile bytes: TypeError, RuntimeError, struct.error...). DomainErrors raised on purpose
    pass through, and so does an OSError with an errno: the file could not be read (EIO from a
    network share), which says nothing of its bytes. BaseExceptions that are not Exceptions
    (KeyboardInterrupt...) propagate.
    The caller closes a file object it passed.
    """
    fp: BinaryIO = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    allowed = list(formats) if formats is not None else None
    names = ", ".join(allowed) if allowed is not None else "a format Pillow can read"
    try:
        fp.seek(0)
        with Image.open(fp, formats=allowed) as img:
            if max_pixels is not None and img.width * img.height > max_pixels:
                # The header's claim, before decoding: a 100-byte PNG can promise 10^10 pixels.
                raise _too_large(img.width, img.height, max_pixels)
            yield img
    except DomainError:
        raise
    except Image.DecompressionBombError as e:  # past Pillow's own hard limit
        limit = max_pixels if max_pixels is not None else 2 * (Image.MAX_IMAGE_PIXELS or 0)
        size = _claimed_size(fp, allowed)
        if size is not None:
            raise _too_large(size[0], size[1], limit) from e
        raise ImageTooLarge(
            f"the image has more pixels than the limit of {limit}", detail={"max_pixels": limit}
        ) from e
    except UnidentifiedImageError as e:
        other = _sniff_format(fp) if allowed is not None else None
        if other is not None:
            raise UnsupportedMedia(
                f"{other} images are not accepted; send one of {names}",
                detail={"format": other, "allowed": allowed},
            ) from e
        raise InvalidImage(f"not an image (or not one of {names})") from e
    except MemoryError as e:
        raise ImageTooLarge(
            "the image cannot be decoded within the memory the server has for it"
        ) from e
    except OSError as e:
        if e.errno is not None:
            # The file could not be read (EIO, ESTALE or ETIMEDOUT from a network share, EACCES):
            # that says nothing of its bytes, so it stays an OSError for the caller to retry.
            # Pillow's own decoding errors are OSErrors without an errno.
            raise
        raise InvalidImage(
            f"the image cannot be decoded (truncated or corrupt): {_reason(e)}"
        ) from e
    except Exception as e:  # a decoder fed hostile bytes may raise anything
        raise InvalidImage(
            f"the image cannot be decoded (truncated or corrupt): {_reason(e)}"
        ) from e


def _inspect(
    fp: BinaryIO, max_pixels: int
) -> tuple[str, int, int, bytes, datetime | None, bytes | None]:
    """Fully decode the first frame: (format, width, height, thumbnail, taken_at, preview)
    after EXIF orientation; a DomainError (see `untrusted_image`) for a file that is not
    acceptable."""
    with untrusted_image(fp, max_pixels=max_pixels) as img:
        fmt = str(img.format)
        width, height = img.size  # the header's: a draft below decodes fewer pixels
        # A JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale that keeps both sides at least
        # twice the thumbnail's (what Image.thumbnail's own draft does): the whole file is still
        # decoded, so a truncated or corrupt one fails all the same, at a third of the cost of
        # a 12 MP photo (bench/index_speed.py). No-op for other formats.
        img.draft(None, (THUMB_DRAFT, THUMB_DRAFT))
        img.load()  # full decode: truncated and corrupt files fail here, not later
        taken_at = exif_taken_at(img)
        orientation = _orientation(img)
        if orientation in (5, 6, 7, 8):  # a quarter turn: upright, the sides swap
            width, height = height, width
        preview = _make_preview(img, orientation) if min(width, height) > PREVIEW_SIDE else None
        thumb = _make_thumbnail(img, orientation)
    return fmt, width, height, thumb, taken_at, preview
