"""The Immich bridge, driven with requests in exactly Immich's format.

Immich's server (server/src/repositories/machine-learning.repository.ts) POSTs a multipart form
to /predict: `entries` = JSON.stringify({clip: {textual: {modelName, options: {language}}}}) with
`text`, or {clip: {visual: {modelName}}} with `image` (a file part); it reads `clip` (the
embedding as a string holding a JSON array) and, for images, `imageHeight`/`imageWidth`.
Its availability check is GET /ping.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.config import ImmichSettings, ModelSettings, Settings
from app.demo.run_demo import FIDO_CATEGORY, FIDO_INDEX, build_library, concept_photos
from app.demo.world import World
from app.main import create_app
from app.ml.model import DEMO_MODEL_NAME, ClipBundle, demo_checkpoint_path
from app.services.immich import ClientRateLimit
from tests.api.test_search import wait_jobs
from tests.db_fixtures import ApiUser, create_api_user, noisy_jpeg
from tests.unit.ml.conftest import tiny_clip

PLACEHOLDER_KEY = "polar_notakey_notasecret"


def textual(model: str, language: str = "en") -> str:
    return json.dumps(
        {"clip": {"textual": {"modelName": model, "options": {"language": language}}}}
    )


def visual(model: str) -> str:
    return json.dumps({"clip": {"visual": {"modelName": model}}})


def predict_text(client: TestClient, entries: str, text: str) -> httpx.Response:
    # Immich's FormData: plain fields, sent as multipart/form-data.
    return client.post("/predict", data={"entries": entries, "text": text}, files={"x": ("", b"")})


def predict_image(client: TestClient, entries: str, image: bytes) -> httpx.Response:
    # Immich appends a Blob: a file part named "image" with filename "blob".
    return client.post(
        "/predict",
        data={"entries": entries},
        files={"image": ("blob", image, "application/octet-stream")},
    )


def _bridge(tmp_path: Path, **immich: Any) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        broker_url="",
        immich=ImmichSettings(api_key=PLACEHOLDER_KEY, **immich),
    )


def tiny_bundle() -> ClipBundle:
    """The tiny random CLIP, its weights declared as tag "s0": Immich's name `tiny__s0`."""
    return replace(tiny_clip(0), weights_tag="s0")


@pytest.fixture
def bridge(tmp_path: Path) -> Iterator[tuple[TestClient, ApiUser]]:
    app = create_app(_bridge(tmp_path, forward_url="http://immich-ml.invalid:3003"))
    app.state.container.model.install(tiny_bundle())
    with TestClient(app) as client:
        user = create_api_user(client)
        app.state.container.settings.immich.api_key = user.key
        yield client, user


def tiny_name() -> str:
    return "tiny__s0"


def test_bridge_is_off_unless_configured(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", broker_url="")
    with TestClient(create_app(settings)) as client:
        assert client.get("/ping").status_code == 404
        r = predict_text(client, textual("ViT-B-32__openai"), "a dog")
        assert r.status_code == 404
        assert "/predict" not in client.get("/openapi.json").json()["paths"]


def test_ping_answers_pong_without_a_key(bridge) -> None:
    client, _ = bridge
    r = client.get("/ping")
    assert r.status_code == 200 and r.text == "pong"


def test_textual_is_the_bridge_users_search_vector(bridge) -> None:
    client, user = bridge
    r = predict_text(client, textual(tiny_name()), "a photo of a hat")
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"clip"} and isinstance(body["clip"], str)
    vector = json.loads(body["clip"])
    mine = client.post("/embed/text", json={"q": "a photo of a hat"}, headers=user.headers).json()
    assert vector == pytest.approx(mine["embedding"], abs=1e-6)


