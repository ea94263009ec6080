"""Embedding library images with the serving model (the `embed_images` and `rebuild_index` jobs)."""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
import torch
from PIL import Image as PILImage
from PIL import ImageOps
from sqlalchemy.orm import Session

from app import repositories
from app.config import LimitSettings, SearchSettings
from app.db import session_scope
from app.errors import DomainError
from app.ml.encode import ImageEngine, encode_pixels, preprocess_images
from app.ml.model import ClipBundle
from app.ml.onnx_engine import image_engine
from app.ml.regions import (
    embed_with_regions,
    encode_regions_by,
    layout_boxes,
    method_kinds,
    pack_regions,
    parse_stored_layout,
    region_method,
    split_regions,
    stored_layout,
    unpack_regions,
)
from app.ml.threads import cpu_count, cpu_threads
from app.models import Job, JobKind, new_vec_id
from app.services.job_runs import JobContext
from app.services.jobs import JobQueue, enqueue_committed
from app.services.model import ServingModel
from app.storage import (
    PREVIEW_SIDE,
    FileStamp,
    ImageStore,
    open_library_file,
    open_regular_file,
    os_error_reason,
    untrusted_image,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

BATCH = 32  # images per forward pass and per commit: progress moves, memory stays flat
FIRST_BATCH = 4  # a pass's first batch: batches double from it up to BATCH (`_batches`)
# A generation bump makes the next search rebuild the user's index (bench/scale.py: 1.5 s at
# 100k images), so during a long upload new images become searchable at most this often.
PUBLISH_INTERVAL_S = 10.0
# Pixel limit of `_open_rgb` when its caller has no settings at hand (the jobs pass theirs).
DEFAULT_MAX_PIXELS = LimitSettings().max_pixels


@dataclass(frozen=True)
class ImageSource:
    """Where an image's bytes are: the store (uploads), or a library's file (indexed in place),
    with the stamp of the file the library's scan read (`stamp`)."""

    storage_path: str
    source_path: str | None = None
    library_path: str | None = None
    stamp: FileStamp | None = None


class ChangedSinceScan(OSError):
    """A library file is not the one its scan read (another file renamed over it, a mount laid
    over its folder): its bytes are not what the row's hash says. Passes: the next scan reads
    the file anew."""


def _opened(store: ImageStore, roots: list[Path], src: ImageSource) -> BinaryIO:
    """The file to read, open: a stored original (a regular file, no link), or a library's
    file only while it stays inside its library and the roots, opened with no link followed
    on the way (a folder swapped for a link meanwhile is refused, never followed), and only
    while it is the file its scan read (ChangedSinceScan: the vector of a row must be of the
    bytes its hash and thumbnail are of, never of another user's file mounted there since)."""
    if src.source_path is None or src.library_path is None:
        return open_regular_file(store.path(src.storage_path))
    f = open_library_file(src.source_path, src.library_path, roots)[1]
    if src.stamp is not None and not src.stamp.same_file(os.fstat(f.fileno())):
        f.close()
        raise ChangedSinceScan(
            errno.ESTALE, "the file changed since the library's scan; the next scan reads it"
        )
    return f


MAX_ERROR_CHARS = 500


def failure_reason(e: BaseException) -> str:
    """Why a file could not be read or decoded, in a few words, as UTF-8 text a database and
    JSON can carry (a path in an OSError may hold bytes of a name that is not UTF-8)."""
    if isinstance(e, DomainError):
        text = e.message
    elif isinstance(e, ChangedSinceScan):
        text = e.strerror or str(e)
    elif isinstance(e, FileNotFoundError):
        text = "the file is gone"
    elif isinstance(e, OSError):
        text = os_error_reason(e)
    else:
        text = str(e) or type(e).__name__
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def may_pass(e: BaseException) -> bool:
    """Whether a failure to read a file may pass without the file changing: an I/O error (a
    network share that dropped or timed out, a permission, a file briefly gone), as opposed to
    bytes that are not an acceptable image (a DomainError) or a path that leaves its library
    (ValueError). `untrusted_image` keeps read errors as OSErrors for this."""
    return isinstance(e, OSError)


def _open_rgb(
    store: ImageStore,
    src: ImageSource | str,
    min_side: int = 0,
    roots: Sequence[Path] = (),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    on_failure: Callable[[str, bool], None] | None = None,
) -> PILImage.Image | None:
    """The original (stored: `src` may be its storage path; or the library's file),
    EXIF-oriented, RGB. A JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale that keeps both
    sides >= `min_side` (the model resizes far below that anyway).

    The file is checked as an upload is (a regular file, opened without following a link or
    waiting on a FIFO; an allowed format; at most `max_pixels`), since it may have been swapped
    since it was validated. None, logged and told to `on_failure` (the reason, and whether it
    may pass without the file changing: `may_pass`), when it cannot be read or decoded for any
    reason: only this image is skipped, never its batch.

    A photo larger than the preview's side (app.storage.PREVIEW_SIDE) is read from its preview
    instead, when `min_side` fits in it: the picture the scan or upload decoded, stored
    upright as a small JPEG under the content's hash, so the bytes embedded are those the row's
    hash names without a second decode of the original."""
    if isinstance(src, str):
        src = ImageSource(src)
    if 0 < min_side <= PREVIEW_SIDE:
        preview = _open_preview(store, src.storage_path, min_side, max_pixels)
        if preview is not None:
            return preview
    try:
        with (
            _opened(store, list(roots), src) as f,
            untrusted_image(f, max_pixels=max_pixels) as im,
        ):
            if min_side:
                im.draft("RGB", (min_side, min_side))  # no-op for formats other than JPEG
            # Stored originals keep their EXIF orientation.
            return ImageOps.exif_transpose(im).convert("RGB")
    except (DomainError, OSError, ValueError) as e:  # untrusted_image: any decoder failure
        log.warning("cannot read %s for embedding: %s", src.source_path or src.storage_path, e)
        if on_failure is not None:
            on_failure(failure_reason(e), may_pass(e))
        return None


def _open_preview(
    store: ImageStore, storage_path: str, min_side: int, max_pixels: int
) -> PILImage.Image | None:
    """The stored preview of an original, RGB, decoded at the smallest scale keeping both sides
    >= `min_side`; None when there is none (a small photo, or stored before previews) or it
    cannot be read: the original is read then."""
    try:
        path = store.path(store.preview_relpath(storage_path))
        with open_regular_file(path) as f, untrusted_image(f, max_pixels=max_pixels) as im:
            im.draft("RGB", (min_side, min_side))
            return im.convert("RGB")
    except FileNotFoundError:
        return None
    except (DomainError, OSError, ValueError) as e:
        log.warning("cannot read the preview of %s; reading the original: %s", storage_path, e)
        return None


def decode_side(bundle: ClipBundle, *, crops: bool = True) -> int:
    """Smallest side an image is decoded at (0 = at full size): for the crops' pass twice the
    model's input side, so that a 60 % crop still has more pixels than the model reads; for the
    whole-image pass (pooled and late regions included: they come from the model's input) the
    input side itself, which lets a JPEG decode at a quarter or an eighth of its size (a 1600x1200
    photo: 400x300 in ~2/3 of the time at 800x600, and its resize to the input in half the
    time: bench/index_speed.py)."""
    size = getattr(getattr(bundle.model, "visual", None), "image_size", None)
    scale = 2 if crops else 1
    if isinstance(size, int):
        return scale * size
    if isinstance(size, tuple | list):
        sides = [v for v in size if isinstance(v, int)]
        if sides and len(sides) == len(size):
            return scale * max(sides)
    return 0


def embedding_threads(ctx: JobContext) -> int:
    """Torch threads for the next batch: POLAR_THREADS__EMBEDDING, or with 0 every core while
    no search of this process is in flight and one while any is (asked again at each batch, so
    a search that arrives mid-job gets the other cores from the next batch on)."""
    threads = ctx.settings.threads.embedding
    if threads > 0:
        return threads
    foreground = ctx.env.foreground
    return 1 if foreground is not None and foreground.active_count > 0 else cpu_count()


def _stamp(
    size: int | None, mtime_ns: int | None, ctime_ns: int | None, ino: int | None
) -> FileStamp | None:
    return None if size is None or mtime_ns is None else FileStamp(size, mtime_ns, ctime_ns, ino)


def _pending(
    ctx: JobContext, image_ids: Sequence[str] | None, model_id: str, region_key: str | None = None
) -> list[tuple[str, ImageSource]]:
    """(id, where its bytes are) of the user's readable images (among `image_ids`) that lack an
    embedding by `model_id` or, with `region_key`, regions stored as `region_key`
    (repositories.images_to_embed)."""
    with session_scope(ctx.session_factory) as s:
        rows = repositories.images_to_embed(
            db_session=s,
            user_id=ctx.user_id,
            model_id=model_id,
            image_ids=image_ids,
            region_key=region_key,
        )
        return [
            (i, ImageSource(p, sp, lp, _stamp(size, m, c, ino)))
            for i, p, sp, lp, size, m, c, ino in rows
        ]


def region_key(search: SearchSettings, bundle: ClipBundle) -> str:
    """The `region_layout` that images embedded now get ("five", "five-pooled", "five-both",
    "none"): rows with another are stale (GET /index, rebuild)."""
    return stored_layout(search.regions, region_method(bundle, search.region_method))


def embed_pending(
    ctx: JobContext, image_ids: Sequence[str] | None, serving: ServingModel | None = None
) -> int:
    """Embed the user's listed images (None: all) that lack an embedding from the serving model,
    then the crops (app.ml.regions) of those that lack the configured layout's; returns how
    many images were touched.

    Whole-image embeddings come first and are published as they land (at most every
    PUBLISH_INTERVAL_S), so a new library is searchable after the cheap pass; the crops cost
    R more encodes per image (bench/region_cost.py) and only refine queries naming several
    concepts, so they follow. Progress counts encodes: a crop costs as much as a whole image.
    With POLAR_SEARCH__REGION_METHOD=pooled or late the regions come with the whole image's own
    pass (late: plus the last blocks re-run per box, app.ml.region_late) and are stored with
    it; images whose regions are stale cost one encode each. With "both" the pooled regions
    are stored by the first pass, so queries naming several concepts are re-ranked by them at
    once, and the crops follow; a kind of region an image already has for the layout is kept,
    not encoded again.
    """
    serving = serving or ctx.serving()
    model_id, bundle = serving.model_id, serving.bundle
    layout = ctx.settings.search.regions
    method = region_method(bundle, ctx.settings.search.region_method)
    key = region_key(ctx.settings.search, bundle)  # what region_layout says of the regions
    boxes = len(layout_boxes(layout))
    # pooled, late and both: the first pass makes the regions with the whole image's pass and
    # stores them at once ("five-pooled", "five-late"); both then adds the crops in the second.
    first_kind = {"pooled": "pooled", "both": "pooled", "late": "late"}.get(method)
    first_kind = first_kind if boxes else None
    first_key = stored_layout(layout, first_kind) if first_kind else None
    one_pass = method in ("pooled", "late")
    cost = 1 if one_pass else boxes  # encodes per image for its regions
    store = ctx.store
    roots = [r.resolve() for r in ctx.settings.library.roots]
    whole_side, crop_side = decode_side(bundle, crops=False), decode_side(bundle)
    max_pixels = ctx.settings.limits.max_pixels  # the files are checked again as uploads are
    # ONNX Runtime for whole images and crops where installed and equal (app.ml.onnx_engine)
    engine = image_engine(bundle, ctx.settings.data_dir / "onnx", ctx.settings.model.onnx)
    # An image whose file could not be read is not read again by every pass: only once the file
    # changes (a rescan or a new upload of the bytes clears embed_error) or a rebuild is asked.
    whole = _pending(ctx, image_ids, model_id)
    crops_left = len(_pending(ctx, image_ids, model_id, key)) if boxes else 0
    total = max(1, len(whole) + cost * ((0 if one_pass else len(whole)) + crops_left))
    work = 0
    last_publish, unpublished = time.monotonic(), False

    def decode(batch: list[tuple[str, ImageSource]]) -> _Decoded:
        failed: dict[str, tuple[str, bool]] = {}
        pictures = {
            i: im
            for i, p in batch
            if (
                im := _open_rgb(
                    store, p, whole_side, roots, max_pixels, on_failure=_note(failed, i)
                )
            )
            is not None
        }
        # Without pooling the model needs only the preprocessed pixels: made here too, in the
        # decoding thread, so the model's thread runs the tower alone (issue 32).
        pixels = None if first_kind else preprocess_images(bundle, list(pictures.values()))
        return _Decoded(batch, pictures, failed, pixels=pixels)

    # The next batch is decoded in a second thread while the model runs on this one.
    for part in _ahead(_batches(whole), decode):
        batch = part.batch
        decoded = list(part.pictures.items())
        _record_failures(ctx, part.failed)
        if decoded:
            with cpu_threads(embedding_threads(ctx)):
                pictures = [im for _, im in decoded]
                if first_kind:  # (B, D) and (B, R, D) from one pass
                    vectors, regions = embed_with_regions(bundle, pictures, layout, first_kind)
                else:
                    assert part.pixels is not None
                    vectors, regions = encode_pixels(bundle, part.pixels, engine=engine), None
            with session_scope(ctx.session_factory) as s:
                for n, ((image_id, _), vec) in enumerate(zip(decoded, vectors, strict=True)):
                    # A row deleted meanwhile simply matches nothing. Crops of another model
                    # are dropped with its embedding.
                    repositories.store_embedding(
                        db_session=s,
                        user_id=ctx.user_id,
                        image_id=image_id,
                        embedding=vec.tobytes(),
                        model_id=model_id,
                        # A vec_id names one vector, never a row: the index caches of every
                        # process see a re-embedded row as one vector gone, one new.
                        vec_id=new_vec_id(),
                        region_embeddings=None if regions is None else pack_regions(regions[n]),
                        region_layout=None if regions is None else first_key,
                    )
                unpublished = True
                if time.monotonic() - last_publish >= PUBLISH_INTERVAL_S:
                    repositories.bump_index_generation(db_session=s, user_id=ctx.user_id)
                    last_publish, unpublished = time.monotonic(), False
        work += len(batch)
        ctx.progress(work / total)
    if unpublished:
        with session_scope(ctx.session_factory) as s:
            repositories.bump_index_generation(db_session=s, user_id=ctx.user_id)
    crops = _pending(ctx, image_ids, model_id, key) if boxes else []
    total = max(1, work + cost * len(crops))
    kinds = method_kinds(method)

    # Each kind from the picture its pass would decode: the crops from twice the model's side,
    # the pooled and late regions from the whole pass's (so a rebuild stores what the first
    # pass does).
    kind_side = {"crops": crop_side, "pooled": whole_side, "late": whole_side}

    def decode_lacking(batch: list[tuple[str, ImageSource]]) -> _Decoded:
        found = _stored_kinds(ctx, [i for i, _ in batch], layout, bundle.embed_dim)
        # Only an image lacking a kind is decoded, at that kind's side: after a switch between
        # methods every row may be stored already, and a re-pack costs no decode.
        failed: dict[str, tuple[str, bool]] = {}
        by_kind: dict[str, dict[str, PILImage.Image]] = {kind: {} for kind in kinds}
        ready = []
        for i, p in batch:
            lacking = [kind for kind in kinds if kind not in found.get(i, {})]
            for kind in lacking:
                side = kind_side[kind]
                im = _open_rgb(store, p, side, roots, max_pixels, on_failure=_note(failed, i))
                if im is None:
                    break
                by_kind[kind][i] = im
            else:
                ready.append(i)
        return _Decoded(batch, {}, failed, found, set(ready), by_kind)

    for part in _ahead(_batches(crops), decode_lacking):
        batch, found, ready = part.batch, part.found, [i for i, _ in part.batch if i in part.ready]
        _record_failures(ctx, part.failed)
        if ready:
            with cpu_threads(embedding_threads(ctx)):
                regions = _regions_of(bundle, ready, part.by_kind, found, layout, method, engine)
            with session_scope(ctx.session_factory) as s:
                for image_id, reg in zip(ready, regions, strict=True):
                    # Only next to an embedding of the same model (a model switch may race).
                    repositories.store_regions(
                        db_session=s,
                        user_id=ctx.user_id,
                        image_id=image_id,
                        model_id=model_id,
                        region_embeddings=pack_regions(reg),
                        region_layout=key,
                    )
        work += cost * len(batch)
        ctx.progress(work / total)
    return len({i for i, _ in whole} | {i for i, _ in crops})


@dataclass
class _Decoded:
    """One batch of a pass, read: its images' pictures (those that could be decoded), why the
    others could not (`failed`), and for the region pass the kinds each image has stored."""

    batch: list[tuple[str, ImageSource]]
    pictures: dict[str, PILImage.Image]
    failed: dict[str, tuple[str, bool]]
    found: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    ready: set[str] = field(default_factory=set)  # region pass: every lacking kind decoded
    by_kind: dict[str, dict[str, PILImage.Image]] = field(default_factory=dict)  # region pass
    pixels: torch.Tensor | None = None  # the pictures preprocessed, in order (whole pass)


def _batches(items: list[T]) -> list[list[T]]:
    """The items in batches of FIRST_BATCH, twice that, ... up to BATCH: the model starts on
    the first few photos while the next are decoded, instead of waiting for BATCH decodes."""
    out, start, size = [], 0, min(FIRST_BATCH, BATCH)
    while start < len(items):
        out.append(items[start : start + size])
        start, size = start + size, min(2 * size, BATCH)
    return out


def _ahead(items: Sequence[T], work: Callable[[T], R]) -> Iterator[R]:
    """work(item) for each item, in order, with the next item's work running in a second thread
    while the caller uses this one's result: decoding (Pillow lets go of the GIL) overlaps the
    model's pass, so a pass takes about the longer of the two rather than their sum. At most
    one item is worked ahead (memory: two batches of pictures). The thread is made by the
    calling job thread, so it inherits its lowered priority (app/runtime/priority.py). An
    exception of `work` is raised where its result is taken; leaving the loop early waits for
    the item in flight."""
    if not items:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="polar-decode") as pool:
        pending = pool.submit(work, items[0])
        for item in items[1:]:
            done = pending.result()
            pending = pool.submit(work, item)
            yield done
        yield pending.result()


