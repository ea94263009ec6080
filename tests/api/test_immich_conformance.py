"""Conformance with Immich: its server's exact requests, answers read as Immich reads them,
under Immich's model names, with a real-size ViT-B-32 from a local file (random weights).

Sources (immich-app/immich, read through the code search):
- server/src/repositories/machine-learning.repository.ts @ 028fab83fded0590eca2772ef2add592294749ac:
  `getFormData` appends `entries` = JSON.stringify(request) first, then `text`, or `image` as
  `new Blob([...])`; `predict` POSTs the FormData with Node's fetch to `new URL('/predict', url)`
  and returns `response[ModelTask.SEARCH]` (a string) for CLIP; `encodeText` sends
  {clip: {textual: {modelName, options: {language}}}}, `encodeImage` {clip: {visual: {modelName}}}.
- server/src/constants.ts @ 02454cb48e9aee23af9b1293e525bcec9bcf1344: CLIP_MODEL_INFO, the
  vector size of each model name (ViT-B-32__openai: 512); server/src/utils/misc.ts @
  012a83456ab75e8f3f382f7ffdbc597eb5276d3c: `getCLIPModelInfo` refuses any other name.
- machine-learning/immich_ml/main.py @ 02470112126684dd0898985262f26f2814b5280a: `/ping`
  answers "pong"; `/predict` reads `entries`, `image` (File) or `text` (Form).
- machine-learning/immich_ml/models/clip/textual.py @ 03112cf7e16dc76438b87b7d3e007669a6e48206:
  the query is cut to the context (`enable_truncation(max_length=context_length)`).
Node's fetch (undici, lib/web/fetch/body.js `extractBody`) serialises a FormData with the
boundary `----formdata-undici-0` + 11 digits, a string part as `Content-Disposition: form-data;
name="..."` + CRLF CRLF + value (line breaks as CRLF) + CRLF, a Blob part with `; filename="blob"`
and `Content-Type: application/octet-stream`, and ends with `--boundary--`.
"""

from __future__ import annotations

import gc
import io
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load_file, save_file

from app.config import ImmichSettings, ModelSettings, Settings
from app.main import create_app
from app.ml.model import (
    DEMO_MODEL_NAME,
    ModelUnavailableError,
    activation_of,
    forget_clips,
    load_clip,
)
from app.services.immich import IMMICH_CLIP_MODELS
from tests.db_fixtures import create_api_user, noisy_jpeg

pytestmark = [pytest.mark.slow, pytest.mark.real_size]

IMMICH_DEFAULT = "ViT-B-32__openai"


def node_form(fields: list[tuple[str, str | bytes]]) -> tuple[bytes, str]:
    """The body and Content-Type Node's fetch sends for a FormData of these fields (a bytes
    value is a Blob, as Immich appends the image)."""
    boundary = "----formdata-undici-0" + f"{random.randrange(10**11):011d}"

    def crlf(value: str) -> str:
        return re.sub(r"\r?\n|\r", "\r\n", value)

    out = bytearray()
    for name, value in fields:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{crlf(name)}"'
        if isinstance(value, str):
            out += f"{head}\r\n\r\n{crlf(value)}\r\n".encode()
        else:
            blob = "Content-Type: application/octet-stream"
            out += f'{head}; filename="blob"\r\n{blob}\r\n\r\n'.encode()
            out += value + b"\r\n"
    out += f"--{boundary}--".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def encode_text_request(text: str, model: str = IMMICH_DEFAULT) -> tuple[bytes, str]:
    entries = {"clip": {"textual": {"modelName": model, "options": {"language": "en-US"}}}}
    return node_form([("entries", json.dumps(entries, separators=(",", ":"))), ("text", text)])


def encode_image_request(image: bytes, model: str = IMMICH_DEFAULT) -> tuple[bytes, str]:
    entries = {"clip": {"visual": {"modelName": model}}}
    return node_form([("entries", json.dumps(entries, separators=(",", ":"))), ("image", image)])


