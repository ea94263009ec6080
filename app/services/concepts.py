"""Personal concepts: create from photos, list, rename, recategorise, add photos, delete.

Versions: anything that changes what the adapter must learn bumps `version` and queues one
`train_concept` job for the new version (app/services/training.py): more photos, or a new
category (the category is part of the placeholder phrase "sks <category>" the adapter is trained
on). Renaming alone retrains nothing: the name is only matched in queries, never encoded.

Photos are stored like library images (content-addressed, validated by ImageStore.stage) and are
all-or-nothing: one bad photo rejects the request and nothing of it is stored. A photo sent twice
counts once. Photos can also be images already in the user's library (`image_ids`): the concept
photo then shares the library image's stored file (nothing is copied; a file is deleted only
when no row uses it any more).
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import repositories
from app.config import LimitSettings, TrainingSettings
from app.errors import (
    DuplicateConceptName,
    InvalidCategory,
    InvalidConceptName,
    InvalidImage,
    LibraryUnavailable,
    NotFound,
    PhotoCountOutOfRange,
    ValidationFailed,
)
from app.ml.tokens import SHARED_TOKEN
from app.ml.train import placeholder_phrase
from app.models import Concept, ConceptExample, ConceptState, Image, Job, JobKind, new_id
from app.services import jobs
from app.services.images import (
    IncomingFile,
    PhotoEnv,
    delete_unused_files,
    ensure_unchanged,
    stage_all,
)
from app.services.jobs import enqueue_committed
from app.services.query import normalize_name
from app.storage import ImageStore, StagedImage, is_gone_error, open_library_file

log = logging.getLogger(__name__)

MAX_NAME_CHARS = 64
MAX_CATEGORY_CHARS = 40  # the phrase must leave room in a 32-token context (demo model)


class _Keep(enum.Enum):
    KEEP = "keep"


KEEP = _Keep.KEEP  # "leave this field as it is" (None means "remove the category")


@dataclass(frozen=True)
class ConceptView:
    """A concept with what its API representation needs besides the row."""

    concept: Concept
    example_count: int
    job_id: str | None  # the job training the current version

    @property
    def placeholder(self) -> str:
        return placeholder_phrase(self.concept.token, self.concept.category)


@dataclass(frozen=True)
class ConceptChange:
    """A concept after a change, and the job retraining it (None: nothing retrains)."""

    view: ConceptView
    job: Job | None


@dataclass(frozen=True)
class ConceptPage:
    """One page of a listing; `next_cursor` is None on the last page."""

    items: list[ConceptView]
    next_cursor: str | None


# --- validation ---------------------------------------------------------------------------------


def clean_name(name: str) -> str:
    """The name to store: stripped; 1-64 characters with a letter or digit, no control chars."""
    name = name.strip()
    if not name:
        raise InvalidConceptName("the concept name is empty")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidConceptName(
            f"the concept name has {len(name)} characters; the limit is {MAX_NAME_CHARS}",
            detail={"max_chars": MAX_NAME_CHARS},
        )
    if not name.isprintable():
        raise InvalidConceptName("the concept name contains control characters")
    if not any(ch.isalnum() for ch in name):
        # Queries find names as whole words; punctuation alone is never a word.
        raise InvalidConceptName("the concept name needs at least one letter or digit")
    return name


def clean_category(category: str | None) -> str | None:
    """The category to store, whitespace collapsed; empty means none."""
    if category is None:
        return None
    category = " ".join(category.split())
    if not category:
        return None
    if len(category) > MAX_CATEGORY_CHARS:
        raise InvalidCategory(
            f"the category has {len(category)} characters; the limit is {MAX_CATEGORY_CHARS}",
            detail={"max_chars": MAX_CATEGORY_CHARS},
        )
    if not category.isprintable() or not any(ch.isalnum() for ch in category):
        raise InvalidCategory("the category needs a letter or digit and no control characters")
    return category


def _photo_range_error(got: int, training: TrainingSettings, what: str) -> PhotoCountOutOfRange:
    lo, hi = training.min_photos, training.max_photos
    return PhotoCountOutOfRange(
        f"a concept needs {lo} to {hi} distinct photos; {what} {got}",
        code="too_few_photos" if got < lo else "too_many_photos",
        detail={"min_photos": lo, "max_photos": hi, "got": got},
    )


# --- reading -----------------------------------------------------------------------------------


def _get(db_session: Session, user_id: str, concept_id: str, *, lock: bool = False) -> Concept:
    concept = repositories.get_concept(
        db_session=db_session, user_id=user_id, concept_id=concept_id, lock=lock
    )
    if concept is None:
        raise NotFound.of("concept")
    return concept


def _check_name_free(
    db_session: Session, user_id: str, name: str, except_id: str | None = None
) -> None:
    if repositories.concept_name_taken(
        db_session=db_session, user_id=user_id, name_key=normalize_name(name), except_id=except_id
    ):
        raise DuplicateConceptName(f"you already have a concept named {name!r}")


def _views(db_session: Session, concepts: Sequence[Concept]) -> list[ConceptView]:
    ids = [c.id for c in concepts]
    counts = repositories.example_counts(db_session=db_session, concept_ids=ids)
    job_ids = repositories.current_training_jobs(db_session=db_session, concepts=concepts)
    return [ConceptView(c, counts.get(c.id, 0), job_ids.get(c.id)) for c in concepts]


def _view(db_session: Session, concept: Concept) -> ConceptView:
    return _views(db_session, [concept])[0]


# --- photos -------------------------------------------------------------------------------------


Photo = StagedImage | Image  # an upload to store, or a library image whose file is shared


def _distinct(photos: Iterable[Photo], known: set[str]) -> list[Photo]:
    """The photos whose content is not in `known` nor earlier in the list."""
    seen = set(known)
    out = []
    for p in photos:
        if p.sha256 not in seen:
            seen.add(p.sha256)
            out.append(p)
    return out


def library_photos(db_session: Session, user_id: str, image_ids: Sequence[str]) -> list[Image]:
    """The user's library images by id, in the order asked; NotFound if one is missing/foreign."""
    found = repositories.get_images(db_session=db_session, user_id=user_id, image_ids=image_ids)
    missing = [i for i in image_ids if i not in found]
    if missing:
        raise NotFound(
            f"image not found: {missing[0]}" if len(missing) == 1 else "images not found",
            detail={"image_ids": missing},
        )
    return [found[i] for i in image_ids]


