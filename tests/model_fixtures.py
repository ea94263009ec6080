"""Serving-model fixtures: a tiny random CLIP injected for an app's model settings."""

from __future__ import annotations

from typing import Any

import pytest

from app.ml.model import ClipBundle
from tests.unit.ml.conftest import tiny_clip

__all__ = ["tiny_serving"]


@pytest.fixture
def tiny_serving(api_client: Any) -> ClipBundle:
    """A tiny random CLIP (context 77) serves `api_client`'s app (its searches and jobs)."""
    bundle = tiny_clip(0)
    api_client.app.state.container.model.install(bundle)
    return bundle
