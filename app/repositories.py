"""Queries. Every lookup of a user-owned object filters by owner, so foreign ids look missing."""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass
from datetime import datetime
from pathlib import PurePath
from typing import Any, Generic, NamedTuple, TypeVar

import numpy as np
from sqlalchemy import Select, and_, case, delete, exists, func, insert, or_, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session, defer

from app.errors import InvalidCursor
from app.models import (
    Adapter,
    ApiKey,
    Concept,
    ConceptExample,
    ConceptState,
    ConceptVerdict,
    Image,
    Job,
    JobKind,
    JobState,
    Library,
    LibraryFolder,
    User,
    utcnow,
)

_MALFORMED_CURSOR = "malformed cursor: pass back next_cursor unchanged"


# --- keyset pagination, written once ------------------------------------------------------------


RowT = TypeVar("RowT")


@dataclass(frozen=True)
class Page(Generic[RowT]):
    """One page of a listing; `next_cursor` is None on the last page."""

    items: Sequence[RowT]
    next_cursor: str | None


def encode_cursor(created_at: datetime, row_id: str) -> str:
    """Opaque cursor just after the row keyed (created_at, id): url-safe base64, no padding."""
    raw = f"{created_at.isoformat()}|{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) key inside a cursor; InvalidCursor if we did not make it."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, row_id = raw.split("|")
        created_at = datetime.fromisoformat(stamp)
        uuid.UUID(row_id)
    except (binascii.Error, UnicodeError, ValueError) as e:
        raise InvalidCursor(_MALFORMED_CURSOR) from e
    if created_at.tzinfo is None:
        raise InvalidCursor(_MALFORMED_CURSOR)
    return created_at, row_id


def keyset_page(
    db_session: Session,
    query: Select[Any],
    *,
    created_at: InstrumentedAttribute[datetime],
    row_id: InstrumentedAttribute[str],
    limit: int,
    cursor: str | None,
    newest_first: bool = False,
) -> Page[Any]:
    """A page of `query`'s rows in (created_at, id) order, stable under concurrent inserts."""
    if cursor:
        at, key = decode_cursor(cursor)
        if newest_first:
            query = query.where(or_(created_at < at, and_(created_at == at, row_id < key)))
        else:
            query = query.where(or_(created_at > at, and_(created_at == at, row_id > key)))
    order = (created_at.desc(), row_id.desc()) if newest_first else (created_at, row_id)
    rows = db_session.scalars(query.order_by(*order).limit(limit + 1)).all()
    items = rows[:limit]
    last = items[-1] if len(rows) > limit else None
    return Page(items, encode_cursor(last.created_at, last.id) if last is not None else None)


def get_user(*, db_session: Session, user_id: str) -> User | None:
    """A user by id."""
    return db_session.get(User, user_id)


def get_api_key(*, db_session: Session, key_id: str) -> ApiKey | None:
    """An API key by id."""
    return db_session.get(ApiKey, key_id)


def get_api_key_by_hash(*, db_session: Session, key_hash: str) -> ApiKey | None:
    """The key whose sha256 is `key_hash` (revoked or not)."""
    return db_session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash))


def bump_index_generation(*, db_session: Session, user_id: str) -> None:
    """Tell every API process that the user's embedded image set changed."""
    db_session.execute(
        update(User)
        .where(User.id == user_id)
        .values(index_generation=User.index_generation + 1)
        .execution_options(synchronize_session=False)
    )


def get_image(*, db_session: Session, user_id: str, image_id: str) -> Image | None:
    """One of the user's images (None for a missing or foreign id)."""
    return db_session.scalar(select(Image).where(Image.id == image_id, Image.user_id == user_id))


def get_image_by_sha256(*, db_session: Session, user_id: str, sha256: str) -> Image | None:
    """The user's image with this content, if any."""
    return db_session.scalar(select(Image).where(Image.user_id == user_id, Image.sha256 == sha256))


def list_images_page(
    *,
    db_session: Session,
    user_id: str,
    limit: int,
    cursor: str | None = None,
    newest_first: bool = False,
) -> Page[Image]:
    """A page of the user's images, oldest (or newest) first."""
    return keyset_page(
        db_session,
        select(Image).where(Image.user_id == user_id),
        created_at=Image.created_at,
        row_id=Image.id,
        limit=limit,
        cursor=cursor,
        newest_first=newest_first,
    )


def get_images(*, db_session: Session, user_id: str, image_ids: Sequence[str]) -> dict[str, Image]:
    """id -> the user's image, for those of `image_ids` that exist and are the user's."""
    ids = list(dict.fromkeys(image_ids))
    found: dict[str, Image] = {}
    for start in range(0, len(ids), _IN_CHUNK):
        query = (
            select(Image)
            .options(defer(Image.embedding))
            .where(Image.user_id == user_id, Image.id.in_(ids[start : start + _IN_CHUNK]))
        )
        found.update((img.id, img) for img in db_session.scalars(query))
    return found


def storage_path_in_use(*, db_session: Session, storage_path: str) -> bool:
    """Whether any row (any user, image or concept example) still points at this file."""
    in_images = exists().where(Image.storage_path == storage_path)
    in_examples = exists().where(ConceptExample.storage_path == storage_path)
    return bool(db_session.scalar(select(or_(in_images, in_examples))))


def referenced_storage_paths(*, db_session: Session) -> set[str]:
    """Every stored file some row points at (any user, images and concept examples)."""
    return set(db_session.scalars(select(Image.storage_path).distinct())) | set(
        db_session.scalars(select(ConceptExample.storage_path).distinct())
    )


