"""The handler table: which service function runs each kind of job. No registration at import."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from app.models import JobKind
from app.services import embedding, library_scan, training
from app.services.job_runs import JobHandler


def handler_table() -> Mapping[str, JobHandler]:
    """kind -> handler, for every job kind this service creates (read-only)."""
    table: dict[str, JobHandler] = {
        JobKind.EMBED_IMAGES.value: embedding.embed_images_job,
        JobKind.REBUILD_INDEX.value: embedding.rebuild_index_job,
        JobKind.TRAIN_CONCEPT.value: training.train_concept,
        JobKind.SCAN_LIBRARY.value: library_scan.scan_library_job,
    }
    assert set(table) == {k.value for k in JobKind}, "a job kind without a handler"
    return MappingProxyType(table)