def test_visual_answers_embedding_and_size(bridge) -> None:
    client, _ = bridge
    jpeg = noisy_jpeg(seed=3)
    r = predict_image(client, visual(tiny_name()), jpeg)
    assert r.status_code == 200, r.text
    body = r.json()
    from PIL import Image

    w, h = Image.open(io.BytesIO(jpeg)).size
    assert body["imageWidth"] == w and body["imageHeight"] == h
    vector = np.asarray(json.loads(body["clip"]), np.float32)
    assert vector.shape == (tiny_clip(0).embed_dim,)
    assert float(np.linalg.norm(vector)) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("entries", "code"),
    [
        ("{not json", "invalid_entries"),
        ("[]", "invalid_entries"),
        (json.dumps({"clip": {"textual": {}}}), "invalid_entries"),
        (json.dumps({"clip": {"textual": {"modelName": 3}}}), "invalid_entries"),
        (json.dumps({"clip": {"sideways": {"modelName": "x"}}}), "invalid_entries"),
        (json.dumps({"clip": {"textual": {"modelName": "ViT-B-32__openai"}}}), "model_mismatch"),
        # Nested past the JSON parser's stack, and lone surrogates (JSON escapes) in each name
        # the answer would echo: all were 500s that cut the connection.
        ("[" * 100_000 + "]" * 100_000, "invalid_entries"),
        ('{"clip": {"textual": {"modelName": "\\ud800"}}}', "invalid_entries"),
        ('{"\\ud800": {"textual": {"modelName": "x"}}}', "invalid_entries"),
        ('{"clip": {"\\udfff": {"modelName": "x"}}}', "invalid_entries"),
        ('{"clip": {"textual": {"modelName": "a\\u0000"}}}', "invalid_entries"),
        (
            json.dumps(
                {"clip": {"textual": {"modelName": "x"}}, "ocr": {"ocr": {"modelName": "y"}}}
            ),
            "invalid_entries",
        ),
    ],
)
def test_bad_requests_get_a_clear_4xx(bridge, entries: str, code: str) -> None:
    client, _ = bridge
    r = predict_text(client, entries, "a dog")
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == code


def test_a_nul_in_the_text_is_a_422(bridge) -> None:
    client, _ = bridge
    r = predict_text(client, textual(tiny_name()), "a dog\x00")
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "validation_failed"


def test_predict_takes_one_image_not_a_whole_upload(bridge) -> None:
    """/predict takes no key, so its body limit is one image's, not the upload routes'."""
    client, _ = bridge
    limits = client.app.state.container.settings.limits
    over = limits.max_upload_bytes + 1024 * 1024
    r = client.post(
        "/predict",
        content=b"x",
        headers={"content-type": "multipart/form-data; boundary=b", "content-length": str(over)},
    )
    assert r.status_code == 413, r.text
    assert r.json()["error"]["detail"]["max_bytes"] < over


def test_missing_inputs_are_4xx(bridge) -> None:
    client, _ = bridge
    r = client.post("/predict", data={"entries": textual(tiny_name())}, files={"x": ("", b"")})
    assert r.status_code == 422 and r.json()["error"]["code"] == "no_input"
    r = client.post("/predict", data={"text": "a dog"}, files={"x": ("", b"")})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_entries"
    r = predict_image(client, visual(tiny_name()), b"not an image")
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_image"


def test_a_hostile_image_is_a_4xx_not_a_500(bridge) -> None:
    """The bridge decodes with the uploads' checks (app.storage.untrusted_image): a TIFF whose
    strip offsets are floats made Pillow raise TypeError, a 500; an ICO is not an allowed
    format."""
    from PIL import Image

    from tests.unit.test_untrusted_images import tiff_with_strip_offsets_of_type

    client, _ = bridge
    r = predict_image(client, visual(tiny_name()), tiff_with_strip_offsets_of_type(11))
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_image", r.text
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, "ICO")
    r = predict_image(client, visual(tiny_name()), buf.getvalue())
    assert r.status_code == 415, r.text


def test_model_mismatch_names_both_models(bridge) -> None:
    client, _ = bridge
    r = predict_image(client, visual("ViT-B-16-SigLIP__webli"), noisy_jpeg(seed=1))
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "model_mismatch" and "ViT-B-16-SigLIP__webli" in err["message"]
    assert err["detail"]["served"] == [tiny_name()]


