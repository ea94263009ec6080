"""A stopped app is garbage: nothing in the service keeps an app (and its model, indexes and
pools) alive once its lifespan has ended and FastAPI's per-callable caches are emptied, as the
suite's conftest does after each test. A module-level registry, a thread that outlives the
lifespan, or a cache keyed on an app's objects fails this."""

from __future__ import annotations

import gc
import weakref

from fastapi.testclient import TestClient

from app.main import create_app
from tests.conftest import _FASTAPI_CALLABLE_CACHES
from tests.db_fixtures import create_api_user, noisy_jpeg
from tests.unit.ml.conftest import tiny_clip


def test_an_app_that_served_uploads_and_searches_is_freed_when_it_stops(db_settings):
    assert _FASTAPI_CALLABLE_CACHES, "FastAPI's callable caches moved: update tests/conftest.py"
    app = create_app(db_settings)
    with TestClient(app) as client:
        model = tiny_clip(0)
        app.state.container.model.install(model)
        user = create_api_user(client)
        files = [("files", (f"{i}.jpg", noisy_jpeg(seed=i), "image/jpeg")) for i in range(4)]
        assert client.post("/images", files=files, headers=user.headers).status_code == 202
        for _ in range(300):
            items = client.get("/images", headers=user.headers).json()["items"]
            if all(i["embedded"] for i in items):
                break
            __import__("time").sleep(0.1)
        assert client.get("/search", params={"q": "a dog"}, headers=user.headers).is_success
    gone_app, gone_model = weakref.ref(app), weakref.ref(model)
    del app, client, model
    for cache in _FASTAPI_CALLABLE_CACHES:
        cache.cache_clear()
    gc.collect()
    assert gone_model() is None, "the stopped app's model is still referenced"
    assert gone_app() is None, [type(r).__name__ for r in gc.get_referrers(gone_app())]
