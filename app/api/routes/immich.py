"""The Immich bridge: Immich's machine-learning protocol, mounted only when
POLAR_IMMICH__API_KEY is set (app.services.immich has the protocol and its sources).

Immich resolves `/ping` and `/predict` against the origin of its machine-learning URL
(`new URL('/predict', url)`: any path in the URL is dropped), so they live at the root.
They take no key (Immich sends none): whoever reaches them gets vectors, never images or
names; `BridgeClients` keeps them to the networks allowed, and textual requests are rate
limited per client. Not part of this API's OpenAPI document: the protocol is Immich's.

Work and turns: a textual request is Immich's smart search, a user waiting: it takes a search
turn (app/api/interactive.py) around its work. An image is Immich's indexing job: it waits for
one of its own turns (POLAR_IMMICH__CONCURRENT_IMAGES), never a search's. A forwarded face or
OCR request is I/O: sent asynchronously, it holds neither a thread nor a turn.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.deps import SearchContextDep, SessionDep, parts_of
from app.api.errors import error_response, takes_body
from app.api.forms import FormRoute
from app.config import ImmichSettings
from app.errors import ClientNotAllowed, RateLimited, ValidationFailed
from app.services import immich as service
from app.text import UnsafeText, clean_text

__all__ = ["BridgeClients", "router"]

router = APIRouter(tags=["immich"], include_in_schema=False, route_class=FormRoute)

BRIDGE_PATHS = frozenset({"/ping", "/predict"})


class BridgeClients:
    """ASGI middleware: /ping and /predict answer 403 to a client outside
    POLAR_IMMICH__ALLOWED_CLIENTS (when set), before any of its body is read."""

    def __init__(self, app: ASGIApp, settings: ImmichSettings) -> None:
        self.app = app
        self.networks = [
            ipaddress.ip_network(item.strip(), strict=False) for item in settings.allowed_clients
        ]

    def allowed(self, host: str | None) -> bool:
        if not self.networks:
            return True
        try:
            address = ipaddress.ip_address((host or "").split("%", 1)[0])
        except ValueError:  # no address (a Unix socket, a test client): not on a listed network
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in BRIDGE_PATHS:
            client = scope.get("client")
            if not self.allowed(client[0] if client else None):
                refused = ClientNotAllowed(
                    "this address may not use the Immich bridge (POLAR_IMMICH__ALLOWED_CLIENTS)"
                )
                await error_response(refused)(scope, receive, send)
                return
        await self.app(scope, receive, send)


@router.get("/ping")
def ping(request: Request, db_session: SessionDep) -> PlainTextResponse:
    """Immich's availability check: `pong` only while the bridge can answer Immich's searches
    (the model loaded, the bridge key valid); else 503, and Immich stops sending them here."""
    parts = parts_of(request.app)
    state = parts.model.state()
    try:
        reason = service.unready_reason(
            parts.settings.immich,
            db_session,
            model_ok=state.ok,
            model_detail=state.detail,
        )
    except Exception as e:  # the database is away: the bridge cannot serve either
        reason = f"the bridge cannot check its key ({type(e).__name__})"
    if reason is not None:
        return PlainTextResponse(f"not ready: {reason}", status_code=503)
    return PlainTextResponse("pong")


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


@router.post("/predict")
@takes_body("image")
async def predict(request: Request, db_session: SessionDep, ctx: SearchContextDep) -> Response:
    """CLIP requests answered here; every other task forwarded (or refused)."""
    body = await request.body()  # kept: the form is parsed from it, and forwarded unchanged
    form = await request.form()
    entries = service.parse_entries(_text_field(form.get("entries"), "entries"))
    settings = ctx.settings.immich
    bridge = parts_of(request.app).bridge
    assert bridge is not None, "the bridge's routes are mounted only when it is on"
    if not service.is_clip_request(entries):
        client = bridge.client
        content_type = request.headers.get("content-type", "")
        out = await service.forward(body, content_type, settings=settings, client=client)
        return Response(out.body, status_code=out.status, media_type=out.content_type)
    entry = service.clip_entry(entries)
    if entry.type == service.TEXTUAL:
        rate = bridge.rate
        if not rate.allow(_client(request)):
            raise RateLimited(
                f"more than {rate.per_minute} textual requests a minute from this address "
                "(POLAR_IMMICH__TEXT_RATE_PER_MINUTE)"
            )
    serving = ctx.serving()
    service.check_model(entry, serving)
    image, text = form.get("image"), form.get("text")
    result: dict[str, Any]
    if entry.type == service.VISUAL:
        if not isinstance(image, UploadFile):
            raise ValidationFailed("a visual CLIP request needs an 'image' file", code="no_input")
        data = await image.read(ctx.settings.limits.max_upload_bytes + 1)
        images = bridge.images
        async with images.turn():
            result = await run_in_threadpool(
                service.encode_visual,
                data,
                serving=serving,
                limits=ctx.settings.limits,
                threads=ctx.settings.threads.search,
                step_aside=parts_of(request.app).search_turns.foreground.wait_idle,
            )
    else:
        query = _text_field(text, "text")
        if query is None:
            raise ValidationFailed("a textual CLIP request needs a 'text' field", code="no_input")
        turns = parts_of(request.app).search_turns
        async with turns.turn():
            result = await run_in_threadpool(
                service.encode_textual, query, settings, ctx.query_env(db_session)
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