def _copies_of_folder_photos(
    db_session: Session,
    store: ImageStore,
    limits: LimitSettings,
    user_id: str,
    images: Sequence[Image],
    roots: Sequence[Path],
) -> tuple[list[Photo], list[StagedImage]]:
    """Library images as concept photos. An uploaded one shares its stored file; one indexed in
    place (a folder library) is copied into the store, validated like an upload, so the concept
    keeps its photos whatever later happens to the folder. Returns (photos, the staged copies)."""
    photos: list[Photo] = []
    copies: list[StagedImage] = []
    try:
        for image in images:
            if image.source_path is None or image.library_id is None:
                photos.append(image)
                continue
            library = repositories.get_library(
                db_session=db_session, user_id=user_id, library_id=image.library_id
            )
            try:
                if library is None:
                    raise ValueError("its library is gone")
                try:  # no link followed on the way; a FIFO swapped in would hang the request
                    path, f = open_library_file(image.source_path, library.path, list(roots))
                except InvalidImage as e:
                    raise ValueError(e.message) from e
                with f:
                    # The bytes the image was indexed (and shown, and embedded) as, or none.
                    ensure_unchanged(image, os.fstat(f.fileno()))
                    copy = store.stage(
                        f,
                        path.name,
                        max_bytes=limits.max_upload_bytes,
                        max_pixels=limits.max_pixels,
                    )
            except OSError as e:
                if not is_gone_error(e):
                    raise LibraryUnavailable(
                        f"the photo {image.id} cannot be read from its folder right now "
                        f"({e.strerror or e}); try again once it is back (a network share may "
                        "have dropped)",
                        detail={"image_ids": [image.id]},
                    ) from e
                raise NotFound(
                    f"the photo {image.id} is gone from its folder; rescan the library",
                    code="file_missing",
                    detail={"image_ids": [image.id]},
                ) from e
            except ValueError as e:
                raise NotFound(
                    f"the photo {image.id} cannot be read from its folder any more; rescan "
                    "the library",
                    code="file_missing",
                    detail={"image_ids": [image.id]},
                ) from e
            copies.append(copy)
            photos.append(copy)
    except BaseException:
        for c in copies:
            store.discard(c)
        raise
    return photos, copies


