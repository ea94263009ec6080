"""The Immich bridge: answer Immich's machine-learning requests with this service's CLIP.

Immich's server (server/src/repositories/machine-learning.repository.ts) POSTs multipart forms
to `<machine-learning URL>/predict`: a field `entries`, JSON `{task: {type: {"modelName": ...,
"options": {...}}}}`, and either `text` (a smart-search query) or `image` (the asset's preview
file). For CLIP (task "clip") the answer is `{"clip": "<the embedding as a JSON array>"}`, plus
`imageHeight`/`imageWidth` for an image. Face and OCR requests are not ours: they are passed
unchanged to the real Immich machine learning when one is configured.

Textual requests are encoded exactly as `/search` encodes a query of the user whose key is
`POLAR_IMMICH__API_KEY` (`app.services.search.embed_text`), so Immich's own cosine ranking over
the image vectors it stored becomes personal; a query past the model's context is cut to it as
Immich's machine learning cuts (machine-learning/immich_ml/models/clip/textual.py:
`tokenizer.enable_truncation(max_length=context_length)`). Nothing here reads images or names
from the database: the answer is a vector, whoever asks (what that vector still tells:
docs/IMMICH.md, "What it exposes").
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import open_clip
from PIL import Image, ImageOps
from sqlalchemy.orm import Session

from app.config import ImmichSettings, LimitSettings
from app.errors import (
    InvalidImage,
    Misconfigured,
    PayloadTooLarge,
    Unauthorized,
    UpstreamUnavailable,
    ValidationFailed,
)
from app.ml.encode import encode_images
from app.ml.model import DEMO_MODEL_NAME, ClipBundle
from app.ml.threads import cpu_threads
from app.services import users as users_service
from app.services.model import ServingModel
from app.services.search import QueryEnv, TextQuery, embed_text
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


# Immich's CLIP model names and the vector size its database column gets for each
# (server/src/constants.ts, CLIP_MODEL_INFO, commit 02454cb48e9aee23af9b1293e525bcec9bcf1344);
# Immich's config validation refuses any other name ("Unknown CLIP model",
# server/src/utils/misc.ts getCLIPModelInfo). Newer Immich versions know more: a name missing
# here is still answered when it is the served model's, only never recommended.
IMMICH_CLIP_MODELS: dict[str, int] = {
    "RN50__openai": 1024,
    "RN50__yfcc15m": 1024,
    "RN50__cc12m": 1024,
    "RN101__openai": 512,
    "RN101__yfcc15m": 512,
    "RN50x4__openai": 640,
    "RN50x16__openai": 768,
    "RN50x64__openai": 1024,
    "ViT-B-32__openai": 512,
    "ViT-B-32__laion2b_e16": 512,
    "ViT-B-32__laion400m_e31": 512,
    "ViT-B-32__laion400m_e32": 512,
    "ViT-B-32__laion2b-s34b-b79k": 512,
    "ViT-B-16__openai": 512,
    "ViT-B-16__laion400m_e31": 512,
    "ViT-B-16__laion400m_e32": 512,
    "ViT-B-16-plus-240__laion400m_e31": 640,
    "ViT-B-16-plus-240__laion400m_e32": 640,
    "ViT-L-14__openai": 768,
    "ViT-L-14__laion400m_e31": 768,
    "ViT-L-14__laion400m_e32": 768,
    "ViT-L-14__laion2b-s32b-b82k": 768,
    "ViT-L-14-336__openai": 768,
    "ViT-L-14-quickgelu__dfn2b": 768,
    "ViT-H-14__laion2b-s32b-b79k": 1024,
    "ViT-H-14-quickgelu__dfn5b": 1024,
    "ViT-H-14-378-quickgelu__dfn5b": 1024,
    "ViT-g-14__laion2b-s12b-b42k": 1024,
}
_QUICKGELU = "-quickgelu"


def name_key(name: str) -> str:
    """A model name as Immich resolves it (`cleanModelName`: the part after the last "/",
    ":" read as "_"), compared without case and with "-" and "_" alike: Immich spells
    open_clip's tag laion2b_s34b_b79k as laion2b-s34b-b79k."""
    return name.rsplit("/", 1)[-1].replace(":", "_").replace("-", "_").lower()