def test_a_revoked_bridge_key_is_a_clear_503(bridge) -> None:
    client, _ = bridge
    client.app.state.container.settings.immich.api_key = PLACEHOLDER_KEY  # type: ignore[attr-defined]
    r = predict_text(client, textual(tiny_name()), "a dog")
    assert r.status_code == 503 and r.json()["error"]["code"] == "immich_bridge_misconfigured"


FACES = json.dumps(
    {
        "facial-recognition": {
            "detection": {"modelName": "buffalo_l", "options": {"minScore": 0.7}},
            "recognition": {"modelName": "buffalo_l"},
        }
    }
)


def test_other_tasks_are_forwarded_unchanged(bridge) -> None:
    client, _ = bridge
    seen: list[httpx.Request] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200, json={"facial-recognition": [], "imageHeight": 8, "imageWidth": 9}
        )

    client.app.state.container.bridge.client = httpx.AsyncClient(
        transport=httpx.MockTransport(upstream)
    )
    jpeg = noisy_jpeg(seed=2)
    r = predict_image(client, FACES, jpeg)
    assert r.status_code == 200, r.text
    assert r.json() == {"facial-recognition": [], "imageHeight": 8, "imageWidth": 9}
    (sent,) = seen
    assert str(sent.url) == "http://immich-ml.invalid:3003/predict"
    assert sent.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert FACES.encode() in sent.content and jpeg in sent.content


def test_upstream_errors_pass_through_and_a_dead_upstream_is_502(bridge) -> None:
    client, _ = bridge
    app: Any = client.app
    app.state.container.bridge.client = httpx.AsyncClient(
        transport=httpx.MockTransport(lambda _r: httpx.Response(422, json={"detail": "x"}))
    )
    assert predict_image(client, FACES, noisy_jpeg(seed=2)).status_code == 422

    def dead(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    app.state.container.bridge.client = httpx.AsyncClient(transport=httpx.MockTransport(dead))
    r = predict_image(client, FACES, noisy_jpeg(seed=2))
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"


def test_other_tasks_are_refused_without_a_forward_url(tmp_path: Path) -> None:
    """The advice is the forward URL or faces/OCR off in Immich, never a second URL in Immich:
    Immich would mark this service unhealthy after each face request and send its searches,
    unpersonalized, to the other (machine-learning.repository.ts `predict`, commit
    028fab83fded0590eca2772ef2add592294749ac: healthy URLs first, a failure marks one
    unhealthy)."""
    app = create_app(_bridge(tmp_path))
    app.state.container.model.install(tiny_bundle())
    with TestClient(app) as client:
        r = predict_image(client, FACES, noisy_jpeg(seed=2))
        assert r.status_code == 422
        assert r.json()["error"]["code"] == "task_not_served"
        message = r.json()["error"]["message"]
        assert "POLAR_IMMICH__FORWARD_URL" in message
        assert "Facial Recognition and OCR off" in message
        assert "give Immich that URL too" not in message and "only URL" in message


def test_immich_finds_fido_on_the_beach(tmp_path: Path) -> None:
    """Immich's smart search, end to end: the library embedded through the visual endpoint and
    kept as Immich keeps it (the strings), Fido taught through our API, the query encoded
    through the textual endpoint and the vectors ranked by cosine, as Immich's database does."""
    settings = _bridge(tmp_path)
    settings.model = ModelSettings(
        name=DEMO_MODEL_NAME, pretrained=str(demo_checkpoint_path()), device="cpu", preload=False
    )
    world = World(seed=0)
    fido = world.instance(FIDO_INDEX, FIDO_CATEGORY)
    # Fido's look-alikes (its shape twin in other colours) stay out: the demo model confuses them.
    library = [
        item
        for item in build_library(world, fido, per_scene=1, others=8)
        if item.kind != "look-alike" and not item.kind.startswith("look-alike")
    ]
    with TestClient(create_app(settings)) as client:
        user = create_api_user(client)
        client.app.state.container.settings.immich.api_key = user.key  # type: ignore[attr-defined]
        stored: dict[str, np.ndarray] = {}  # Immich's smart_search table: asset -> embedding
        for item in library:
            r = predict_image(client, visual(DEMO_MODEL_NAME), item.png)
            assert r.status_code == 200, r.text
            stored[item.filename] = np.asarray(json.loads(r.json()["clip"]), np.float32)
        files = [
            ("files", (f"fido{i}.png", png, "image/png"))
            for i, png in enumerate(concept_photos(world, fido))
        ]
        r = client.post(
            "/concepts",
            data={"name": "Fido", "category": FIDO_CATEGORY},
            files=files,
            headers=user.headers,
        )
        assert r.status_code == 202, r.text
        wait_jobs(client, timeout=300)
        r = predict_text(client, textual(DEMO_MODEL_NAME), "Fido on the beach")
        assert r.status_code == 200, r.text
        query = np.asarray(json.loads(r.json()["clip"]), np.float32)
    names = list(stored)
    matrix = np.stack([stored[n] for n in names])
    cosine = matrix @ query / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(query))
    ranking = [names[i] for i in np.argsort(-cosine)]
    rank = next(i + 1 for i, n in enumerate(ranking) if n.startswith("fido-beach"))
    assert rank <= 2, ranking[:5]


