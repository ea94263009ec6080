"""The Immich bridge: Immich's machine-learning protocol, mounted only when
POLAR_IMMICH__API_KEY is set (app.services.immich has the protocol and its sources).

Immich resolves `/ping` and `/predict` against the origin of its machine-learning URL
(`new URL('/predict', url)`: any path in the URL is dropped), so they live at the root.
They take no key (Immich sends none): whoever reaches them gets vectors, never images or
names. Not part of this API's OpenAPI document: the protocol is Immich's.
"""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.api.deps import SearchContextDep, SessionDep
from app.api.errors import takes_body
from app.api.forms import FormRoute
from app.errors import ValidationFailed
from app.services import immich as service
from app.text import UnsafeText, clean_text

router = APIRouter(tags=["immich"], include_in_schema=False, route_class=FormRoute)


@router.get("/ping")
def ping() -> PlainTextResponse:
    """Immich's availability check."""
    return PlainTextResponse("pong")


@router.post("/predict")
@takes_body("image")
async def predict(request: Request, db_session: SessionDep, ctx: SearchContextDep) -> Response:
    """CLIP requests answered here; every other task forwarded (or refused)."""
    body = await request.body()  # kept: the form is parsed from it, and forwarded unchanged
    form = await request.form()
    entries = service.parse_entries(_text_field(form.get("entries"), "entries"))
    settings = ctx.settings.immich
    if not service.is_clip_request(entries):
        client: httpx.Client = request.app.state.immich_client
        content_type = request.headers.get("content-type", "")
        out = await run_in_threadpool(
            service.forward, body, content_type, settings=settings, client=client
        )
        return Response(out.body, status_code=out.status, media_type=out.content_type)
    entry = service.clip_entry(entries)
    serving = ctx.serving()
    service.check_model(entry, serving)
    image, text = form.get("image"), form.get("text")
    result: dict[str, Any]
    if entry.type == service.VISUAL:
        if not isinstance(image, UploadFile):
            raise ValidationFailed("a visual CLIP request needs an 'image' file", code="no_input")
        data = await image.read(ctx.settings.limits.max_upload_bytes + 1)
        result = await run_in_threadpool(
            service.encode_visual,
            data,
            serving=serving,
            limits=ctx.settings.limits,
            threads=ctx.settings.threads.search,
        )
    else:
        query = _text_field(text, "text")
        if query is None:
            raise ValidationFailed("a textual CLIP request needs a 'text' field", code="no_input")
        result = await run_in_threadpool(
            service.encode_textual,
            query,
            settings=settings,
            db_session=db_session,
            serving=serving,
            **ctx.query_options(),
        )
    return JSONResponse(result)


def _text_field(value: object, name: str) -> str | None:
    """A text form field, checked and normalised like every string of the API (app.text): a NUL
    or a lone surrogate is a 422, not a 500 later."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationFailed(f"the form field {name!r} must be text, not a file", code="no_input")
    try:
        return clean_text(value)
    except UnsafeText as e:
        raise ValidationFailed(f"the form field {name!r}: {e}") from e
