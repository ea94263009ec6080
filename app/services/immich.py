"""The Immich bridge: answer Immich's machine-learning requests with this service's CLIP.

Immich's server (server/src/repositories/machine-learning.repository.ts) POSTs multipart forms
to `<machine-learning URL>/predict`: a field `entries`, JSON `{task: {type: {"modelName": ...,
"options": {...}}}}`, and either `text` (a smart-search query) or `image` (the asset's preview
file). For CLIP (task "clip") the answer is `{"clip": "<the embedding as a JSON array>"}`, plus
`imageHeight`/`imageWidth` for an image. Face and OCR requests are not ours: they are passed
unchanged to the real Immich machine learning when one is configured.

Textual requests are encoded exactly as `/search` encodes a query of the user whose key is
`POLAR_IMMICH__API_KEY` (`app.services.search.embed_text`), so Immich's own cosine ranking over
the image vectors it stored becomes personal. Nothing here reads images or names from the
database: the answer is a vector, whoever asks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
from PIL import Image, ImageOps
from sqlalchemy.orm import Session

from app.config import ImmichSettings, LimitSettings, SearchSettings
from app.errors import (
    InvalidImage,
    Misconfigured,
    PayloadTooLarge,
    Unauthorized,
    UpstreamUnavailable,
    ValidationFailed,
)
from app.ml.encode import encode_images
from app.ml.model import DEMO_MODEL_NAME
from app.ml.threads import cpu_threads
from app.services import users as users_service
from app.services.model import ServingModel
from app.services.search import AdapterCache, embed_text
from app.storage import untrusted_image
from app.text import UnsafeText, check_text

CLIP_TASK = "clip"
TEXTUAL = "textual"
VISUAL = "visual"


@dataclass(frozen=True)
class Entry:
    """One model Immich asks to run: task ("clip", "facial-recognition", "ocr"), type
    ("textual", "visual", "detection", ...), model name and options."""

    task: str
    type: str
    model_name: str
    options: dict[str, Any]


def parse_entries(raw: str | None) -> list[Entry]:
    """The `entries` form field; ValidationFailed (`invalid_entries`) when it is not Immich's
    shape."""
    if raw is None:
        raise ValidationFailed("the form field 'entries' is missing", code="invalid_entries")
    try:
        request = json.loads(raw)
    except ValueError as e:
        raise ValidationFailed(f"'entries' is not JSON: {e}", code="invalid_entries") from e
    except RecursionError as e:  # "[[[[...]]]]" nested past the parser's stack
        raise ValidationFailed("'entries' is nested too deeply", code="invalid_entries") from e
    if not isinstance(request, dict) or not request:
        raise ValidationFailed(
            "'entries' must be a non-empty object {task: {type: {modelName, options}}}",
            code="invalid_entries",
        )
    out: list[Entry] = []
    for task, types in request.items():
        _check_name(task, "a task")
        if not isinstance(types, dict) or not types:
            raise ValidationFailed(
                f"'entries.{task}' must be a non-empty object {{type: {{modelName}}}}",
                code="invalid_entries",
            )
        for kind, spec in types.items():
            name = spec.get("modelName") if isinstance(spec, dict) else None
            options = spec.get("options", {}) if isinstance(spec, dict) else None
            if not isinstance(name, str) or not name or not isinstance(options, dict | None):
                raise ValidationFailed(
                    f"'entries.{task}.{kind}' needs a string 'modelName' (and 'options' an object)",
                    code="invalid_entries",
                )
            _check_name(kind, f"the type of {task!r}")
            _check_name(name, "modelName")
            out.append(Entry(task, kind, name, options or {}))
    return out


def _check_name(value: str, what: str) -> None:
    """ValidationFailed when a name from `entries` holds a NUL or a lone surrogate (a JSON
    `"\\ud800"` escape): it could not be echoed in an answer nor matched."""
    try:
        check_text(value)
    except UnsafeText as e:
        raise ValidationFailed(f"'entries': {what}: {e}", code="invalid_entries") from e


def accepted_model_names(serving: ServingModel) -> set[str]:
    """Immich's names for the serving model: `<name>__<pretrained>` (Immich's "ViT-B-32__openai"
    is open_clip's ViT-B-32 / openai). The bundled demo model also answers to its bare name
    ("polar-demo"): no Immich model shares its vectors, so only an Immich told that name on
    purpose (a custom CLIP model name in its settings) gets them."""
    fp = serving.bundle.fingerprint
    names = {f"{fp.name}__{fp.pretrained}".lower()}
    if fp.name == DEMO_MODEL_NAME:
        names.add(DEMO_MODEL_NAME)
    return names


def check_model(entry: Entry, serving: ServingModel) -> None:
    """ValidationFailed (`model_mismatch`) unless Immich asks for the model this service serves:
    vectors of another model would silently rank nonsense."""
    asked = entry.model_name.rsplit("/", 1)[-1].lower()  # "immich-app/ViT-B-32__openai" too
    accepted = accepted_model_names(serving)
    if asked not in accepted:
        raise ValidationFailed(
            f"Immich asks for CLIP model {entry.model_name!r} but this service serves "
            f"{serving.model_id}; set Immich's smart-search model to "
            f"{' or '.join(sorted(accepted))} (and re-run its smart-search job), or serve "
            f"the model Immich uses (POLAR_MODEL__NAME / POLAR_MODEL__PRETRAINED)",
            code="model_mismatch",
            detail={"asked": entry.model_name, "served": sorted(accepted)},
        )


def is_clip_request(entries: list[Entry]) -> bool:
    """True when every entry is CLIP (ours), False when none is (to forward); mixed → error."""
    clip = [e.task == CLIP_TASK for e in entries]
    if any(clip) and not all(clip):
        raise ValidationFailed(
            "one request mixes CLIP with other tasks; send CLIP alone (Immich does)",
            code="invalid_entries",
        )
    return all(clip)


def clip_entry(entries: list[Entry]) -> Entry:
    """The one CLIP entry of a CLIP request: textual or visual."""
    if len(entries) != 1 or entries[0].type not in (TEXTUAL, VISUAL):
        raise ValidationFailed(
            "a CLIP request has one entry, of type 'textual' or 'visual'",
            code="invalid_entries",
            detail={"types": [e.type for e in entries]},
        )
    return entries[0]


def _serialize(vector: np.ndarray) -> str:
    """The embedding as Immich stores it: a JSON array of floats, in a string."""
    return json.dumps([float(v) for v in vector], separators=(",", ":"))


def bridge_user_id(settings: ImmichSettings, db_session: Session) -> str:
    """The user whose concepts personalise Immich's queries (the bridge key's user)."""
    try:
        user = users_service.authenticate(settings.api_key.strip(), db_session=db_session)
    except Unauthorized as e:
        raise Misconfigured(
            f"POLAR_IMMICH__API_KEY is not a valid API key of this service ({e.message}); "
            "set it to a key from `polar create-key`",
            code="immich_bridge_misconfigured",
        ) from e
    return user.id


def encode_textual(
    text: str,
    *,
    settings: ImmichSettings,
    db_session: Session,
    serving: ServingModel,
    adapter_cache: AdapterCache,
    limits: LimitSettings,
    search_settings: SearchSettings,
    threads: int = 0,
) -> dict[str, Any]:
    """Immich's textual CLIP answer: the query encoded as /search encodes it for the bridge
    user (concept names rewritten, adapters stacked, photos fused)."""
    user_id = bridge_user_id(settings, db_session)
    out = embed_text(
        user_id,
        text,
        db_session=db_session,
        serving=serving,
        adapter_cache=adapter_cache,
        limits=limits,
        search_settings=search_settings,
        threads=threads,
    )
    return {CLIP_TASK: _serialize(out.vector)}


def decode_image(data: bytes, limits: LimitSettings) -> Image.Image:
    """The posted preview, decoded and upright, RGB; 4xx for empty, huge or broken files."""
    if not data:
        raise InvalidImage("the image is empty")
    if len(data) > limits.max_upload_bytes:
        raise PayloadTooLarge(
            f"the image has {len(data)} bytes, more than the limit of {limits.max_upload_bytes}"
        )
    # Any decoder failure is the file's 4xx (app.storage.untrusted_image), with the upload
    # routes' format allow-list and pixel limit.
    with untrusted_image(data, max_pixels=limits.max_pixels) as img:
        return ImageOps.exif_transpose(img).convert("RGB")


def encode_visual(
    data: bytes, *, serving: ServingModel, limits: LimitSettings, threads: int = 0
) -> dict[str, Any]:
    """Immich's visual CLIP answer: the image's embedding and its size."""
    image = decode_image(data, limits)
    with cpu_threads(threads):
        vector = encode_images(serving.bundle, [image])[0]
    return {CLIP_TASK: _serialize(vector), "imageHeight": image.height, "imageWidth": image.width}


@dataclass(frozen=True)
class Forwarded:
    """The upstream's answer, passed back unchanged."""

    status: int
    body: bytes
    content_type: str


def forward(
    body: bytes, content_type: str, *, settings: ImmichSettings, client: httpx.Client
) -> Forwarded:
    """A non-CLIP request sent unchanged to the real Immich machine learning."""
    if not settings.forward_url.strip():
        raise ValidationFailed(
            "this service answers only CLIP requests; face and OCR requests need the real "
            "Immich machine learning: set POLAR_IMMICH__FORWARD_URL, or give Immich that URL "
            "too (it tries its machine-learning URLs in turn)",
            code="task_not_served",
        )
    url = settings.forward_url.strip().rstrip("/") + "/predict"
    try:
        response = client.post(
            url,
            content=body,
            headers={"content-type": content_type},
            timeout=settings.forward_timeout_s,
        )
    except httpx.HTTPError as e:
        raise UpstreamUnavailable(
            f"the Immich machine learning at {settings.forward_url} did not answer: {e}"
        ) from e
    return Forwarded(
        response.status_code,
        response.content,
        response.headers.get("content-type", "application/json"),
    )