def add_job(*, db_session: Session, user_id: str, kind: str, payload: dict[str, Any]) -> Job:
    """A new queued job (flushed, so it has its id; the caller commits)."""
    job = Job(user_id=user_id, kind=kind, state=JobState.QUEUED.value, payload=payload)
    db_session.add(job)
    db_session.flush()
    return job


def get_job(*, db_session: Session, user_id: str, job_id: str) -> Job | None:
    """One of the user's jobs (None for a missing or foreign id)."""
    return db_session.scalar(select(Job).where(Job.id == job_id, Job.user_id == user_id))


# A job's state changes (app.services.job_runs), each a single statement on its row.


def set_running_progress(*, db_session: Session, job_id: str, fraction: float) -> None:
    """A running job's progress (a job no longer running keeps its own)."""
    db_session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.RUNNING.value)
        .values(progress=fraction, updated_at=utcnow())
    )


def claim_job(*, db_session: Session, job_id: str, runner: str | None) -> bool:
    """-> running (one more attempt, progress from 0, named `runner`) unless it is running or
    succeeded already; whether this caller got it."""
    result = db_session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.state.not_in([JobState.RUNNING.value, JobState.SUCCEEDED.value]),
        )
        .values(
            state=JobState.RUNNING.value,
            progress=0.0,
            attempts=Job.attempts + 1,
            runner=runner,
            started_at=utcnow(),
            finished_at=None,
            error_code=None,
            error_message=None,
            updated_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0))


def requeue_lost_run(*, db_session: Session, job_id: str, runner: str) -> bool:
    """-> queued, only if the job is still running under the name `runner`; whether it was."""
    result = db_session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.RUNNING.value, Job.runner == runner)
        .values(state=JobState.QUEUED.value, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0))


def touch_running_job(*, db_session: Session, job_id: str) -> None:
    """A running job's heartbeat: its row's updated_at is now."""
    db_session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.RUNNING.value)
        .values(updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def mark_job_queued(*, db_session: Session, job_id: str) -> None:
    """-> queued, unless it succeeded."""
    db_session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state != JobState.SUCCEEDED.value)
        .values(state=JobState.QUEUED.value, updated_at=utcnow())
    )


def mark_job_succeeded(*, db_session: Session, job_id: str) -> None:
    """-> succeeded, progress 1."""
    db_session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(
            state=JobState.SUCCEEDED.value,
            progress=1.0,
            finished_at=utcnow(),
            updated_at=utcnow(),
        )
    )


def mark_job_failed(*, db_session: Session, job_id: str, code: str, message: str) -> None:
    """-> failed with `code` (cut to the column's 64 characters) and `message`, unless it
    succeeded."""
    db_session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state != JobState.SUCCEEDED.value)
        .values(
            state=JobState.FAILED.value,
            error_code=code[:64],
            error_message=message,
            finished_at=utcnow(),
            updated_at=utcnow(),
        )
    )


