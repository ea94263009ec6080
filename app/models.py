"""SQLAlchemy 2 models: the database is the source of truth (docs/CONTRACTS.md, Database)."""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    inspect,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, validates

# Deterministic constraint names, so migrations name things the same on SQLite and Postgres.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Aware UTC now: every timestamp in the database is UTC."""
    return datetime.now(UTC)


def new_id() -> str:
    """A fresh primary key (UUID4 string)."""
    return str(uuid.uuid4())


def new_vec_id() -> int:
    """A random positive 63-bit FAISS id (int64, never -1 which FAISS uses for 'missing')."""
    return secrets.randbelow(2**63 - 1) + 1


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamp that always comes back aware-UTC (SQLite drops the zone; Postgres keeps it)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: use app.models.utcnow()")
        value = value.astimezone(UTC)
        # SQLite stores text; naive UTC keeps the text sortable, so keyset pagination works.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(
        self,
        value: datetime | None,
        dialect: Dialect,  # noqa: ARG002 (SQLAlchemy's TypeDecorator signature)
    ) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class JobKind(StrEnum):
    """What a job does; each kind maps to one service function."""

    EMBED_IMAGES = "embed_images"
    TRAIN_CONCEPT = "train_concept"
    REBUILD_INDEX = "rebuild_index"
    SCAN_LIBRARY = "scan_library"


class JobState(StrEnum):
    """Job life cycle: queued → running → succeeded | failed."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Verdict(StrEnum):
    """A person's mark on a library photo for one concept (docs/ALBUMS.md)."""

    CONFIRMED = "confirmed"  # "this is Fido": a positive for the next version, always in the album
    REJECTED = "rejected"  # "not Fido": a negative for the next version, never in the album


class ConceptState(StrEnum):
    """Concept life cycle: training → ready | failed."""

    TRAINING = "training"
    READY = "ready"
    FAILED = "failed"