# --- Health: /ping says pong only while the bridge can serve Immich's searches -------------


def test_ping_fails_while_the_bridge_key_is_revoked(bridge) -> None:
    """Immich's availability check (`check`: GET /ping, healthy when `response.ok`) must see a
    bridge that cannot answer its searches as down, or Immich keeps sending them here."""
    client, user = bridge
    client.app.state.container.settings.immich.api_key = PLACEHOLDER_KEY  # type: ignore[attr-defined]
    r = client.get("/ping")
    assert r.status_code == 503 and "POLAR_IMMICH__API_KEY" in r.text
    client.app.state.container.settings.immich.api_key = user.key  # type: ignore[attr-defined]
    assert client.get("/ping").text == "pong"


def test_ping_fails_while_the_model_is_not_loaded(tmp_path: Path) -> None:
    settings = _bridge(tmp_path)
    settings.model = ModelSettings(
        name="no-such-model", pretrained="openai", device="cpu", fallback_to_demo=False
    )
    with TestClient(create_app(settings)) as client:
        user = create_api_user(client)
        client.app.state.container.settings.immich.api_key = user.key  # type: ignore[attr-defined]
        loader = client.app.state.container.model  # type: ignore[attr-defined]
        while loader.loading:
            time.sleep(0.05)
        r = client.get("/ping")
        assert r.status_code == 503 and "model" in r.text


# --- Long queries: cut to the model's context as Immich's machine learning cuts -----------


def immich_truncated_vector(bundle: ClipBundle, text: str) -> np.ndarray:
    """The vector Immich's ML computes for `text`: tokens cut to the context with the start and
    end tokens kept (machine-learning/immich_ml/models/clip/textual.py, commit
    03112cf7e16dc76438b87b7d3e007669a6e48206: `tokenizer.enable_truncation(max_length=
    context_length)` on a tokenizer whose template adds <start> and <end>), built here by hand."""
    tok = bundle.tokenizer
    inner = tok.encode(" ".join(text.split()))[: bundle.context_length - 2]
    ids = [tok.sot_token_id, *inner, tok.eot_token_id]
    tokens = torch.zeros(1, bundle.context_length, dtype=torch.long)
    tokens[0, : len(ids)] = torch.tensor(ids)
    with torch.inference_mode():
        f = bundle.model.encode_text(tokens)
    return torch.nn.functional.normalize(f.float(), dim=-1)[0].numpy()


LONG = " ".join(["a red hat on a wooden table in the morning light"] * 12)  # ~130 tokens


def test_a_long_query_is_truncated_like_immichs_ml_not_refused(bridge) -> None:
    client, user = bridge
    r = predict_text(client, textual(tiny_name()), LONG)
    assert r.status_code == 200, r.text
    got = np.asarray(json.loads(r.json()["clip"]), np.float32)
    want = immich_truncated_vector(tiny_bundle(), LONG)
    assert np.allclose(got, want, atol=1e-5)
    # The service's own /search keeps its 422.
    r = client.get("/search", params={"q": LONG}, headers=user.headers)
    assert r.status_code == 422 and r.json()["error"]["code"] == "query_too_long"