def _note(failed: dict[str, tuple[str, bool]], image_id: str) -> Callable[[str, bool], None]:
    """An `on_failure` for `_open_rgb` that files (reason, may pass) under `image_id`."""
    return lambda reason, transient: failed.__setitem__(image_id, (reason, transient))


def _record_failures(ctx: JobContext, failed: dict[str, tuple[str, bool]]) -> None:
    """Store why each image could not be read (embed_error): it leaves the passes that follow
    until its file changes, and GET /index counts it as failed, not pending."""
    if not failed:
        return
    with session_scope(ctx.session_factory) as s:
        for image_id, (reason, transient) in failed.items():
            repositories.set_embed_error(
                db_session=s,
                user_id=ctx.user_id,
                image_id=image_id,
                reason=reason,
                transient=transient,
            )


def _layout_of(key: str | None) -> str | None:
    """The layout of a stored layout key; None for none or a key this version does not know."""
    if key is None:
        return None
    try:
        return parse_stored_layout(key)[0]
    except ValueError:
        return None


def _stored_kinds(
    ctx: JobContext, ids: Sequence[str], layout: str, dim: int
) -> dict[str, dict[str, np.ndarray]]:
    """The region rows by kind that the images already have stored for `layout`."""
    found: dict[str, dict[str, np.ndarray]] = {}
    with session_scope(ctx.session_factory) as s:
        rows = repositories.stored_regions(db_session=s, user_id=ctx.user_id, image_ids=ids)
        for image_id, blob, key in rows:
            if _layout_of(key) == layout:
                found[image_id] = split_regions(unpack_regions(blob, dim), key)
    return found


