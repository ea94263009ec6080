"""Registers the one service function of every job kind; imported by the API and the workers."""

from __future__ import annotations

from app.services import concepts, embedding, images, jobs


def install() -> None:
    """Register handlers and dispatch new jobs after their rows are committed."""
    # Each module registers its handlers at import; these references keep the imports explicit.
    assert concepts.train_concept is not None
    assert embedding.embed_images_job is not None
    images.on_job_created = jobs.dispatch