def _gather_photos(
    env: PhotoEnv, user_id: str, files: Sequence[IncomingFile], image_ids: Sequence[str]
) -> tuple[list[StagedImage], list[Photo], list[StagedImage]]:
    """(uploads staged, library photos, every staged file to discard unless committed)."""
    db_session, store, limits = env.db_session, env.store, env.limits
    library, copies = _copies_of_folder_photos(
        db_session,
        store,
        limits,
        user_id,
        library_photos(db_session, user_id, image_ids),
        env.library_roots,
    )
    try:
        uploads = stage_all(files, store, limits)
    except BaseException:
        for c in copies:
            store.discard(c)
        raise
    return uploads, library, [*uploads, *copies]


def _add_examples(
    db_session: Session,
    store: ImageStore,
    concept_id: str,
    photos: Sequence[Photo],
    version: int,
    created_paths: list[str],
) -> None:
    """Store the photos and add their rows (appends new files to created_paths)."""
    for p in photos:
        if isinstance(p, Image):
            storage_path = p.storage_path  # the library's file, shared
        else:
            storage_path, created = store.commit(p)
            if created:
                created_paths.append(storage_path)
        db_session.add(
            ConceptExample(
                id=new_id(),
                concept_id=concept_id,
                sha256=p.sha256,
                storage_path=storage_path,
                mime=p.mime,
                width=p.width,
                height=p.height,
                version_added=version,
            )
        )


def _queue_training(db_session: Session, concept: Concept) -> Job:
    return jobs.create_job(
        db_session=db_session,
        user_id=concept.user_id,
        kind=JobKind.TRAIN_CONCEPT,
        payload={"concept_id": concept.id, "version": concept.version},
    )


def _start_new_version(concept: Concept) -> None:
    """The concept retrains: next version, no metrics until it is trained."""
    concept.version += 1
    concept.state = ConceptState.TRAINING.value
    concept.metrics = None
    concept.retention_score = None
    concept.retention_flagged = False


def start_new_version(db_session: Session, concept: Concept) -> Job:
    """The concept's next version, queued for training (flushed, not committed): what a change
    of what it learns from does (more photos, a new category, a person's marks)."""
    _start_new_version(concept)
    db_session.flush()
    return _queue_training(db_session, concept)


# --- use cases ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewPhotos:
    """A concept's photos as a request sends them: uploaded files and the user's library
    images, together."""

    files: Sequence[IncomingFile] = ()
    image_ids: Sequence[str] = ()


def create_concept(
    user_id: str, name: str, category: str | None, photos_sent: NewPhotos, env: PhotoEnv
) -> ConceptChange:
    """Store a new concept (version 1, `env.training`) with its photos and queue its training."""
    db_session, store, training = env.db_session, env.store, env.training
    files = photos_sent.files
    name, category = clean_name(name), clean_category(category)
    image_ids = list(dict.fromkeys(photos_sent.image_ids))  # an id sent twice is one photo
    sent = len(files) + len(image_ids)
    if sent < training.min_photos:
        raise _photo_range_error(sent, training, "got")
    _check_name_free(db_session, user_id, name)
    uploads, library, staged = _gather_photos(env, user_id, files, image_ids)
    created_paths: list[str] = []
    try:
        # The maximum is checked here, on distinct photos: the same bytes sent twice count once
        # (the form's file limit bounds what is read before).
        photos = _distinct([*uploads, *library], set())
        if not training.min_photos <= len(photos) <= training.max_photos:
            raise _photo_range_error(len(photos), training, "got (duplicates count once)")
        concept = Concept(
            id=new_id(),
            user_id=user_id,
            name=name,
            name_key=normalize_name(name),
            category=category,
            token=SHARED_TOKEN,  # a distinct token, if configured, is picked when it trains
            state=ConceptState.TRAINING.value,
            version=1,
        )
        db_session.add(concept)
        db_session.flush()
        _add_examples(db_session, store, concept.id, photos, 1, created_paths)
        job = _queue_training(db_session, concept)
        db_session.commit()
    except BaseException as e:
        db_session.rollback()
        delete_unused_files(db_session, store, created_paths)
        if isinstance(e, IntegrityError):
            raise DuplicateConceptName(f"you already have a concept named {name!r}") from e
        raise
    finally:
        for s in staged:
            store.discard(s)  # no-op for the committed ones
    enqueue_committed(env.queue, job)
    return ConceptChange(ConceptView(concept, len(photos), job.id), job)


def list_concepts(
    user_id: str, *, db_session: Session, limit: int, cursor: str | None = None
) -> ConceptPage:
    """A page of the user's concepts, oldest first, by (created_at, id) cursor."""
    page = repositories.list_concepts_page(
        db_session=db_session, user_id=user_id, limit=limit, cursor=cursor
    )
    return ConceptPage(_views(db_session, page.items), page.next_cursor)