_IMMICH_BY_KEY = {name_key(n): n for n in IMMICH_CLIP_MODELS}


def immich_names(bundle: ClipBundle) -> list[str]:
    """The Immich model names the model is answered under: `<architecture>__<tag>` of the
    open_clip tag its weights are (a tag, or a local file declared as one:
    POLAR_MODEL__CHECKPOINT_TAG / polar.json), in Immich's spelling where Immich knows it, and
    only where the vector size is the one Immich expects. Undeclared weights answer none: their
    vectors may be anything. The demo model answers its own name (tests, demos): no Immich
    accepts that name, and no Immich model shares its vectors."""
    fp = bundle.fingerprint
    if fp.name == DEMO_MODEL_NAME:
        return [DEMO_MODEL_NAME]
    tag = bundle.weights_tag
    if tag is None:
        return []
    archs = [fp.name]
    if fp.name.endswith(_QUICKGELU):  # ViT-B-32-quickgelu/openai is Immich's ViT-B-32__openai
        archs.append(fp.name.removesuffix(_QUICKGELU))
    names: list[str] = []
    for arch in archs:
        name = f"{arch}__{tag}"
        known = _IMMICH_BY_KEY.get(name_key(name))
        if known is not None and IMMICH_CLIP_MODELS[known] != bundle.embed_dim:
            continue
        names.append(known or name)
    return names


def accepted_model_names(serving: ServingModel) -> set[str]:
    """`immich_names` as compared (name_key)."""
    return {name_key(n) for n in immich_names(serving.bundle)}


def _how_to_serve(asked: str) -> str:
    """The settings that serve the model Immich asks for, where open_clip knows it."""
    arch, _, tag = asked.rsplit("/", 1)[-1].replace(":", "_").partition("__")
    if arch not in open_clip.list_models():
        return ""
    tags = [
        t for t in open_clip.list_pretrained_tags_by_model(arch) if name_key(t) == name_key(tag)
    ]
    if not tags:
        return ""
    return (
        f"; or serve the model Immich asks for: POLAR_MODEL__NAME={arch} "
        f"POLAR_MODEL__PRETRAINED={tags[0]} (offline, a local file of those weights: "
        f"POLAR_MODEL__PRETRAINED=/path/to/file POLAR_MODEL__CHECKPOINT_TAG={tags[0]})"
    )


