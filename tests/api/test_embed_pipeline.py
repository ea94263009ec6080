"""How embed_pending spends the CPU (issue 32): the next batch is decoded while the model runs
on this one, and with POLAR_THREADS__EMBEDDING=0 a batch takes every core unless a search of
this process is in flight. The vectors are those of the plain path."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select, update

from app.ml import onnx_engine
from app.ml.encode import encode_images
from app.ml.threads import cpu_count
from app.models import Image
from app.services import embedding
from app.services.job_runs import JobContext
from tests.api.test_search import upload, wait_jobs
from tests.model_fixtures import tiny_serving  # noqa: F401


def _stale_library(client: Any, make_user: Any, n: int) -> tuple[Any, list[str]]:
    """A user with `n` uploaded images whose embeddings are of another model (regions off)."""
    client.app.state.container.settings.search.regions = "none"
    user = make_user(client)
    ids = upload(client, user, range(n))
    wait_jobs(client)
    with client.app.state.container.session_factory() as s:
        s.execute(update(Image).values(embedding_model="old-model"))
        s.commit()
    return user, ids


def _ctx(client: Any, user: Any) -> JobContext:
    return JobContext("job", user.id, "rebuild_index", {}, client.app.state.container.jobs,
                      lambda _: None)  # fmt: skip


@pytest.mark.usefixtures("tiny_serving")
def test_the_next_batch_is_decoded_while_the_model_runs(api_client, make_user, monkeypatch):
    """The first batch's forward pass waits until a picture of the second batch is decoded: a
    pipeline that decodes only between passes would never get there (it waits out the 10 s)."""
    user, _ = _stale_library(api_client, make_user, 6)
    monkeypatch.setattr(embedding, "BATCH", 3)
    decoded_second = threading.Event()
    open_rgb, encode = embedding._open_rgb, embedding.encode_pixels
    calls: list[object] = []
    overlapped: list[bool] = []

    def spy_open(*args, **kwargs):
        calls.append(args[1])
        if len(calls) > 3:  # a picture of the second batch
            decoded_second.set()
        return open_rgb(*args, **kwargs)

    def slow_encode(bundle, pixels, *args, **kwargs):
        if not overlapped:
            overlapped.append(decoded_second.wait(10))
        return encode(bundle, pixels, *args, **kwargs)

    monkeypatch.setattr(embedding, "_open_rgb", spy_open)
    monkeypatch.setattr(embedding, "encode_pixels", slow_encode)
    assert embedding.embed_pending(_ctx(api_client, user), None) == 6
    assert overlapped == [True]


def test_prefetched_vectors_equal_the_plain_path_and_failures_are_kept(
    api_client,
    make_user,
    tiny_serving,  # noqa: F811
    monkeypatch,
):
    """Across several batches (one image unreadable), every stored vector is the model's vector
    of the image decoded alone, and the unreadable one is failed with its reason."""
    user, ids = _stale_library(api_client, make_user, 7)
    monkeypatch.setattr(embedding, "BATCH", 2)
    with api_client.app.state.container.session_factory() as s:
        paths = dict(s.execute(select(Image.id, Image.storage_path)).all())
    store = api_client.app.state.container.store
    broken = ids[3]
    store.path(paths[broken]).write_bytes(b"no longer an image")
    assert embedding.embed_pending(_ctx(api_client, user), None) == 7
    side = embedding.decode_side(tiny_serving, crops=False)  # the whole pass
    with api_client.app.state.container.session_factory() as s:
        rows = {r.id: r for r in s.scalars(select(Image))}
    for i in ids:
        if i == broken:
            assert rows[i].embedding_model == "old-model" and rows[i].embed_error
            continue
        picture = embedding._open_rgb(store, paths[i], side)
        assert picture is not None
        expected = encode_images(tiny_serving, [picture])[0]
        stored = np.frombuffer(rows[i].embedding, np.float32)
        np.testing.assert_allclose(stored, expected, atol=1e-6)
        assert rows[i].embed_error is None


@pytest.mark.parametrize(("searches", "expected"), [(0, "all"), (1, 1)])
@pytest.mark.usefixtures("tiny_serving")
def test_zero_threads_take_every_core_unless_a_search_runs(
    api_client, make_user, monkeypatch, searches, expected
):
    user, _ = _stale_library(api_client, make_user, 4)
    monkeypatch.setattr(embedding, "BATCH", 2)
    api_client.app.state.container.settings.threads.embedding = 0
    used: list[int] = []
    real = embedding.cpu_threads

    def spy(n: int):
        used.append(n)
        return real(n)

    monkeypatch.setattr(embedding, "cpu_threads", spy)
    foreground = api_client.app.state.container.foreground
    with foreground.active() if searches else contextlib.nullcontext():
        embedding.embed_pending(_ctx(api_client, user), None)
    assert used == [cpu_count() if expected == "all" else expected] * 2


@pytest.mark.usefixtures("tiny_serving")
def test_a_set_thread_count_is_kept_while_searches_run(api_client, make_user, monkeypatch):
    user, _ = _stale_library(api_client, make_user, 2)
    api_client.app.state.container.settings.threads.embedding = 3
    used: list[int] = []
    real = embedding.cpu_threads
    monkeypatch.setattr(embedding, "cpu_threads", lambda n: used.append(n) or real(n))
    with api_client.app.state.container.foreground.active():
        embedding.embed_pending(_ctx(api_client, user), None)
    assert used == [3]


@pytest.mark.parametrize("enabled", [True, False])
def test_the_onnx_engine_embeds_when_installed_and_enabled(
    api_client,
    make_user,
    tiny_serving,  # noqa: F811
    enabled,
):
    """POLAR_MODEL__ONNX (on by default): the job's whole-image pass runs on ONNX Runtime,
    exported into <data_dir>/onnx, and stores the PyTorch vectors within 1e-4; off, PyTorch
    runs and nothing is exported."""
    if enabled:
        pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    onnx_engine.forget_engines()
    settings = api_client.app.state.container.settings
    settings.model.onnx = enabled
    user, ids = _stale_library(api_client, make_user, 3)
    calls: list[int] = []
    real = onnx_engine.OnnxImageTower.__call__

    def counted(self, pixels):
        calls.append(len(pixels))
        return real(self, pixels)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_engine.OnnxImageTower, "__call__", counted)
        assert embedding.embed_pending(_ctx(api_client, user), None) == 3
    onnx_engine.forget_engines()
    exported = list((settings.data_dir / "onnx").glob("*.onnx"))
    if enabled:
        assert len(exported) == 1 and sum(calls) == 3
    else:
        assert not exported and not calls
    store = api_client.app.state.container.store
    side = embedding.decode_side(tiny_serving, crops=False)  # the whole pass
    with api_client.app.state.container.session_factory() as s:
        rows = {r.id: r for r in s.scalars(select(Image))}
    for i in ids:
        picture = embedding._open_rgb(store, rows[i].storage_path, side)
        assert picture is not None
        expected = encode_images(tiny_serving, [picture])[0]
        stored = np.frombuffer(rows[i].embedding, np.float32)
        np.testing.assert_allclose(stored, expected, atol=1e-4)


def test_batches_start_small_and_double_up_to_the_batch_size(monkeypatch):
    """The model starts on FIRST_BATCH photos, not after BATCH decodes; each item once, in order."""
    monkeypatch.setattr(embedding, "FIRST_BATCH", 4)
    monkeypatch.setattr(embedding, "BATCH", 32)
    items = list(range(100))
    batches = embedding._batches(items)
    assert [len(b) for b in batches] == [4, 8, 16, 32, 32, 8]
    assert [i for b in batches for i in b] == items
    monkeypatch.setattr(embedding, "BATCH", 3)  # a batch size below the first: it wins
    assert [len(b) for b in embedding._batches(items[:7])] == [3, 3, 1]
    assert embedding._batches([]) == []


def test_the_whole_pass_decodes_at_the_models_side_and_the_crops_at_twice_it(
    api_client,
    make_user,
    tiny_serving,  # noqa: F811
    monkeypatch,
):
    """A JPEG is decoded as small as its pass needs: the whole-image pass at the model's input
    side (a quarter-size draft of a camera photo), the crops' pass at twice it (a 60 % crop
    keeps more pixels than the model reads)."""
    user, _ = _stale_library(api_client, make_user, 3)
    settings = api_client.app.state.container.settings
    settings.search.regions, settings.search.region_method = "five", "crops"
    sides: list[int] = []
    open_rgb = embedding._open_rgb

    def spy(store, src, min_side=0, *args, **kwargs):
        sides.append(min_side)
        return open_rgb(store, src, min_side, *args, **kwargs)

    monkeypatch.setattr(embedding, "_open_rgb", spy)
    assert embedding.embed_pending(_ctx(api_client, user), None) == 3
    model_side = max(tiny_serving.model.visual.image_size)  # 32
    assert model_side == 32 and embedding.decode_side(tiny_serving, crops=False) == model_side
    assert sides == [model_side] * 3 + [2 * model_side] * 3


def test_a_large_photo_is_embedded_from_its_preview_not_decoded_twice(
    api_client,
    make_user,
    tiny_serving,  # noqa: F811
):
    """A camera-sized upload is embedded from the preview its upload made (the original is
    not opened again: here it is gone, and the vector is still stored), and the vector is the
    model's vector of that preview; a pass needing more than PREVIEW_SIDE reads the original."""
    import io

    from PIL import Image as PILImage

    from app.storage import PREVIEW_SIDE
    from tests.unit.test_storage import _gradient

    client = api_client
    client.app.state.container.settings.search.regions = "none"
    user = make_user(client)
    buf = io.BytesIO()
    PILImage.fromarray(_gradient(1600, 1200)).save(buf, "JPEG", quality=90)
    r = client.post("/images", headers=user.headers,
                    files={"files": ("big.jpg", buf.getvalue(), "image/jpeg")})  # fmt: skip
    assert r.status_code == 202, r.text
    wait_jobs(client)
    store = client.app.state.container.store
    with client.app.state.container.session_factory() as s:
        row = s.scalars(select(Image)).one()
        s.execute(update(Image).values(embedding_model="old-model"))
        s.commit()
    preview = store.path(store.preview_relpath(row.storage_path))
    assert preview.exists()
    store.path(row.storage_path).unlink()  # only the preview can give the vector now
    assert embedding.embed_pending(_ctx(client, user), None) == 1
    with client.app.state.container.session_factory() as s:
        row = s.scalars(select(Image)).one()
    assert row.embed_error is None and row.embedding_model != "old-model"
    with PILImage.open(preview) as p:
        p.draft("RGB", (32, 32))
        expected = encode_images(tiny_serving, [p.convert("RGB")])[0]
    np.testing.assert_allclose(np.frombuffer(row.embedding, np.float32), expected, atol=1e-6)
    # More than the preview holds: the original is read (and is gone here).
    assert embedding._open_rgb(store, row.storage_path, PREVIEW_SIDE + 1) is None
    assert embedding._open_rgb(store, row.storage_path, PREVIEW_SIDE).size == (800, 600)