def test_a_concept_applies_when_its_name_survives_the_cut(bridge) -> None:
    from tests.api.test_search import _add_concept

    client, user = bridge
    _add_concept(client, user.id, tiny_bundle(), "Fido", "hat")

    def vector(text: str) -> np.ndarray:
        r = predict_text(client, textual(tiny_name()), text)
        assert r.status_code == 200, r.text
        return np.asarray(json.loads(r.json()["clip"]), np.float32)

    plain = immich_truncated_vector(tiny_bundle(), "fido " + LONG)
    # Named first: it survives the cut, and the answer is personal (and the rewriting, longer
    # than the name, does not make it a 422).
    first = vector("Fido " + LONG)
    assert not np.allclose(first, plain, atol=1e-3)
    mine = client.post("/embed/text", json={"q": "Fido on a hat"}, headers=user.headers).json()
    assert mine["personalized"] is True
    # Named past the context: cut off, as Immich's ML would cut it; nothing of Fido applies.
    last = vector(LONG + " Fido")
    assert np.allclose(last, immich_truncated_vector(tiny_bundle(), LONG + " fido"), atol=1e-5)


def test_counts_and_errors_say_nothing_about_the_rewritten_text(bridge) -> None:
    """A name that rewrites to more tokens must not turn a fitting query into an error, nor
    show in any count: the answer to an unauthenticated caller is the vector alone."""
    from tests.api.test_search import _add_concept

    client, user = bridge
    _add_concept(client, user.id, tiny_bundle(), "Rex", "hat")
    words = LONG.split()
    # Just within the context as typed ("rex": 1 token); past it once rewritten ("sks hat": 2).
    tok = tiny_bundle().tokenizer
    n = max(n for n in range(len(words)) if len(tok.encode(" ".join(["rex", *words[:n]]))) <= 75)
    query = " ".join(["Rex", *words[:n]])
    assert len(tok.encode(query.lower())) <= 75 < len(tok.encode("sks hat " + query[4:]))
    r = predict_text(client, textual(tiny_name()), query)
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"clip"}
    r = predict_text(client, textual(tiny_name()), "x" * 2000)  # over max_query_chars
    assert r.status_code == 422 and "tokens" not in r.text


# --- Containment: allowed client networks and a per-client rate limit ----------------------


def test_only_allowed_client_networks_reach_the_bridge(tmp_path: Path) -> None:
    app = create_app(_bridge(tmp_path, allowed_clients=["172.18.0.0/16"]))
    app.state.container.model.install(tiny_bundle())
    with TestClient(app, client=("10.1.2.3", 40000)) as outsider:
        user = create_api_user(outsider)
        app.state.container.settings.immich.api_key = user.key
        assert outsider.get("/ping").status_code == 403
        r = predict_text(outsider, textual(tiny_name()), "a dog")
        assert r.status_code == 403 and r.json()["error"]["code"] == "client_not_allowed"
        assert outsider.get("/healthz").status_code == 200  # the rest of the API is not the bridge
        immich = TestClient(app, client=("172.18.0.5", 40000))  # the app is already started
        assert immich.get("/ping").text == "pong"
        assert predict_text(immich, textual(tiny_name()), "a dog").status_code == 200


def test_allowed_clients_must_be_networks() -> None:
    with pytest.raises(ValueError, match="not an address or CIDR"):
        ImmichSettings(api_key="k", allowed_clients=["immich-server"])


