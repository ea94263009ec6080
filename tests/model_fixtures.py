"""Serving-model fixtures: a tiny random CLIP injected for an app's model settings."""

from __future__ import annotations

from typing import Any

import pytest

from app.ml.model import ClipBundle
from tests.unit.ml.conftest import tiny_clip

__all__ = ["tiny_serving"]


@pytest.fixture
def tiny_serving(api_client: Any) -> ClipBundle:
    """A tiny random CLIP (context 77) serves `api_client`'s app (its searches and jobs).

    Its image tower is a ViT, for which POLAR_SEARCH__REGION_METHOD=auto means late regions; the
    API tests were written for both kinds of regions (what auto means for the demo model), so
    the app stores both here. tests/api/test_index_regions.py checks auto itself."""
    bundle = tiny_clip(0)
    api_client.app.state.container.model.install(bundle)
    api_client.app.state.container.settings.search.region_method = "both"
    return bundle