def requeue_running_jobs(*, db_session: Session) -> int:
    """Every 'running' job back to 'queued' (their process died); how many."""
    result = db_session.execute(
        update(Job)
        .where(Job.state == JobState.RUNNING.value)
        .values(state=JobState.QUEUED.value, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def requeue_stale_running_jobs(*, db_session: Session, before: datetime) -> list[str]:
    """'running' jobs whose row was last touched before `before` (their worker stopped
    heartbeating) back to 'queued'; their ids, oldest first."""
    ids = list(
        db_session.scalars(
            select(Job.id)
            .where(Job.state == JobState.RUNNING.value, Job.updated_at < before)
            .order_by(Job.created_at, Job.id)
        )
    )
    if ids:
        db_session.execute(
            update(Job)
            .where(Job.id.in_(ids), Job.state == JobState.RUNNING.value)
            .values(state=JobState.QUEUED.value, updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    return ids


def take_waiting_jobs(*, db_session: Session, before: datetime, limit: int) -> list[str]:
    """Up to `limit` 'queued' jobs untouched since `before`, oldest first; each is touched, so
    a job is handed out again at most once per waiting period."""
    ids = list(
        db_session.scalars(
            select(Job.id)
            .where(Job.state == JobState.QUEUED.value, Job.updated_at < before)
            .order_by(Job.created_at, Job.id)
            .limit(limit)
        )
    )
    if ids:
        db_session.execute(
            update(Job)
            .where(Job.id.in_(ids), Job.state == JobState.QUEUED.value)
            .values(updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    return ids


# Jobs that embed a user's images not embedded yet (a library scan queues an embed job).
EMBEDDING_JOB_KINDS = (
    JobKind.EMBED_IMAGES.value,
    JobKind.REBUILD_INDEX.value,
    JobKind.SCAN_LIBRARY.value,
)


def users_with_unclaimed_pending_images(
    *, db_session: Session, quiet_since: datetime, limit: int
) -> list[str]:
    """Users with images never embedded (no embedding and no recorded read failure) that no
    job will embed: none of an embedding kind is queued or running, and none was touched since
    `quiet_since` (a job that just ended, even failed, is not replaced at once)."""
    claimed = exists().where(
        Job.user_id == Image.user_id,
        Job.kind.in_(EMBEDDING_JOB_KINDS),
        or_(
            Job.state.in_([JobState.QUEUED.value, JobState.RUNNING.value]),
            Job.updated_at >= quiet_since,
        ),
    )
    return list(
        db_session.scalars(
            select(Image.user_id)
            .where(Image.embedding.is_(None), Image.embed_error.is_(None), ~claimed)
            .distinct()
            .order_by(Image.user_id)
            .limit(limit)
        )
    )


def pending_image_ids(*, db_session: Session, user_id: str, limit: int) -> list[str]:
    """Up to `limit` of the user's images never embedded and not failed, oldest first."""
    return list(
        db_session.scalars(
            select(Image.id)
            .where(
                Image.user_id == user_id,
                Image.embedding.is_(None),
                Image.embed_error.is_(None),
            )
            .order_by(Image.created_at, Image.id)
            .limit(limit)
        )
    )


def queued_among(*, db_session: Session, job_ids: Sequence[str]) -> list[str]:
    """Those of `job_ids` that are still 'queued'."""
    return list(
        db_session.scalars(
            select(Job.id).where(Job.id.in_(list(job_ids)), Job.state == JobState.QUEUED.value)
        )
    )


def queued_job_ids(*, db_session: Session) -> list[str]:
    """Ids of every queued job, oldest first."""
    return list(
        db_session.scalars(
            select(Job.id)
            .where(Job.state == JobState.QUEUED.value)
            .order_by(Job.created_at, Job.id)
        )
    )


def list_jobs_page(
    *,
    db_session: Session,
    user_id: str,
    limit: int,
    cursor: str | None = None,
    state: str | None = None,
    kind: str | None = None,
) -> Page[Job]:
    """A page of the user's jobs, newest first, optionally of one state and kind."""
    query = select(Job).where(Job.user_id == user_id)
    if state is not None:
        query = query.where(Job.state == state)
    if kind is not None:
        query = query.where(Job.kind == kind)
    return keyset_page(
        db_session,
        query,
        created_at=Job.created_at,
        row_id=Job.id,
        limit=limit,
        cursor=cursor,
        newest_first=True,
    )


# --- concepts -----------------------------------------------------------------------------------


def get_concept(
    *, db_session: Session, user_id: str, concept_id: str, lock: bool = False
) -> Concept | None:
    """One of the user's concepts; `lock` re-reads it under a row lock (SELECT ... FOR UPDATE)."""
    query = select(Concept).where(Concept.id == concept_id, Concept.user_id == user_id)
    if lock:  # another request may have just bumped the version: take the row as it is now
        query = query.with_for_update().execution_options(populate_existing=True)
    return db_session.scalar(query)


def concept_name_taken(
    *, db_session: Session, user_id: str, name_key: str, except_id: str | None = None
) -> bool:
    """Whether another of the user's concepts has this normalised name."""
    query = select(Concept.id).where(Concept.user_id == user_id, Concept.name_key == name_key)
    if except_id is not None:
        query = query.where(Concept.id != except_id)
    return db_session.scalar(query.limit(1)) is not None


def list_concepts_page(
    *, db_session: Session, user_id: str, limit: int, cursor: str | None = None
) -> Page[Concept]:
    """A page of the user's concepts, oldest first."""
    return keyset_page(
        db_session,
        select(Concept).where(Concept.user_id == user_id),
        created_at=Concept.created_at,
        row_id=Concept.id,
        limit=limit,
        cursor=cursor,
    )


def example_counts(*, db_session: Session, concept_ids: Sequence[str]) -> dict[str, int]:
    """concept id -> number of photos (concepts without photos are absent)."""
    rows = db_session.execute(
        select(ConceptExample.concept_id, func.count())
        .where(ConceptExample.concept_id.in_(concept_ids))
        .group_by(ConceptExample.concept_id)
    ).all()
    return {concept_id: int(n) for concept_id, n in rows}


def example_hashes(*, db_session: Session, concept_id: str) -> set[str]:
    """The content hashes of a concept's photos."""
    return set(
        db_session.scalars(
            select(ConceptExample.sha256).where(ConceptExample.concept_id == concept_id)
        )
    )


def list_examples(*, db_session: Session, concept_id: str) -> list[ConceptExample]:
    """A concept's photos, oldest first, without their embeddings."""
    query = (
        select(ConceptExample)
        .options(defer(ConceptExample.embedding))
        .where(ConceptExample.concept_id == concept_id)
        .order_by(ConceptExample.created_at, ConceptExample.id)
    )
    return list(db_session.scalars(query))


def get_example(
    *, db_session: Session, user_id: str, concept_id: str, example_id: str
) -> ConceptExample | None:
    """One photo of one of the user's concepts (None for a missing or foreign id)."""
    query = (
        select(ConceptExample)
        .options(defer(ConceptExample.embedding))
        .join(Concept, Concept.id == ConceptExample.concept_id)
        .where(
            ConceptExample.id == example_id,
            ConceptExample.concept_id == concept_id,
            Concept.user_id == user_id,
        )
    )
    return db_session.scalar(query)


def example_storage_paths(*, db_session: Session, concept_id: str) -> list[str]:
    """The stored files of a concept's photos, sorted."""
    return sorted(
        set(
            db_session.scalars(
                select(ConceptExample.storage_path).where(ConceptExample.concept_id == concept_id)
            )
        )
    )


def current_training_jobs(*, db_session: Session, concepts: Sequence[Concept]) -> dict[str, str]:
    """concept id -> id of the newest job training its current version (one user's concepts)."""
    if not concepts:
        return {}
    wanted = {c.id: c.version for c in concepts}
    rows = db_session.scalars(
        select(Job)
        .where(
            Job.user_id == concepts[0].user_id,
            Job.kind == JobKind.TRAIN_CONCEPT.value,
            Job.payload["concept_id"].as_string().in_(list(wanted)),
        )
        .order_by(Job.created_at, Job.id)
    ).all()
    found: dict[str, str] = {}
    for job in rows:  # oldest first: the newest match wins
        concept_id = job.payload.get("concept_id")
        if concept_id in wanted and job.payload.get("version") == wanted[concept_id]:
            found[concept_id] = job.id
    return found


def delete_concept(*, db_session: Session, concept_id: str) -> None:
    """Core DELETE; the database cascades to photos and adapters (ON DELETE CASCADE)."""
    db_session.execute(
        delete(Concept).where(Concept.id == concept_id).execution_options(synchronize_session=False)
    )


# Training (app.services.training): a concept version's photos, tokens and adapter.


def other_concept_tokens(*, db_session: Session, user_id: str, concept_id: str) -> set[str]:
    """The tokens of the user's other concepts."""
    return set(
        db_session.scalars(
            select(Concept.token).where(Concept.user_id == user_id, Concept.id != concept_id)
        )
    )


def get_adapter(*, db_session: Session, concept_id: str, version: int) -> Adapter | None:
    """The adapter stored for one version of a concept, if any."""
    return db_session.scalar(
        select(Adapter).where(Adapter.concept_id == concept_id, Adapter.version == version)
    )


def examples_up_to(*, db_session: Session, concept_id: str, version: int) -> list[ConceptExample]:
    """A concept's photos added up to `version`, oldest first, with their embeddings."""
    return list(
        db_session.scalars(
            select(ConceptExample)
            .where(ConceptExample.concept_id == concept_id, ConceptExample.version_added <= version)
            .order_by(ConceptExample.created_at, ConceptExample.id)
        ).all()
    )


def store_example_embedding(
    *, db_session: Session, example_id: str, embedding: bytes, model_id: str
) -> None:
    """A concept photo's embedding, by `model_id`."""
    db_session.execute(
        update(ConceptExample)
        .where(ConceptExample.id == example_id)
        .values(embedding=embedding, embedding_model=model_id)
    )


def fail_concept_version(
    *, db_session: Session, concept_id: str, version: int, metrics: dict[str, Any]
) -> None:
    """The concept -> failed (`metrics` says why), if `version` is still its current one."""
    db_session.execute(
        update(Concept)
        .where(Concept.id == concept_id, Concept.version == version)
        .values(state=ConceptState.FAILED.value, metrics=metrics)
    )


# --- concept verdicts: a person's marks on library photos (docs/ALBUMS.md) ---------------------


def active_verdict(
    *, db_session: Session, concept_id: str, image_id: str, lock: bool = False
) -> ConceptVerdict | None:
    """The photo's current mark for the concept, if any."""
    query = select(ConceptVerdict).where(
        ConceptVerdict.concept_id == concept_id,
        ConceptVerdict.image_id == image_id,
        ConceptVerdict.ended_at.is_(None),
    )
    return db_session.scalar(query.with_for_update() if lock else query)


def active_verdicts(*, db_session: Session, concept_id: str) -> dict[str, ConceptVerdict]:
    """image id -> its current mark for the concept."""
    rows = db_session.scalars(
        select(ConceptVerdict).where(
            ConceptVerdict.concept_id == concept_id, ConceptVerdict.ended_at.is_(None)
        )
    )
    return {v.image_id: v for v in rows}


def image_verdicts(*, db_session: Session, user_id: str, image_id: str) -> dict[str, str]:
    """concept id -> the image's current verdict for it, over the user's concepts."""
    rows = db_session.execute(
        select(ConceptVerdict.concept_id, ConceptVerdict.verdict).where(
            ConceptVerdict.user_id == user_id,
            ConceptVerdict.image_id == image_id,
            ConceptVerdict.ended_at.is_(None),
        )
    )
    return {str(cid): str(verdict) for cid, verdict in rows.all()}


def verdict_history_page(
    *, db_session: Session, concept_id: str, limit: int, cursor: str | None = None
) -> Page[ConceptVerdict]:
    """Every mark of the concept, ended ones too, newest first."""
    return keyset_page(
        db_session,
        select(ConceptVerdict).where(ConceptVerdict.concept_id == concept_id),
        created_at=ConceptVerdict.created_at,
        row_id=ConceptVerdict.id,
        limit=limit,
        cursor=cursor,
        newest_first=True,
    )


class MarkedEmbedding(NamedTuple):
    """A marked library photo's embedding, for training."""

    image_id: str
    verdict: str
    sha256: str
    embedding: bytes


def verdict_embeddings(
    *, db_session: Session, concept_id: str, model_id: str, limit: int
) -> list[MarkedEmbedding]:
    """The concept's currently marked photos embedded by `model_id`, oldest mark first; at most
    `limit` per verdict (the most recent)."""
    out: list[MarkedEmbedding] = []
    for verdict in ("confirmed", "rejected"):
        rows = db_session.execute(
            select(ConceptVerdict.image_id, Image.sha256, Image.embedding)
            .join(Image, Image.id == ConceptVerdict.image_id)
            .where(
                ConceptVerdict.concept_id == concept_id,
                ConceptVerdict.ended_at.is_(None),
                ConceptVerdict.verdict == verdict,
                Image.embedding_model == model_id,
                Image.embedding.is_not(None),
            )
            .order_by(ConceptVerdict.created_at.desc(), ConceptVerdict.id.desc())
            .limit(limit)
        ).all()
        out += [
            MarkedEmbedding(i, verdict, sha, e) for i, sha, e in reversed(rows) if e is not None
        ]
    return out


def taught_library_images(*, db_session: Session, user_id: str, concept_id: str) -> list[Image]:
    """The user's library images with the same content as one of the concept's photos."""
    hashes = select(ConceptExample.sha256).where(ConceptExample.concept_id == concept_id)
    return list(
        db_session.scalars(
            select(Image)
            .options(defer(Image.embedding))
            .where(Image.user_id == user_id, Image.sha256.in_(hashes))
        )
    )


def concepts_taught_with(*, db_session: Session, user_id: str, sha256: str) -> set[str]:
    """Ids of the user's concepts with a photo of this content."""
    return set(
        db_session.scalars(
            select(ConceptExample.concept_id)
            .join(Concept, Concept.id == ConceptExample.concept_id)
            .where(Concept.user_id == user_id, ConceptExample.sha256 == sha256)
        )
    )


def image_embeddings_by_id(
    *, db_session: Session, user_id: str, image_ids: Sequence[str], model_id: str
) -> dict[str, np.ndarray]:
    """image id -> its embedding by `model_id`, (D,), for the user's images that have one."""
    ids = list(dict.fromkeys(image_ids))
    found: dict[str, np.ndarray] = {}
    for start in range(0, len(ids), _IN_CHUNK):
        rows = db_session.execute(
            select(Image.id, Image.embedding).where(
                Image.user_id == user_id,
                Image.id.in_(ids[start : start + _IN_CHUNK]),
                Image.embedding_model == model_id,
                Image.embedding.is_not(None),
            )
        )
        found.update((i, np.frombuffer(e, np.float32)) for i, e in rows if e is not None)
    return found


# --- search: what a query reads (app.services.search) -------------------------------------------

_IN_CHUNK = 900  # ids per IN (...): SQLite allows at most 999 bound parameters


def user_concepts(*, db_session: Session, user_id: str) -> list[Concept]:
    """Every concept of the user (any state)."""
    return list(db_session.scalars(select(Concept).where(Concept.user_id == user_id)))


def latest_adapters(*, db_session: Session, concept_ids: Sequence[str]) -> dict[str, Adapter]:
    """concept id -> its newest stored adapter: a concept keeps searching while it retrains."""
    if not concept_ids:
        return {}
    newest = (
        select(Adapter.concept_id, func.max(Adapter.version).label("v"))
        .where(Adapter.concept_id.in_(list(concept_ids)))
        .group_by(Adapter.concept_id)
        .subquery()
    )
    rows = db_session.scalars(
        select(Adapter).join(
            newest, (Adapter.concept_id == newest.c.concept_id) & (Adapter.version == newest.c.v)
        )
    )
    return {row.concept_id: row for row in rows}


def adapter_photo_embeddings(
    *, db_session: Session, adapter: Adapter, model_id: str
) -> list[bytes]:
    """The stored photo embeddings (float32 bytes, `model_id`) the adapter was trained on: its
    concept's photos and the library photos a person confirmed (its meta's `feedback`)."""
    taught, confirmed = adapter_photo_embeddings_by_kind(
        db_session=db_session, adapter=adapter, model_id=model_id
    )
    return taught + confirmed


def adapter_photo_embeddings_by_kind(
    *, db_session: Session, adapter: Adapter, model_id: str
) -> tuple[list[bytes], list[bytes]]:
    """(the concept's photos, the confirmed library photos) the adapter was trained on."""
    taught = db_session.scalars(
        select(ConceptExample.embedding).where(
            ConceptExample.concept_id == adapter.concept_id,
            ConceptExample.version_added <= adapter.version,
            ConceptExample.embedding_model == model_id,
            ConceptExample.embedding.is_not(None),
        )
    ).all()
    feedback = (adapter.meta or {}).get("feedback") or {}
    ids = [str(i) for i in feedback.get("confirmed") or []]
    confirmed: list[bytes | None] = []
    if ids:
        owner = select(Concept.user_id).where(Concept.id == adapter.concept_id).scalar_subquery()
        for start in range(0, len(ids), _IN_CHUNK):
            confirmed += db_session.scalars(
                select(Image.embedding).where(
                    Image.user_id == owner,
                    Image.id.in_(ids[start : start + _IN_CHUNK]),
                    Image.embedding_model == model_id,
                    Image.embedding.is_not(None),
                )
            ).all()
    return [b for b in taught if b is not None], [b for b in confirmed if b is not None]


def recent_image_embeddings(
    *, db_session: Session, user_id: str, model_id: str, exclude_sha256: Set[str], limit: int
) -> list[bytes]:
    """Whole-image embeddings (by `model_id`) of the user's most recent images, newest first,
    leaving out the given contents."""
    query = (
        select(Image.embedding, Image.sha256)
        .where(Image.user_id == user_id, Image.embedding_model == model_id)
        .order_by(Image.created_at.desc(), Image.id.desc())
        .limit(limit + len(exclude_sha256))
    )
    rows = db_session.execute(query).all()
    found = [e for e, sha in rows if e is not None and sha not in exclude_sha256]
    return found[:limit]


class ImageVectors(NamedTuple):
    """An image's stored vectors: its whole embedding and its packed region embeddings with the
    stored layout key that says what they are (app.ml.regions.stored_layout)."""

    embedding: bytes | None
    regions: bytes | None
    region_layout: str | None


def image_vectors(
    *, db_session: Session, user_id: str, vec_ids: Sequence[int]
) -> dict[int, ImageVectors]:
    """vec id -> the stored vectors of the user's images with those ids."""
    ids = list(vec_ids)
    found: dict[int, ImageVectors] = {}
    for start in range(0, len(ids), _IN_CHUNK):
        query = select(
            Image.vec_id, Image.embedding, Image.region_embeddings, Image.region_layout
        ).where(Image.user_id == user_id, Image.vec_id.in_(ids[start : start + _IN_CHUNK]))
        found.update((v, ImageVectors(e, r, k)) for v, e, r, k in db_session.execute(query))
    return found


def images_by_vec_id(
    *, db_session: Session, user_id: str, vec_ids: Sequence[int]
) -> dict[int, Image]:
    """vec id -> the user's image, without its vectors (hits need metadata only)."""
    ids = list(vec_ids)
    found: dict[int, Image] = {}
    for start in range(0, len(ids), _IN_CHUNK):
        query = (
            select(Image)
            .options(defer(Image.embedding))  # crops are deferred by the model
            .where(Image.user_id == user_id, Image.vec_id.in_(ids[start : start + _IN_CHUNK]))
        )
        found.update((img.vec_id, img) for img in db_session.scalars(query))
    return found


def filtered_vec_ids(
    *,
    db_session: Session,
    user_id: str,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    taken_after: datetime | None = None,
    taken_before: datetime | None = None,
    mime: Sequence[str] = (),
) -> list[int]:
    """Vec ids of the user's images uploaded and taken in the [after, before) ranges given, with
    one of the MIME types."""
    query = select(Image.vec_id).where(Image.user_id == user_id)
    if created_after:
        query = query.where(Image.created_at >= created_after)
    if created_before:
        query = query.where(Image.created_at < created_before)
    if taken_after:
        query = query.where(Image.taken_at >= taken_after)
    if taken_before:
        query = query.where(Image.taken_at < taken_before)
    if mime:
        query = query.where(Image.mime.in_(list(mime)))
    return list(db_session.scalars(query))


def count_unembedded_images(*, db_session: Session, user_id: str, model_id: str) -> int:
    """Images of the user not (yet) embedded by `model_id`, other than those whose file could
    not be read (embed_error): no pass embeds them until their file changes."""
    query = (
        select(func.count())
        .select_from(Image)
        .where(
            Image.user_id == user_id,
            (Image.embedding_model.is_(None)) | (Image.embedding_model != model_id),
            Image.embed_error.is_(None),
        )
    )
    return int(db_session.scalar(query) or 0)


# --- embedding: what app.services.embedding reads and writes -----------------------------------


class ImageSourceRow(NamedTuple):
    """Where an image's bytes are: its stored original, or its library file and that file's
    stamp as the last scan saw it."""

    id: str
    storage_path: str
    source_path: str | None
    library_path: str | None
    source_size: int | None
    source_mtime_ns: int | None
    source_ctime_ns: int | None
    source_ino: int | None


def images_to_embed(
    *,
    db_session: Session,
    user_id: str,
    model_id: str,
    image_ids: Sequence[str] | None,
    region_key: str | None = None,
) -> list[ImageSourceRow]:
    """The user's images (among `image_ids`; None: all) whose file has not failed to read
    (embed_error), oldest first: those lacking an embedding by `model_id` or, with
    `region_key`, those embedded by it whose regions are not stored as `region_key`."""
    current = Image.embedding_model == model_id
    readable = Image.embed_error.is_(None)
    if region_key is None:
        wanted = [or_(Image.embedding.is_(None), ~current), readable]
    else:
        stale = or_(Image.region_layout.is_(None), Image.region_layout != region_key)
        wanted = [current, stale, readable]
    query = (
        select(
            Image.id,
            Image.storage_path,
            Image.source_path,
            Library.path,
            Image.source_size,
            Image.source_mtime_ns,
            Image.source_ctime_ns,
            Image.source_ino,
        )
        .outerjoin(Library, Library.id == Image.library_id)
        .where(Image.user_id == user_id, *wanted)
    )
    if image_ids is not None:
        query = query.where(Image.id.in_(list(image_ids)))
    rows = db_session.execute(query.order_by(Image.created_at, Image.id))
    return [ImageSourceRow(*row) for row in rows]


def store_embedding(
    *,
    db_session: Session,
    user_id: str,
    image_id: str,
    embedding: bytes,
    model_id: str,
    vec_id: int,
    region_embeddings: bytes | None,
    region_layout: str | None,
) -> None:
    """An image's new embedding (a row deleted meanwhile matches nothing); its regions with it
    (None drops those of another model)."""
    db_session.execute(
        update(Image)
        .where(Image.id == image_id, Image.user_id == user_id)
        .values(
            embedding=embedding,
            embedding_model=model_id,
            vec_id=vec_id,
            region_embeddings=region_embeddings,
            region_layout=region_layout,
        )
    )


def store_regions(
    *,
    db_session: Session,
    user_id: str,
    image_id: str,
    model_id: str,
    region_embeddings: bytes,
    region_layout: str,
) -> None:
    """An image's region rows, only next to an embedding of `model_id` (a model switch may
    race)."""
    db_session.execute(
        update(Image)
        .where(Image.id == image_id, Image.user_id == user_id, Image.embedding_model == model_id)
        .values(region_embeddings=region_embeddings, region_layout=region_layout)
    )


def set_embed_error(
    *, db_session: Session, user_id: str, image_id: str, reason: str, transient: bool
) -> None:
    """Why an image's file could not be read, and whether that may pass."""
    db_session.execute(
        update(Image)
        .where(Image.id == image_id, Image.user_id == user_id)
        .values(embed_error=reason, embed_error_transient=transient)
    )


def clear_embed_errors(*, db_session: Session, user_id: str) -> None:
    """Every image of the user is readable again, as far as embedding knows."""
    db_session.execute(
        update(Image)
        .where(Image.user_id == user_id, Image.embed_error.is_not(None))
        .values(embed_error=None, embed_error_transient=None)
    )


def stored_regions(
    *, db_session: Session, user_id: str, image_ids: Sequence[str]
) -> list[tuple[str, bytes | None, str | None]]:
    """(id, region rows, region_layout) of those of the user's images that have regions."""
    rows = db_session.execute(
        select(Image.id, Image.region_embeddings, Image.region_layout).where(
            Image.id.in_(list(image_ids)),
            Image.user_id == user_id,
            Image.region_layout.is_not(None),
        )
    )
    return [(i, blob, key) for i, blob, key in rows]


class IndexCounts(NamedTuple):
    images: int
    embedded: int  # by the model asked about
    with_regions: int  # ... and with regions of the layout asked about
    failed: int  # not embedded by it, and its file could not be read


def index_counts(*, db_session: Session, user_id: str, model_id: str, layout: str) -> IndexCounts:
    """How many of the user's images `model_id` can search, and how well (one query)."""
    current = Image.embedding_model == model_id
    failed = Image.embed_error.is_not(None) & or_(
        Image.embedding_model.is_(None), Image.embedding_model != model_id
    )
    row = db_session.execute(
        select(
            func.count(),
            func.count(case((current, 1))),
            func.count(case((current & (Image.region_layout == layout), 1))),
            func.count(case((failed, 1))),
        ).where(Image.user_id == user_id)
    ).one()
    return IndexCounts(int(row[0]), int(row[1]), int(row[2]), int(row[3]))


def open_rebuild_job(*, db_session: Session, user_id: str) -> Job | None:
    """The user's newest queued or running `rebuild_index` job, if any."""
    return db_session.scalars(
        select(Job)
        .where(
            Job.user_id == user_id,
            Job.kind == JobKind.REBUILD_INDEX.value,
            Job.state.in_([JobState.QUEUED.value, JobState.RUNNING.value]),
        )
        .order_by(Job.created_at.desc())
        .limit(1)
    ).first()


# --- the vector index: what app.services.index reads ------------------------------------------


def index_generation(*, db_session: Session, user_id: str) -> int | None:
    """The user's index generation (bumped by every change to their searchable images); None
    for a missing user."""
    return db_session.scalar(select(User.index_generation).where(User.id == user_id))


def _embedded_by(user_id: str, model_id: str) -> tuple[Any, ...]:
    """The user's images that carry an embedding of `model_id`."""
    return (
        Image.user_id == user_id,
        Image.embedding_model == model_id,
        Image.embedding.is_not(None),
    )


def stream_embeddings(
    *, db_session: Session, user_id: str, model_id: str
) -> Iterator[tuple[int, bytes | None]]:
    """(vec_id, embedding) of every image of the user embedded by `model_id`, streamed from the
    database 2000 rows at a time."""
    rows = db_session.execute(
        select(Image.vec_id, Image.embedding)
        .where(*_embedded_by(user_id, model_id))
        .execution_options(yield_per=2000)
    )
    return iter(rows.tuples())


def embedded_vec_ids(*, db_session: Session, user_id: str, model_id: str) -> Iterable[int]:
    """The vec_ids of the user's images embedded by `model_id`."""
    return db_session.scalars(select(Image.vec_id).where(*_embedded_by(user_id, model_id)))


def embeddings_of(
    *, db_session: Session, user_id: str, model_id: str, vec_ids: list[int]
) -> list[tuple[int, bytes | None]]:
    """(vec_id, embedding) of those of `vec_ids` (at most a few hundred: one IN list) that
    name an image of the user embedded by `model_id`."""
    rows = db_session.execute(
        select(Image.vec_id, Image.embedding).where(
            *_embedded_by(user_id, model_id), Image.vec_id.in_(vec_ids)
        )
    )
    return [(v, b) for v, b in rows]


# --- libraries ------------------------------------------------------------------------------------


def get_library(
    *, db_session: Session, user_id: str, library_id: str, for_update: bool = False
) -> Library | None:
    """One of the user's libraries (None for a missing or foreign id); `for_update` locks its
    row until the transaction ends (PostgreSQL; SQLite has one writer anyway)."""
    query = select(Library).where(Library.id == library_id, Library.user_id == user_id)
    return db_session.scalar(query.with_for_update() if for_update else query)


def all_libraries(*, db_session: Session) -> list[Library]:
    """Every user's libraries (the library monitor watches them all)."""
    return list(db_session.scalars(select(Library).order_by(Library.created_at, Library.id)))


def list_libraries(*, db_session: Session, user_id: str) -> list[Library]:
    return list(
        db_session.scalars(
            select(Library)
            .where(Library.user_id == user_id)
            .order_by(Library.created_at, Library.id)
        )
    )


def other_users_libraries(*, db_session: Session, user_id: str) -> list[Library]:
    """Every library that is not `user_id`'s."""
    return list(db_session.scalars(select(Library).where(Library.user_id != user_id)))


def library_folder_keys(
    *, db_session: Session, library_ids: Sequence[str]
) -> dict[str, dict[str, int]]:
    """library id -> {folder identity: depth} of the folders each library's last scan walked."""
    found: dict[str, dict[str, int]] = {i: {} for i in library_ids}
    ids = list(library_ids)
    for start in range(0, len(ids), _IN_CHUNK):
        rows = db_session.execute(
            select(LibraryFolder.library_id, LibraryFolder.folder_key, LibraryFolder.depth).where(
                LibraryFolder.library_id.in_(ids[start : start + _IN_CHUNK])
            )
        )
        for library_id, key, depth in rows:
            found[library_id][key] = depth
    return found


def replace_library_folders(
    *, db_session: Session, library_id: str, folders: Mapping[str, int]
) -> None:
    """The folders (identity -> depth) a scan of the library walked, instead of the last's."""
    db_session.execute(delete(LibraryFolder).where(LibraryFolder.library_id == library_id))
    rows = [{"library_id": library_id, "folder_key": k, "depth": d} for k, d in folders.items()]
    for start in range(0, len(rows), 500):
        db_session.execute(insert(LibraryFolder), rows[start : start + 500])


def set_watch_errors(*, db_session: Session, errors: Mapping[str, str | None]) -> None:
    """Record why each library (id -> reason, None: it is watched) is not watched now."""
    for library_id, error in errors.items():
        db_session.execute(
            update(Library)
            .where(Library.id == library_id, Library.watch_error.is_distinct_from(error))
            .values(watch_error=error)
        )


def _starts_with(column: Any, prefix: str) -> Any:
    """`column` begins with `prefix`, exactly: SQL's LIKE ignores ASCII case on SQLite, and file
    paths are case-sensitive (/photos/A is not /photos/a)."""
    return func.substr(column, 1, len(prefix)) == prefix


def libraries_overlapping(*, db_session: Session, path: str) -> list[Library]:
    """Libraries (any user) at `path`, above it, or inside it."""
    ancestors = [str(a) for a in PurePath(path).parents] + [path]
    return list(
        db_session.scalars(
            select(Library).where(
                or_(
                    Library.path.in_(ancestors),
                    _starts_with(Library.path, path.rstrip("/") + "/"),
                )
            )
        )
    )


def retry_passing_embed_failures(*, db_session: Session, library_id: str) -> int:
    """Forget the embed failures of the library's files that may pass without the file changing
    (embed_error_transient: an I/O error), so the embed pass after a scan reads them again; how
    many."""
    result = db_session.execute(
        update(Image)
        .where(
            Image.library_id == library_id,
            Image.embed_error.is_not(None),
            Image.embed_error_transient.is_(True),
        )
        .values(embed_error=None, embed_error_transient=None)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def library_embed_failures(
    *, db_session: Session, library_id: str, limit: int
) -> tuple[int, list[tuple[str, str]]]:
    """(how many, the first `limit` (source_path, embed_error) by path) of the library's images
    whose file could not be read or decoded when embedded."""
    failed = (Image.library_id == library_id, Image.embed_error.is_not(None))
    count = int(db_session.scalar(select(func.count()).select_from(Image).where(*failed)) or 0)
    rows = db_session.execute(
        select(Image.source_path, Image.embed_error)
        .where(*failed)
        .order_by(Image.source_path)
        .limit(limit)
    )
    return count, [(str(path), str(reason)) for path, reason in rows]


def open_scan_job(
    *, db_session: Session, library: Library, states: tuple[JobState, ...] | None = None
) -> Job | None:
    """A queued or running (or: in one of `states`) scan of this library, if any."""
    wanted = states or (JobState.QUEUED, JobState.RUNNING)
    jobs = db_session.scalars(
        select(Job).where(
            Job.user_id == library.user_id,
            Job.kind == JobKind.SCAN_LIBRARY.value,
            Job.state.in_([st.value for st in wanted]),
        )
    )
    return next((j for j in jobs if j.payload.get("library_id") == library.id), None)


def library_storage_paths(*, db_session: Session, library_id: str) -> list[str]:
    return list(
        db_session.scalars(
            select(Image.storage_path).where(Image.library_id == library_id).distinct()
        )
    )


def delete_library_images(*, db_session: Session, library_id: str) -> None:
    """Every image indexed from the library leaves the index (their files are not touched)."""
    db_session.execute(delete(Image).where(Image.library_id == library_id))


def library_images_at(*, db_session: Session, library_id: str, paths: list[str]) -> list[Image]:
    return list(
        db_session.scalars(
            select(Image).where(Image.library_id == library_id, Image.source_path.in_(paths))
        )
    )


def keep_library_images(
    *, db_session: Session, library_id: str, generation: int, paths: Sequence[str]
) -> int:
    """Mark the library's images at or under `paths` as seen by scan `generation` (what a scan
    could not look at is kept); how many."""
    kept = 0
    for start in range(0, len(paths), 100):
        chunk = paths[start : start + 100]
        result = db_session.execute(
            update(Image)
            .where(
                Image.library_id == library_id,
                or_(
                    Image.source_path.in_(chunk),
                    *(_starts_with(Image.source_path, f"{p}/") for p in chunk),
                ),
            )
            .values(scan_generation=generation)
        )
        kept += int(getattr(result, "rowcount", 0) or 0)
    return kept


def stale_library_images(
    *, db_session: Session, library_id: str, generation: int, limit: int
) -> list[Image]:
    """Images of the library the scan `generation` did not see (up to `limit`)."""
    return list(
        db_session.scalars(
            select(Image)
            .where(
                Image.library_id == library_id,
                or_(Image.scan_generation.is_(None), Image.scan_generation != generation),
            )
            .limit(limit)
        )
    )
