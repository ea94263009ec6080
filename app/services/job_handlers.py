"""Registers the one service function of every job kind; imported by the API and the workers."""

from __future__ import annotations

from app.services import embedding, images, jobs


def install() -> None:
    """Register handlers and dispatch new jobs after their rows are committed."""
    # The modules register their handlers at import; importing them here makes that explicit.
    import importlib

    try:
        importlib.import_module("app.services.concepts")
    except ModuleNotFoundError as e:  # TODO(lead): drop once concepts lands
        if e.name != "app.services.concepts":
            raise
    assert embedding.embed_images_job is not None
    images.on_job_created = jobs.dispatch