def get_concept(user_id: str, concept_id: str, *, db_session: Session) -> ConceptView:
    """One of the user's concepts; NotFound for a missing or foreign id alike."""
    return _view(db_session, _get(db_session, user_id, concept_id))


def list_examples(user_id: str, concept_id: str, *, db_session: Session) -> list[ConceptExample]:
    """The photos one of the user's concepts was taught from, oldest first."""
    concept = _get(db_session, user_id, concept_id)
    return repositories.list_examples(db_session=db_session, concept_id=concept.id)


def get_example(
    user_id: str, concept_id: str, example_id: str, *, db_session: Session
) -> ConceptExample:
    """One photo of one of the user's concepts; NotFound for a missing or foreign id alike."""
    example = repositories.get_example(
        db_session=db_session, user_id=user_id, concept_id=concept_id, example_id=example_id
    )
    if example is None:
        raise NotFound.of("concept photo")
    return example


def update_concept(
    user_id: str,
    concept_id: str,
    env: PhotoEnv,
    *,
    name: str | None = None,
    category: str | _Keep | None = KEEP,
) -> ConceptChange:
    """Rename (no retraining) and/or change the category (new placeholder phrase: retrains)."""
    db_session = env.db_session
    if name is None and category is KEEP:
        raise ValidationFailed("send a new `name` and/or `category`")
    new_name = clean_name(name) if name is not None else None
    new_category = category if category is KEEP else clean_category(category)
    concept = _get(db_session, user_id, concept_id, lock=True)
    job = None
    try:
        if new_name is not None:
            _check_name_free(db_session, user_id, new_name, except_id=concept.id)
            concept.name, concept.name_key = new_name, normalize_name(new_name)
        if new_category is not KEEP and new_category != concept.category:
            concept.category = new_category
            _start_new_version(concept)
            db_session.flush()
            job = _queue_training(db_session, concept)
        db_session.commit()
    except IntegrityError as e:
        db_session.rollback()
        raise DuplicateConceptName(f"you already have a concept named {new_name!r}") from e
    except BaseException:
        db_session.rollback()
        raise
    enqueue_committed(env.queue, job)
    return ConceptChange(_view(db_session, concept), job)


def add_examples(
    user_id: str, concept_id: str, photos_sent: NewPhotos, env: PhotoEnv
) -> ConceptChange:
    """Add photos (a new version trains on all of them); the total stays within max_photos."""
    db_session, store, training = env.db_session, env.store, env.training
    files = photos_sent.files
    _get(db_session, user_id, concept_id)  # 404 before reading any upload
    image_ids = list(dict.fromkeys(photos_sent.image_ids))  # an id sent twice is one photo
    if not files and not image_ids:
        raise ValidationFailed(
            "send at least one photo: files in the form field 'files' or library images in "
            "'image_ids'"
        )
    uploads, library, staged = _gather_photos(env, user_id, files, image_ids)
    created_paths: list[str] = []
    try:
        concept = _get(db_session, user_id, concept_id, lock=True)
        known = repositories.example_hashes(db_session=db_session, concept_id=concept.id)
        photos = _distinct([*uploads, *library], known)
        if not photos:
            raise ValidationFailed(
                "every photo sent is already a photo of this concept", code="no_new_photos"
            )
        total = len(known) + len(photos)
        if total > training.max_photos:
            raise _photo_range_error(
                total, training, f"it has {len(known)}, with these it would have"
            )
        _start_new_version(concept)
        _add_examples(db_session, store, concept.id, photos, concept.version, created_paths)
        db_session.flush()
        job = _queue_training(db_session, concept)
        db_session.commit()
    except BaseException:
        db_session.rollback()
        delete_unused_files(db_session, store, created_paths)
        raise
    finally:
        for s in staged:
            store.discard(s)
    enqueue_committed(env.queue, job)
    return ConceptChange(ConceptView(concept, total, job.id), job)


def delete_concept(
    user_id: str, concept_id: str, *, db_session: Session, store: ImageStore
) -> None:
    """Delete the concept, its photos' rows and adapters; files go when nothing else uses them."""
    concept = _get(db_session, user_id, concept_id)
    paths = repositories.example_storage_paths(db_session=db_session, concept_id=concept.id)
    repositories.delete_concept(db_session=db_session, concept_id=concept.id)
    db_session.commit()
    db_session.expunge(concept)
    # After the commit: a concurrent upload of the same content either committed first (and
    # keeps the file) or re-creates it in store.commit.
    delete_unused_files(db_session, store, sorted(paths))
