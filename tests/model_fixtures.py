"""Serving-model fixtures: a tiny random CLIP injected for an app's model settings."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.config import Settings
from app.ml.model import ClipBundle
from app.services.model import forget_serving_models, install_serving_model
from tests.unit.ml.conftest import tiny_clip

__all__ = ["tiny_serving"]


@pytest.fixture
def tiny_serving(db_settings: Settings) -> Iterator[ClipBundle]:
    """A tiny random CLIP (context 77) serves the app built on `db_settings`."""
    bundle = tiny_clip(0)
    install_serving_model(db_settings.model, bundle)
    yield bundle
    forget_serving_models()
