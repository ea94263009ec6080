"""Library photos are decoded once: the scan stores the picture the model reads (the preview,
app/storage.py) under the content's hash, and the embedding reads it, not the file. So a
vector is always of the bytes its row's hash names, even when the file is replaced in place
between the scan and the embedding (on a real file system: the tmp_path folder); the rescan
that sees the new bytes embeds their own preview."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select, update

from app.ml.encode import encode_images
from app.models import Image
from app.services import embedding
from app.services.job_runs import JobContext
from tests.api.test_libraries import db_settings, paths, report  # noqa: F401 (the fixture)
from tests.api.test_search import wait_jobs
from tests.model_fixtures import tiny_serving  # noqa: F401
from tests.unit.test_storage import _gradient


def _photo(shift: int) -> bytes:
    """A 1200x900 JPEG (larger than the preview's side), a different picture per `shift`."""
    pixels = np.roll(_gradient(1200, 900), shift, axis=1)
    pixels[..., 2] = (pixels[..., 2].astype(int) + 3 * shift) % 256
    buf = io.BytesIO()
    PILImage.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _preview_vector(client, bundle, storage_path: str) -> np.ndarray:
    store = client.app.state.container.store
    with PILImage.open(store.path(store.preview_relpath(storage_path))) as p:
        side = embedding.decode_side(bundle, crops=False)
        p.draft("RGB", (side, side))
        return encode_images(bundle, [p.convert("RGB")])[0]


def _row(client, image_id: str) -> Image:
    with client.app.state.container.session_factory() as s:
        return s.scalars(select(Image).where(Image.id == image_id)).one()


def test_a_photo_replaced_in_place_is_embedded_from_its_rows_preview(
    api_client,
    folder_user,
    tiny_serving,  # noqa: F811
):
    client = api_client
    client.app.state.container.settings.search.regions = "none"
    user, lib = folder_user
    lib.mkdir(parents=True, exist_ok=True)
    (lib / "a.jpg").write_bytes(_photo(0))
    (lib / "b.jpg").write_bytes(_photo(300))
    r = client.post("/libraries", json={"path": str(lib)}, headers=user.headers)
    assert r.status_code == 202, r.text
    lib_id = r.json()["id"]
    wait_jobs(client)
    photo_id = paths(client, user)[str(lib / "a.jpg")]
    first = _row(client, photo_id)
    vector = np.frombuffer(first.embedding, np.float32)
    np.testing.assert_allclose(vector, _preview_vector(client, tiny_serving, first.storage_path),
                               atol=1e-6)  # fmt: skip

    # Replaced in place (new bytes, same name) and embedded again before any rescan: the vector
    # is the row's content's, from its preview, not the new file's; nothing failed.
    (lib / "a.jpg").write_bytes(_photo(600))
    with client.app.state.container.session_factory() as s:
        s.execute(update(Image).where(Image.id == photo_id).values(embedding_model="old"))
        s.commit()
    ctx = JobContext("job", user.id, "rebuild_index", {}, client.app.state.container.jobs,
                     lambda _: None)  # fmt: skip
    assert embedding.embed_pending(ctx, [photo_id]) == 1
    again = _row(client, photo_id)
    assert again.sha256 == first.sha256 and again.embed_error is None
    np.testing.assert_allclose(np.frombuffer(again.embedding, np.float32), vector, atol=1e-6)

    # The rescan sees the new bytes: new hash, new preview, the new picture's vector.
    r = client.post(f"/libraries/{lib_id}/scan", headers=user.headers)
    assert r.status_code == 202, r.text
    wait_jobs(client)
    assert report(client, user, lib_id)["changed"] == 1
    after = _row(client, photo_id)
    assert after.sha256 != first.sha256 and after.storage_path != first.storage_path
    new = np.frombuffer(after.embedding, np.float32)
    np.testing.assert_allclose(new, _preview_vector(client, tiny_serving, after.storage_path),
                               atol=1e-6)  # fmt: skip
    assert float(new @ vector) < 0.999  # another picture