def check_model(entry: Entry, serving: ServingModel) -> None:
    """ValidationFailed (`model_mismatch`) unless Immich asks for the model this service serves:
    vectors of another model would silently rank nonsense. The advice names only model names
    Immich's own settings accept."""
    if name_key(entry.model_name) in accepted_model_names(serving):
        return
    served = immich_names(serving.bundle)
    usable = [n for n in served if name_key(n) in _IMMICH_BY_KEY]
    bundle = serving.bundle
    if usable:
        advice = (
            f"set Immich's CLIP model (Administration > Settings > Machine Learning > Smart "
            f"Search) to {usable[0]} and re-run its Smart Search job"
        )
    elif serving.is_demo:
        advice = (
            "the bundled demo model has no Immich model name (Immich refuses unknown names); "
            "serve real CLIP weights"
        )
    elif bundle.weights_tag is None:
        advice = (
            f"the checkpoint {bundle.fingerprint.pretrained} does not say which weights it "
            "holds, so it answers no Immich model: declare them with "
            "POLAR_MODEL__CHECKPOINT_TAG=<open_clip tag> (openai for OpenAI's ViT-B-32), or "
            '{"pretrained": "openai"} in a polar.json beside the file'
        )
    else:
        advice = f"{serving.model_id} has no model name Immich accepts; serve one Immich knows"
    raise ValidationFailed(
        f"Immich asks for CLIP model {entry.model_name!r} but this service serves "
        f"{serving.model_id}; {advice}{_how_to_serve(entry.model_name)}",
        code="model_mismatch",
        detail={"asked": entry.model_name, "served": served},
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


def encode_textual(text: str, settings: ImmichSettings, env: QueryEnv) -> dict[str, Any]:
    """Immich's textual CLIP answer: the query encoded as /search encodes it for the bridge
    user (concept names rewritten, adapters stacked, photos fused), cut to the model's context
    as Immich's machine learning cuts (no `query_too_long`: nothing about the rewritten text is
    counted back to whoever asks)."""
    user_id = bridge_user_id(settings, env.db_session)
    out = embed_text(user_id, TextQuery(text=text, truncate=True), env)
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
    data: bytes,
    *,
    serving: ServingModel,
    limits: LimitSettings,
    threads: int = 0,
    step_aside: Callable[[], object] | None = None,
) -> dict[str, Any]:
    """Immich's visual CLIP answer: the image's embedding and its size. Immich's indexing is
    background work: `step_aside` (Foreground.wait_idle) runs before the decode and before the
    model call, so searches in flight go first, as jobs let them."""
    if step_aside is not None:
        step_aside()
    image = decode_image(data, limits)
    if step_aside is not None:
        step_aside()
    with cpu_threads(threads):
        vector = encode_images(serving.bundle, [image])[0]
    return {CLIP_TASK: _serialize(vector), "imageHeight": image.height, "imageWidth": image.width}


class ClientRateLimit:
    """At most `per_minute` requests a minute per client address (token buckets refilled
    continuously, bursts up to `per_minute`); 0 = no limit. Bounded: the buckets of the
    longest-idle clients are dropped past `max_clients`."""

    def __init__(
        self,
        per_minute: int,
        *,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_minute = per_minute
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, when
        self._lock = threading.Lock()

    def allow(self, client: str) -> bool:
        """Take one request's token for `client`; False when it has none left."""
        if self.per_minute <= 0:
            return True
        now = self.clock()
        with self._lock:
            tokens, then = self._buckets.pop(client, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - then) * self.per_minute / 60.0)
            allowed = tokens >= 1.0
            self._buckets[client] = (tokens - 1.0 if allowed else tokens, now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            return allowed


@dataclass(frozen=True)
class Forwarded:
    """The upstream's answer, passed back unchanged."""

    status: int
    body: bytes
    content_type: str


NOT_SERVED = (
    "this service answers only CLIP requests; face and OCR requests need Immich's own "
    "machine learning: set POLAR_IMMICH__FORWARD_URL to its URL "
    "(http://immich-machine-learning:3003) and they are passed on unchanged, or turn Facial "
    "Recognition and OCR off in Immich (Administration > Settings > Machine Learning). Keep "
    "this service the only URL in Immich's machine-learning settings: with two, Immich marks "
    "this one unhealthy after each refused request and sends its searches, unpersonalized, "
    "to the other"
)


def unready_reason(
    settings: ImmichSettings, db_session: Session, *, model_ok: bool, model_detail: str
) -> str | None:
    """Why the bridge cannot serve Immich now (None = it can): the model is not loaded, or the
    bridge key does not authenticate. `/ping` fails with it, so Immich's availability check
    stops sending searches that would fail."""
    if not model_ok:
        return f"the model is not ready ({model_detail})"
    try:
        bridge_user_id(settings, db_session)
    except Misconfigured as e:
        return e.message
    return None


async def forward(
    body: bytes, content_type: str, *, settings: ImmichSettings, client: httpx.AsyncClient
) -> Forwarded:
    """A non-CLIP request sent unchanged to the real Immich machine learning. Asynchronous: a
    slow upstream holds no thread and no search turn."""
    if not settings.forward_url.strip():
        raise ValidationFailed(NOT_SERVED, code="task_not_served")
    url = settings.forward_url.strip().rstrip("/") + "/predict"
    try:
        response = await client.post(
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