def _regions_of(
    bundle: ClipBundle,
    ids: Sequence[str],
    pictures: Mapping[str, Mapping[str, PILImage.Image]],
    found: dict[str, dict[str, np.ndarray]],
    layout: str,
    method: str,
    engine: ImageEngine | None = None,
) -> np.ndarray:
    """The images' region rows for the layout and a resolved method, (B, R_total, D).

    A kind of region an image already has stored for this layout (`found`: its pooled regions
    from the first pass, its crops from before a switch to "both", either from before a switch
    back) is reused, so only what is missing is encoded, from `pictures` (by kind, the images
    that lack it, each decoded at its pass's side): a switch from crops to both costs one pass
    per image, not R + 1, and a switch from both to one kind none.
    """
    boxes = layout_boxes(layout)
    out = np.empty((len(ids), len(method_kinds(method)) * len(boxes), bundle.embed_dim), np.float32)
    for n_kind, kind in enumerate(method_kinds(method)):
        rows_of = slice(n_kind * len(boxes), (n_kind + 1) * len(boxes))
        lacking = [n for n, i in enumerate(ids) if kind not in found.get(i, {})]
        if lacking:
            sub = [pictures[kind][ids[n]] for n in lacking]
            out[lacking, rows_of] = encode_regions_by(bundle, sub, layout, kind, engine)
        for n, image_id in enumerate(ids):
            if kind in found.get(image_id, {}):
                out[n, rows_of] = found[image_id][kind]
    return out