def post(client: TestClient, form: tuple[bytes, str]) -> object:
    body, content_type = form
    return client.post("/predict", content=body, headers={"content-type": content_type})


_FLOAT = r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_PGVECTOR = re.compile(rf"\[{_FLOAT}(?:,{_FLOAT})*\]")


def as_immich_stores_it(clip: object, model: str) -> np.ndarray:
    """Immich hands the `clip` string to its database as a pgvector literal ('[x,y,...]') for a
    column sized by CLIP_MODEL_INFO[model]: anything else fails there."""
    assert isinstance(clip, str) and _PGVECTOR.fullmatch(clip), str(clip)[:80]
    vector = np.asarray([float(x) for x in clip[1:-1].split(",")], np.float32)
    assert vector.shape == (IMMICH_CLIP_MODELS[model],)
    assert np.all(np.isfinite(vector))
    return vector


@pytest.fixture(autouse=True)
def _one_model_of_a_test_at_a_time() -> Iterator[None]:
    """The models a test loads through the process-wide cache (about 600 MB each) go when it
    ends; only the demo model and the module's served app stay."""
    yield
    forget_clips(lambda bundle: bundle.fingerprint.model_id.startswith(f"{DEMO_MODEL_NAME}/"))
    gc.collect()


@pytest.fixture(scope="module")
def vit_b32_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real-size ViT-B-32 checkpoint of random weights (the offline recipe's local file)."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32")
    state = {k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("vitb32") / "vit-b-32.safetensors"
    save_file(state, str(path))
    return path


def _app(tmp_path: Path, model: ModelSettings) -> Iterator[TestClient]:
    settings = Settings(
        data_dir=tmp_path / "data",
        broker_url="",
        model=model,
        immich=ImmichSettings(api_key="polar_placeholder_notakey"),
    )
    with TestClient(create_app(settings)) as client:
        user = create_api_user(client)
        client.app.state.container.settings.immich.api_key = user.key  # type: ignore[attr-defined]
        client.app.state.container.model.get()  # type: ignore[attr-defined]
        yield client


@pytest.fixture(scope="module")
def declared(tmp_path_factory: pytest.TempPathFactory, vit_b32_file: Path) -> Iterator[TestClient]:
    """The bridge serving the file declared as open_clip's ViT-B-32 `openai` weights."""
    model = ModelSettings(
        name="ViT-B-32",
        pretrained=str(vit_b32_file),
        checkpoint_tag="openai",
        device="cpu",
        fallback_to_demo=False,
    )
    yield from _app(tmp_path_factory.mktemp("declared"), model)


def test_immichs_default_model_is_answered_from_a_declared_local_file(declared) -> None:
    client = declared
    assert client.get("/ping").text == "pong"
    r = post(client, encode_text_request("a dog on the beach"))
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"clip"}
    text = as_immich_stores_it(r.json()["clip"], IMMICH_DEFAULT)
    assert float(np.linalg.norm(text)) == pytest.approx(1.0, abs=1e-4)

    jpeg = noisy_jpeg(seed=5)
    r = post(client, encode_image_request(jpeg))
    assert r.status_code == 200, r.text
    body = r.json()
    as_immich_stores_it(body["clip"], IMMICH_DEFAULT)
    w, h = Image.open(io.BytesIO(jpeg)).size
    assert (body["imageWidth"], body["imageHeight"]) == (w, h)

    # Immich's names, as its clients spell them: with the HF org prefix, in any case.
    for name in ("immich-app/ViT-B-32__openai", "vit-b-32__openai"):
        assert post(client, encode_text_request("a dog", model=name)).status_code == 200
    # A long query is cut as Immich's ML cuts it, not refused.
    r = post(client, encode_text_request(" ".join(["a photo of a dog"] * 40)))
    assert r.status_code == 200, r.text


def test_the_model_has_the_activation_its_weights_were_trained_with(declared, vit_b32_file):
    """open_clip's pretrained config says `quick_gelu: True` for ViT-B-32/openai; the served
    model must be built with it, and its id says so (/readyz, search answers, concepts)."""
    client = declared
    serving = client.app.state.container.model.get()  # type: ignore[attr-defined]
    want = "quick_gelu" if open_clip.get_pretrained_cfg("ViT-B-32", "openai")["quick_gelu"] else ""
    assert activation_of(serving.bundle.model) == want == serving.bundle.fingerprint.activation
    ready = client.get("/readyz").json()
    assert ready["model"].startswith("ViT-B-32-quickgelu/openai@"), ready
    # The vector is the one open_clip's QuickGELU model computes from the same file, not GELU's.
    r = post(client, encode_text_request("a red hat"))
    got = np.asarray(json.loads(r.json()["clip"]), np.float32)
    tokens = open_clip.get_tokenizer("ViT-B-32")(["a red hat"])

    def reference(quick: bool) -> np.ndarray:
        model = open_clip.create_model(
            "ViT-B-32", pretrained=str(vit_b32_file), force_quick_gelu=quick
        ).eval()
        with torch.inference_mode():
            f = model.encode_text(tokens)
        return torch.nn.functional.normalize(f.float(), dim=-1)[0].numpy()

    assert np.allclose(got, reference(True), atol=1e-4)
    assert not np.allclose(got, reference(False), atol=1e-4)


def test_a_tag_gets_its_activation_too(vit_b32_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tag path (POLAR_MODEL__PRETRAINED=openai): the download answered with the local file."""
    monkeypatch.setattr(
        open_clip.factory, "download_pretrained", lambda *_a, **_k: str(vit_b32_file)
    )
    monkeypatch.setattr("app.ml.model.ensure_hub_or_offline", lambda: True)
    assert activation_of(load_clip("ViT-B-32", "openai", device="cpu").model) == "quick_gelu"
    gelu_tag = "laion2b_s34b_b79k"
    assert not open_clip.get_pretrained_cfg("ViT-B-32", gelu_tag).get("quick_gelu")
    assert activation_of(load_clip("ViT-B-32", gelu_tag, device="cpu").model) == "gelu"


def test_weights_on_a_config_of_the_wrong_activation_are_refused(
    tmp_path: Path, vit_b32_file: Path
) -> None:
    """open_clip only warns when a config's activation disagrees with the weights; here the
    model does not load: a -quickgelu config cannot be built with GELU, which a file's
    polar.json says its weights were trained with."""
    (tmp_path / "polar.json").write_text(json.dumps({"quick_gelu": False}))
    local = tmp_path / "weights.safetensors"
    local.symlink_to(vit_b32_file)
    with pytest.raises(ModelUnavailableError, match=r"built with quick_gelu .* trained with gelu"):
        load_clip("ViT-B-32-quickgelu", str(local), device="cpu")


def test_an_undeclared_file_answers_no_immich_model(tmp_path: Path, vit_b32_file: Path) -> None:
    """Renaming the file to `openai` must not make it Immich's ViT-B-32__openai; the error's
    advice names no model Immich's settings refuse."""
    renamed = tmp_path / "openai"  # a torch checkpoint named after Immich's tag
    torch.save(load_file(vit_b32_file), renamed)
    model = ModelSettings(
        name="ViT-B-32", pretrained=str(renamed), device="cpu", fallback_to_demo=False
    )
    for client in _app(tmp_path, model):
        r = post(client, encode_text_request("a dog"))
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "model_mismatch" and err["detail"]["served"] == []
        assert "POLAR_MODEL__CHECKPOINT_TAG" in err["message"]
        assert "polar-demo" not in err["message"]
        suggested = re.findall(r"CLIP model \(.*?\) to (\S+)", err["message"])
        assert all(name in IMMICH_CLIP_MODELS for name in suggested)
