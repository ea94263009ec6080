"""The use cases that create jobs, called as services (no HTTP) with a fake queue.

Each one must commit its rows first and only then hand the job to the queue it was given; bad
input must enqueue nothing; a queue that is down must not undo or fail a committed change.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import PhotoCountOutOfRange, UploadRejected
from app.models import Concept, Image, Job, JobKind
from app.services import concepts, embedding, images
from app.services.concepts import NewPhotos
from app.services.images import IncomingFile, PhotoEnv
from app.services.job_runs import SessionFactory
from app.services.jobs import JobQueue
from app.storage import ImageStore
from tests.db_fixtures import image_bytes
from tests.fakes import RecordingQueue


class CheckingQueue(RecordingQueue):
    """Records each job id with the state another session sees for it at enqueue time."""

    def __init__(self, factory: SessionFactory, *, fail: bool = False) -> None:
        super().__init__(fail=fail)
        self.factory = factory
        self.seen: list[str | None] = []

    def enqueue(self, job_id: str) -> None:
        with self.factory() as s:  # a separate session: only committed rows are visible
            job = s.get(Job, job_id)
            self.seen.append(job.state if job is not None else None)
        super().enqueue(job_id)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", broker_url="")


@pytest.fixture
def store(settings: Settings) -> ImageStore:
    return ImageStore(settings.data_dir)


def files(*seeds: int) -> list[IncomingFile]:
    return [
        IncomingFile(f"p{i}.png", io.BytesIO(image_bytes("PNG", (24, 16), (i * 40 % 256, 9, i))))
        for i in seeds
    ]


def env(s: Session, store: ImageStore, queue: JobQueue, settings: Settings) -> PhotoEnv:
    """A request's photo environment, as the API's dependency builds it."""
    return PhotoEnv(
        db_session=s,
        store=store,
        queue=queue,
        limits=settings.limits,
        training=settings.training,
        library_roots=settings.library.roots,
    )


def count(s: Session, model: type) -> int:
    return int(s.scalar(select(func.count()).select_from(model)) or 0)


def test_upload_enqueues_its_committed_embed_job(
    factory: SessionFactory, settings: Settings, store: ImageStore, user_id: str
) -> None:
    queue = CheckingQueue(factory)
    with factory() as s:
        outcome = images.upload_images(user_id, files(1, 2), env(s, store, queue, settings))
    assert outcome.job is not None and outcome.job.kind == JobKind.EMBED_IMAGES.value
    assert queue.job_ids == [outcome.job.id] and queue.seen == ["queued"]
    # The same content again before it was embedded: a duplicate, embedded by a new job.
    with factory() as s:
        again = images.upload_images(user_id, files(1), env(s, store, queue, settings))
    first = outcome.images[0].image.id
    assert again.images[0].duplicate and again.images[0].image.id == first
    assert again.job is not None and again.job.payload == {"image_ids": [first]}
    assert queue.job_ids == [outcome.job.id, again.job.id]


def test_bad_upload_enqueues_nothing_and_stores_nothing(
    factory: SessionFactory, settings: Settings, store: ImageStore, user_id: str
) -> None:
    queue = CheckingQueue(factory)
    bad = [*files(1), IncomingFile("x.png", io.BytesIO(b"not an image"))]
    with factory() as s, pytest.raises(UploadRejected):
        images.upload_images(user_id, bad, env(s, store, queue, settings))
    with factory() as s:
        assert (count(s, Image), count(s, Job)) == (0, 0)
    assert queue.job_ids == []


def test_a_queue_that_is_down_leaves_the_job_queued(
    factory: SessionFactory, settings: Settings, store: ImageStore, user_id: str
) -> None:
    queue = CheckingQueue(factory, fail=True)
    with factory() as s:
        outcome = images.upload_images(user_id, files(3), env(s, store, queue, settings))
    assert outcome.job is not None and queue.job_ids == []
    with factory() as s:  # the database is the queue of record: the job waits there
        assert s.get_one(Job, outcome.job.id).state == "queued"
        assert count(s, Image) == 1


def test_concept_use_cases_enqueue_a_training_job_per_new_version(
    factory: SessionFactory, settings: Settings, store: ImageStore, user_id: str
) -> None:
    queue = CheckingQueue(factory)
    with factory() as s:
        created = concepts.create_concept(
            user_id, "Fido", "dog", NewPhotos(files(1, 2, 3)), env(s, store, queue, settings)
        )
    concept_id = created.view.concept.id
    assert created.job is not None and queue.job_ids == [created.job.id]

    with factory() as s:  # a rename retrains nothing
        renamed = concepts.update_concept(
            user_id, concept_id, env(s, store, queue, settings), name="Rex"
        )
    assert renamed.job is None and len(queue.job_ids) == 1

    with factory() as s:  # a new category is a new version
        recat = concepts.update_concept(
            user_id, concept_id, env(s, store, queue, settings), category="cat"
        )
    assert recat.job is not None and recat.job.payload == {"concept_id": concept_id, "version": 2}

    with factory() as s:  # more photos: version 3
        more = concepts.add_examples(
            user_id, concept_id, NewPhotos(files(4)), env(s, store, queue, settings)
        )
    assert more.job is not None and more.job.payload["version"] == 3
    assert queue.job_ids == [created.job.id, recat.job.id, more.job.id]
    assert queue.seen == ["queued"] * 3  # each one committed before it was enqueued

    with factory() as s, pytest.raises(PhotoCountOutOfRange):
        concepts.create_concept(
            user_id, "Tom", None, NewPhotos(files(5)), env(s, store, queue, settings)
        )
    with factory() as s:
        assert count(s, Concept) == 1
    assert len(queue.job_ids) == 3


def test_rebuild_enqueues_once_while_open(factory: SessionFactory, user_id: str) -> None:
    queue = CheckingQueue(factory)
    with factory() as s:
        job, created = embedding.request_rebuild(s, user_id, queue)
    with factory() as s:
        same, created_again = embedding.request_rebuild(s, user_id, queue)
    assert created and not created_again and same.id == job.id
    assert queue.job_ids == [job.id] and queue.seen == ["queued"]
