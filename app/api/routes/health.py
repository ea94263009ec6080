"""Probes and metrics: /healthz (process up), /readyz (db, broker, model), /metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field
from sqlalchemy import text
from starlette.types import ASGIApp, Receive, Scope, Send

from app import __version__
from app.api.deps import parts_of
from app.config import Settings
from app.text import without_paths

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str
    version: str


class Check(BaseModel):
    ok: bool
    detail: str = ""


class Readiness(BaseModel):
    status: str = Field(
        description="ready | loading (the model is still loading; all else is ready) | not_ready"
    )
    version: str
    model: str | None = Field(description="id of the model serving searches, once loaded")
    demo_model: bool = Field(description="true when the synthetic demo model is serving")
    warning: str | None = Field(description="why the demo model serves instead of the configured")
    checks: dict[str, Check]


@router.get("/healthz", response_model=Health, summary="Process is up")
async def healthz() -> Health:
    """Process up. Answered by `HealthProbe` before routing; this route documents it."""
    return Health(status="ok", version=__version__)


class HealthProbe:
    """ASGI middleware: GET /healthz answered on the event loop before any dependency runs, so
    it answers even while every worker thread waits on a stuck database or broker."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] == "/healthz"
            and scope["method"] in ("GET", "HEAD")
        ):
            body = Health(status="ok", version=__version__).model_dump()
            await JSONResponse(body)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _check_db(request: Request) -> Check:
    try:
        with parts_of(request.app).engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return Check(ok=True)
    except Exception as e:  # any failure means "not ready"; the detail says which
        return Check(ok=False, detail=f"{type(e).__name__}: {e}"[:300])


def _check_broker(settings: Settings) -> Check:
    if settings.embedded_jobs:
        return Check(ok=True, detail="embedded job runner (no broker configured)")
    try:
        import redis

        client = redis.Redis.from_url(settings.broker_url, socket_timeout=2)
        client.ping()
        return Check(ok=True, detail="broker answers")
    except Exception as e:
        return Check(ok=False, detail=f"{type(e).__name__}: {e}"[:300])


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Ready to serve: database, broker and model",
    responses={503: {"model": Readiness, "description": "not ready; `checks` says why"}},
)
def readyz(request: Request) -> Response:
    parts = parts_of(request.app)
    settings = parts.settings
    state = parts.model.state()
    checks = {
        "database": _check_db(request),
        "broker": _check_broker(settings),
        "model": Check(ok=state.ok, detail=state.detail),
    }
    # Public: the details say what is wrong, never where the server keeps its files.
    checks = {
        name: Check(ok=c.ok, detail=without_paths(c.detail) if c.detail else c.detail)
        for name, c in checks.items()
    }
    ok = all(c.ok for c in checks.values())
    serving = state.serving
    status = "ready" if ok else "not_ready"
    if state.loading and checks["database"].ok and checks["broker"].ok:
        status = "loading"
    body = Readiness(
        status=status,
        version=__version__,
        model=serving.model_id if serving else None,
        demo_model=bool(serving and serving.is_demo),
        warning=without_paths(serving.fallback_reason)
        if serving and serving.fallback_reason
        else None,
        checks=checks,
    )
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics (public: process-wide counters, nothing about any user)",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
def metrics(request: Request) -> Response:
    sample_process_state(request.app)
    return Response(parts_of(request.app).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def sample_process_state(app: Any) -> None:
    """Copy this process's index cache and model into its gauges. Done after every request it
    serves (app/main.py), so with several API processes each one's share stays current
    whichever of them a scrape reaches."""
    parts = parts_of(app)
    m, cache = parts.metrics, parts.index_cache
    m.index_rebuilds.set(cache.rebuilds)
    m.index_cache_bytes.set(cache.nbytes)
    m.index_evictions.set(cache.evictions)
    serving = parts.model.state().serving
    if serving is not None:
        m.model_info.labels(serving.model_id, str(int(serving.is_demo))).set(1)