def _in(column: str, values: type[StrEnum]) -> str:
    """SQL CHECK text: `column` holds one of the enum's values."""
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class Base(DeclarativeBase):
    """Declarative base; its metadata is what Alembic migrates."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
    }


class User(Base):
    """An owner of images, concepts and keys."""

    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Bumped on every change of the user's embedded image set; API processes compare it with
    # the generation their cached FAISS index was built from.
    index_generation: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))


class ApiKey(Base):
    """A bearer key `polar_<prefix>_<secret>`; only its sha256 is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    prefix: Mapped[str] = mapped_column(String(16))  # shown in listings to tell keys apart
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # hex sha256 of the full key
    name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class Image(Base):
    """A library image of one user; its embedding is filled in by the embed job."""

    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("user_id", "sha256"),
        UniqueConstraint("user_id", "vec_id"),
        Index(None, "user_id", "created_at", "id"),  # keyset pagination
        Index(None, "storage_path"),  # "is this file still referenced?" on delete
        Index(None, "library_id", "source_path"),  # a scan's lookups by path
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(String(36), ForeignKey("users.id", ondelete="CASCADE"))
    vec_id: Mapped[int] = mapped_column(BigInteger, default=new_vec_id)  # FAISS id
    sha256: Mapped[str] = mapped_column(String(64))
    original_filename: Mapped[str | None] = mapped_column(String(255))  # display only
    mime: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int] = mapped_column(Integer)  # after EXIF orientation
    height: Mapped[int] = mapped_column(Integer)
    storage_path: Mapped[str] = mapped_column(String(512))  # relative to settings.data_dir
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary)  # float32 (D,), L2-normalised
    embedding_model: Mapped[str | None] = mapped_column(String(255))  # ModelFingerprint.model_id
    # float16 (R, D) crop embeddings (app.ml.regions), same model as `embedding`; loaded only
    # when asked for (search re-ranking reads them for its top candidates).
    region_embeddings: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)
    region_layout: Mapped[str | None] = mapped_column(String(32))  # app.ml.regions.LAYOUTS key
    # When the photo was taken: EXIF DateTimeOriginal, else the file's modification time the
    # client sent, else the upload time. Search filters by it (taken_after / taken_before).
    taken_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)  # uploaded
    # Indexed in place (a library's file, not a copy): storage_path then names only the cached
    # thumbnail's content address; the bytes are read from source_path.
    library_id: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("libraries.id", ondelete="CASCADE")
    )
    source_path: Mapped[str | None] = mapped_column(String(4096))  # absolute, inside the library
    # The file as the last scan saw it (app.storage.FileStamp): size and mtime, which a user can
    # set back (cp -p, rsync -a, touch -r), and ctime and inode, which nobody can. NULL ctime
    # and inode: indexed before they were kept; the next scan fills them in.
    source_size: Mapped[int | None] = mapped_column(BigInteger)
    source_mtime_ns: Mapped[int | None] = mapped_column(BigInteger)
    source_ctime_ns: Mapped[int | None] = mapped_column(BigInteger)
    source_ino: Mapped[int | None] = mapped_column(BigInteger)  # as a signed 64-bit number
    scan_generation: Mapped[int | None] = mapped_column(Integer)  # the last scan that saw it
    # Why the embed jobs could not read or decode the file (swapped for a FIFO or a bomb since
    # it was validated, gone, unreadable): such an image is not read again by every embed pass,
    # only once its file changes (a rescan sees a new size or time; the same bytes uploaded
    # again) or a rebuild is asked for, which clear this. None: nothing failed.
    embed_error: Mapped[str | None] = mapped_column(Text)
    # The failure may pass without the file changing (an I/O error: a network share that
    # dropped, a permission): a library's next scan reads such a file again. None/False: the
    # bytes themselves failed (not an image, too large, not a regular file).
    embed_error_transient: Mapped[bool | None] = mapped_column(Boolean)

    @validates("embedding")
    def _new_vector_new_id(self, _key: str, value: bytes | None) -> bytes | None:
        # A vec_id names one vector, never a row: a row whose embedding is written again gets a
        # new one, so every process's index cache, synced by id difference, drops the old
        # vector and takes the new one (app.services.index.sync_index). Core UPDATEs of
        # `embedding` set vec_id=new_vec_id() themselves (app.services.embedding).
        if value is not None and inspect(self).has_identity:  # a stored row, not a new one
            self.vec_id = new_vec_id()
        return value


