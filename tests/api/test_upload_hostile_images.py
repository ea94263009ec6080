"""Hostile image files through the API: a 422 naming the file, never a 500; an index rebuild
skips a stored file that no longer decodes and embeds the rest of its batch."""

from __future__ import annotations

import os

from sqlalchemy import select, update

from app.models import Image
from tests.api.test_search import library, upload, wait_jobs  # noqa: F401
from tests.db_fixtures import png_claiming
from tests.model_fixtures import tiny_serving  # noqa: F401
from tests.unit.test_untrusted_images import tiff_with_strip_offsets_of_type, unblock_fifo


def test_a_tiff_that_crashes_pillow_is_a_422_naming_the_file(api_client, make_user):
    user = make_user(api_client)
    files = [("files", ("strips.tif", tiff_with_strip_offsets_of_type(11), "image/tiff"))]
    r = api_client.post("/images", files=files, headers=user.headers)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_image"
    assert "strips.tif" in err["message"]
    assert [f["filename"] for f in err["detail"]["files"]] == ["strips.tif"]


def test_an_image_past_pillows_limit_quotes_the_configured_limit(api_client, make_user):
    user = make_user(api_client)
    files = [("files", ("bomb.png", png_claiming(30_000, 30_000), "image/png"))]
    r = api_client.post("/images", files=files, headers=user.headers)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "image_too_large"
    assert "30000×30000" in err["message"] and "178956970" not in err["message"]


def test_a_rebuild_skips_swapped_files_and_embeds_the_rest(
    api_client,
    library,  # noqa: F811
    tiny_serving,  # noqa: F811
):
    user, ids = library
    store = api_client.app.state.container.store
    with api_client.app.state.container.session_factory() as s:
        paths = dict(s.execute(select(Image.id, Image.storage_path)).all())
        s.execute(update(Image).values(embedding=None, embedding_model=None))
        s.commit()
    bomb, fifo = store.path(paths[ids[0]]), store.path(paths[ids[1]])
    bomb.write_bytes(png_claiming(30_000, 30_000))  # Pillow's DecompressionBombError
    fifo.unlink()
    os.mkfifo(fifo)  # opening it by path would wait for a writer forever
    try:
        r = api_client.post("/index/rebuild", headers=user.headers)
        assert r.status_code == 202, r.text
        wait_jobs(api_client, timeout=30)
    finally:
        unblock_fifo(fifo)
    with api_client.app.state.container.session_factory() as s:
        embedded = dict(s.execute(select(Image.id, Image.embedding_model)).all())
    assert embedded[ids[0]] is None and embedded[ids[1]] is None
    assert all(embedded[i] == tiny_serving.fingerprint.model_id for i in ids[2:])