def test_textual_requests_are_rate_limited_per_client(tmp_path: Path) -> None:
    app = create_app(_bridge(tmp_path, text_rate_per_minute=2))
    app.state.container.model.install(tiny_bundle())
    with TestClient(app, client=("172.18.0.5", 1)) as one:
        user = create_api_user(one)
        app.state.container.settings.immich.api_key = user.key
        codes = [predict_text(one, textual(tiny_name()), "a dog").status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        # Images (Immich's indexing job) are not counted.
        assert predict_image(one, visual(tiny_name()), noisy_jpeg(seed=1)).status_code == 200
        other = TestClient(app, client=("172.18.0.6", 1))  # the app is already started
        assert predict_text(other, textual(tiny_name()), "a dog").status_code == 200


def test_rate_limit_refills_over_time() -> None:
    now = [0.0]
    limit = ClientRateLimit(60, clock=lambda: now[0], max_clients=2)
    assert [limit.allow("a") for _ in range(61)].count(True) == 60
    assert not limit.allow("a")
    now[0] += 1.0  # one token a second
    assert limit.allow("a") and not limit.allow("a")
    for c in ("b", "c", "d"):
        limit.allow(c)
    assert len(limit._buckets) == 2  # bounded


# --- Forwarded work never holds a search turn --------------------------------------------


def test_a_slow_forwarded_request_holds_no_search_turn(tmp_path: Path) -> None:
    """With one search turn, a face request waiting on a slow upstream must not hold it: a
    search from Immich (and one of the API) are answered while it waits."""
    settings = _bridge(tmp_path, forward_url="http://immich-ml.invalid:3003")
    settings.threads.concurrent_searches = 1
    app = create_app(settings)
    app.state.container.model.install(tiny_bundle())
    release, arrived = threading.Event(), threading.Event()

    async def slow(request: httpx.Request) -> httpx.Response:  # noqa: ARG001
        arrived.set()
        while not release.is_set():
            await anyio.sleep(0.01)
        return httpx.Response(200, json={"facial-recognition": []})

    with TestClient(app) as client:
        user = create_api_user(client)
        app.state.container.settings.immich.api_key = user.key
        app.state.container.bridge.client = httpx.AsyncClient(transport=httpx.MockTransport(slow))
        faces: list[int] = []
        jpeg = noisy_jpeg(seed=2)
        waiting = threading.Thread(
            target=lambda: faces.append(predict_image(client, FACES, jpeg).status_code)
        )
        waiting.start()
        try:
            assert arrived.wait(30)
            answered: list[int] = []
            search = threading.Thread(
                target=lambda: answered.extend(
                    [
                        predict_text(client, textual(tiny_name()), "a dog").status_code,
                        client.get(
                            "/search", params={"q": "a dog"}, headers=user.headers
                        ).status_code,
                    ]
                )
            )
            search.start()
            search.join(60)  # a deadlock guard, not a timing: before, this waited for `release`
            assert answered == [200, 200] and not faces
        finally:
            release.set()
            waiting.join(60)
        assert faces == [200]


def test_bridge_images_take_their_own_turns_not_the_searches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images (Immich's indexing) are encoded POLAR_IMMICH__CONCURRENT_IMAGES at a time and
    never in a search turn: with one search turn and images stuck in the model call, Immich's
    and the API's searches are answered, and no second image enters the model call."""
    import app.services.immich as bridge_service

    settings = _bridge(tmp_path, concurrent_images=1)
    settings.threads.concurrent_searches = 1
    app = create_app(settings)
    app.state.container.model.install(tiny_bundle())
    release, inside, most = threading.Event(), [0], [0]
    real = bridge_service.encode_images

    def held(bundle: ClipBundle, images: list[Any]) -> np.ndarray:
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        release.wait(60)
        inside[0] -= 1
        return real(bundle, images)

    monkeypatch.setattr(bridge_service, "encode_images", held)
    with TestClient(app) as client:
        user = create_api_user(client)
        app.state.container.settings.immich.api_key = user.key
        jpeg = noisy_jpeg(seed=4)
        codes: list[int] = []
        images = [
            threading.Thread(
                target=lambda: codes.append(
                    predict_image(client, visual(tiny_name()), jpeg).status_code
                )
            )
            for _ in range(3)
        ]
        for t in images:
            t.start()
        try:
            deadline = time.monotonic() + 30
            while inside[0] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert predict_text(client, textual(tiny_name()), "a dog").status_code == 200
            r = client.get("/search", params={"q": "a dog"}, headers=user.headers)
            assert r.status_code == 200 and not codes
        finally:
            release.set()
            for t in images:
                t.join(60)
        assert codes == [200, 200, 200] and most[0] == 1