class Library(Base):
    """A folder of one user, under an allowed root, indexed in place by scan jobs."""

    __tablename__ = "libraries"
    __table_args__ = (UniqueConstraint("user_id", "path"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(String(36), ForeignKey("users.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(String(4096))  # resolved, absolute
    scan_generation: Mapped[int] = mapped_column(Integer, default=0)
    report: Mapped[dict[str, Any] | None]  # the last finished scan's report
    scanned_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Why the folder watcher does not watch this library now (a link where its folder was, a
    # tree it cannot list); None while it is watched or watching is off.
    watch_error: Mapped[str | None] = mapped_column(Text)


class LibraryFolder(Base):
    """A folder a library's last scan walked, by identity (app.folders.FolderId: device and
    inode as text), not by name: another user's folder is compared with these, so a second name
    for one of them (a bind mount, another case on a case-insensitive share) is seen as the same
    folder. `depth` 0 is the library's own folder."""

    __tablename__ = "library_folders"
    __table_args__ = (Index(None, "folder_key"),)

    library_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("libraries.id", ondelete="CASCADE"), primary_key=True
    )
    folder_key: Mapped[str] = mapped_column(String(48), primary_key=True)
    depth: Mapped[int] = mapped_column(Integer, default=0)


class Concept(Base):
    """A personal concept ("Fido") with its POLAR adapter versions."""

    __tablename__ = "concepts"
    __table_args__ = (
        UniqueConstraint("user_id", "name_key"),
        CheckConstraint(_in("state", ConceptState), name="state"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(String(36), ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    name_key: Mapped[str] = mapped_column(String(200))  # app.text.fold(name): queries match so
    category: Mapped[str | None] = mapped_column(String(100))
    token: Mapped[str] = mapped_column(String(64))  # placeholder token, e.g. "sks"
    state: Mapped[str] = mapped_column(String(16), default=ConceptState.TRAINING.value)
    version: Mapped[int] = mapped_column(Integer, default=1)
    metrics: Mapped[dict[str, Any] | None]
    retention_score: Mapped[float | None] = mapped_column(Float)
    retention_flagged: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=text("false")
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    examples: Mapped[list[ConceptExample]] = relationship(
        back_populates="concept", passive_deletes=True, order_by="ConceptExample.created_at"
    )
    adapters: Mapped[list[Adapter]] = relationship(
        back_populates="concept", passive_deletes=True, order_by="Adapter.version"
    )


class ConceptExample(Base):
    """One training photo of a concept."""

    __tablename__ = "concept_examples"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    concept_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("concepts.id", ondelete="CASCADE"), index=True
    )
    sha256: Mapped[str] = mapped_column(String(64))
    storage_path: Mapped[str] = mapped_column(String(512), index=True)
    mime: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary)
    embedding_model: Mapped[str | None] = mapped_column(String(255))
    version_added: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    concept: Mapped[Concept] = relationship(back_populates="examples")


class ConceptVerdict(Base):
    """One mark of a library photo for a concept, kept as history: a new mark or an undo ends the
    photo's active mark (`ended_at`), so at most one mark per (concept, image) is active and
    every earlier one says what was marked when. Deleting the concept, the image or the user
    deletes its marks (ON DELETE CASCADE)."""

    __tablename__ = "concept_verdicts"
    __table_args__ = (
        CheckConstraint(_in("verdict", Verdict), name="verdict"),
        # One active mark per photo and concept (both databases support partial indexes).
        Index(
            "uq_concept_verdicts_active",
            "concept_id",
            "image_id",
            unique=True,
            sqlite_where=text("ended_at IS NULL"),
            postgresql_where=text("ended_at IS NULL"),
        ),
        Index(None, "image_id"),
        Index(None, "user_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(String(36), ForeignKey("users.id", ondelete="CASCADE"))
    concept_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("concepts.id", ondelete="CASCADE")
    )
    image_id: Mapped[str] = mapped_column(String(36), ForeignKey("images.id", ondelete="CASCADE"))
    verdict: Mapped[str] = mapped_column(String(16))
    concept_version: Mapped[int] = mapped_column(Integer)  # the version that was marked
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None]  # replaced or undone; None while it is the photo's mark


class Adapter(Base):
    """Weights of one trained version of a concept (ConceptAdapter.to_bytes())."""

    __tablename__ = "adapters"
    # A retried training task must leave exactly one row per version.
    __table_args__ = (UniqueConstraint("concept_id", "version"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    concept_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("concepts.id", ondelete="CASCADE")
    )
    version: Mapped[int] = mapped_column(Integer)
    weights: Mapped[bytes] = mapped_column(LargeBinary)
    model_id: Mapped[str] = mapped_column(String(255))
    meta: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    concept: Mapped[Concept] = relationship(back_populates="adapters")


class Job(Base):
    """Background work (embed, train, rebuild) with progress a client can poll."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("kind", JobKind), name="kind"),
        CheckConstraint(_in("state", JobState), name="state"),
        CheckConstraint("progress >= 0 AND progress <= 1", name="progress"),
        Index(None, "user_id", "created_at"),
        Index(None, "state"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(String(36), ForeignKey("users.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED.value)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Who claimed the current run ("celery:<task id>", "embedded:<pid>"): a lost run is put
    # back by that name only, never another delivery's.
    runner: Mapped[str | None] = mapped_column(String(80))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