def embed_images_job(ctx: JobContext) -> None:
    """Handler of `embed_images` (payload {"image_ids": [...]}); embedded ones are skipped."""
    embed_pending(ctx, list(ctx.payload.get("image_ids") or []))


def rebuild_index_job(ctx: JobContext) -> None:
    """Handler of `rebuild_index`: (re-)embed every image of the user not embedded by this model;
    an image whose file could not be read before is tried once more (asked for by the user:
    a file whose permissions or share were fixed, which changed neither its size nor time)."""
    with session_scope(ctx.session_factory) as s:
        repositories.clear_embed_errors(db_session=s, user_id=ctx.user_id)
    embed_pending(ctx, None)
    with session_scope(ctx.session_factory) as s:
        repositories.bump_index_generation(db_session=s, user_id=ctx.user_id)


@dataclass(frozen=True)
class IndexStatus:
    """How much of a user's library the serving model can search, and how well."""

    images: int
    embedded: int  # embedded by the serving model (searchable)
    failed: int  # not embedded by it: the file could not be read or decoded (embed_error)
    with_regions: int  # ... that also have regions of the configured layout and method
    region_layout: str  # the stored key: "five", "five-pooled" or "none"
    rebuild_job: Job | None  # a queued or running rebuild, if any

    @property
    def pending(self) -> int:
        """Not embedded by the serving model yet, and not failed: what a pass will embed."""
        return self.images - self.embedded - self.failed


def index_status(db_session: Session, user_id: str, model_id: str, layout: str) -> IndexStatus:
    """Counts for GET /index (one query); `layout` is the stored key (`stored_layout`)."""
    counts = repositories.index_counts(
        db_session=db_session, user_id=user_id, model_id=model_id, layout=layout
    )
    return IndexStatus(
        images=counts.images,
        embedded=counts.embedded,
        failed=counts.failed,
        with_regions=counts.with_regions if layout != "none" else 0,
        region_layout=layout,
        rebuild_job=repositories.open_rebuild_job(db_session=db_session, user_id=user_id),
    )


def request_rebuild(db_session: Session, user_id: str, queue: JobQueue) -> tuple[Job, bool]:
    """Queue a rebuild_index job (embeds what the serving model and region layout lack), or
    return the one already queued or running; (job, created). Commits."""
    open_job = repositories.open_rebuild_job(db_session=db_session, user_id=user_id)
    if open_job is not None:
        return open_job, False
    job = repositories.add_job(
        db_session=db_session, user_id=user_id, kind=JobKind.REBUILD_INDEX.value, payload={}
    )
    db_session.commit()
    enqueue_committed(queue, job)
    return job, True
