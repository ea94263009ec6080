"""All FastAPI wiring: lifespan, routers, error handlers."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import __version__, web
from app.api.deps import AUTH, KeyBeforeBody
from app.api.errors import BodySizeLimit, SafeJSONResponse, Utf8Url, install_error_handlers
from app.api.head import HeadAsGet, is_head
from app.api.interactive import InteractiveRequests
from app.api.metrics import Metrics, multiprocess_dir
from app.api.openapi import install_openapi
from app.api.routes import (
    albums,
    concepts,
    embed,
    health,
    images,
    immich,
    index,
    jobs,
    libraries,
    search,
)
from app.config import Settings, get_settings
from app.db import migrate
from app.logs import configure_logging
from app.runtime import container as bootstrap
from app.services import images as images_service
from app.services.job_runs import JobHandler

log = logging.getLogger(__name__)

_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# Multipart framing per file part (headers, boundary), on top of the files' own bytes.
_PART_OVERHEAD_BYTES = 64 * 1024


def create_app(
    settings: Settings | None = None, *, handlers: Mapping[str, JobHandler] | None = None
) -> FastAPI:
    """Build the ASGI app; tests pass their own settings (and job handlers). Every long-lived
    object comes from the container (app/runtime/container.py), the one thing on `app.state`."""
    settings = settings or get_settings()
    container = bootstrap.build(settings, handlers=handlers)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        container.store.sweep_tmp()
        # Idempotent, and serialised across replicas on Postgres (advisory lock);
        # deployments may also run `polar migrate` first.
        migrate(container.engine)
        _sweep_originals(container)
        # Sync routes run in anyio's thread pool (40 by default): bound it to the request
        # threads the database pool was sized for; more requests wait in the event loop.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.request_threads
        # The model's load, the embedded runner and the watchers (no broker); stopped on exit.
        try:
            container.start()
            yield
        finally:
            await container.aclose()

    # FastAPIOffline: /docs and /redoc with their assets served by this app (from the
    # fastapi-offline package), not from a CDN, so the docs work offline.
    app = FastAPIOffline(
        title="POLAR personalized image search",
        version=__version__,
        description="Teach CLIP your own objects from a few photos, then search for them.",
        lifespan=lifespan,
        dependencies=[AUTH],  # every route needs a key, except deps.PUBLIC_PATHS
        # No answer can fail to encode: a lone surrogate that reached a stored field (a report
        # written before it was refused) becomes "?" instead of a 500.
        default_response_class=SafeJSONResponse,
    )
    app.state.container = container
    # The API's routes, for each route's body limit and a 405's Allow header (app/api/errors.py).
    routes = api_routes(settings)
    install_error_handlers(app, api_routes=routes)
    # Searches: this process's jobs pause for them, and they take turns (app/api/interactive.py).
    app.add_middleware(InteractiveRequests, turns=container.search_turns)
    app.add_middleware(RequestMetrics, metrics=container.metrics)
    # Outermost but one: probes never wait behind the body limit, auth or a thread.
    app.add_middleware(health.HealthProbe)
    # Path and query string: UTF-8 or a 422, before anything decodes them with replacements.
    app.add_middleware(Utf8Url)
    # A body for a route that needs a key is read only once the key is good.
    app.add_middleware(KeyBeforeBody, session_factory=container.session_factory)
    limits = settings.limits
    # Each route's largest sane body: a full upload for the upload routes (each file is also
    # capped while it is read), one image for Immich's /predict, a JSON document elsewhere.
    app.add_middleware(
        BodySizeLimit,
        routes=routes,
        limits={
            "upload": limits.max_files_per_request
            * (limits.max_upload_bytes + _PART_OVERHEAD_BYTES),
            "image": limits.max_upload_bytes + _PART_OVERHEAD_BYTES,
        },
        max_other_bytes=limits.max_json_bytes,
    )
    if settings.immich.enabled:
        # Only Immich's network reaches /ping and /predict, before any of a body is read.
        app.add_middleware(immich.BridgeClients, settings=settings.immich)
    # Outermost: HEAD answered as GET without the body (app/api/head.py), so every GET route,
    # the docs and the UI answer HEAD alike, through the same limits and key check, and the
    # OpenAPI document has no HEAD operations. (Only Starlette's handler of unexpected errors
    # lies outside it; uvicorn drops the body of a HEAD answer itself.)
    app.add_middleware(HeadAsGet)
    app.include_router(health.router)
    # One file more than allowed is parsed, so the service can answer `too_many_files`.
    app.include_router(images.router, form_limits={"max_files": limits.max_files_per_request + 1})
    # Past training.max_photos too, so the answer can name the allowed range.
    app.include_router(concepts.router, form_limits={"max_files": limits.max_files_per_request + 1})
    app.include_router(albums.router)
    app.include_router(jobs.router)
    app.include_router(search.router)
    app.include_router(embed.router)
    if settings.immich.enabled:
        # Immich's machine-learning protocol at /ping and /predict (off unless configured).
        app.include_router(immich.router)
    app.include_router(index.router)
    app.include_router(libraries.router)
    # The web UI at /ui/ (static files; it calls the API above with the user's key).
    web.install(app)
    install_openapi(app, limits)
    return app


def api_routes(settings: Settings) -> list[BaseRoute]:
    """The routes of the API's routers (the app keeps them inside its included routers), for
    each route's body limit and a 405's Allow header (app/api/errors.py)."""
    routers = [health, images, concepts, jobs, search, embed, index, libraries]
    if settings.immich.enabled:
        routers.append(immich)
    return [route for module in routers for route in module.router.routes]


def _sweep_originals(container: bootstrap.Container) -> None:
    """Remove originals that no row references (left by an upload cut short); the database
    being unreachable skips it, it never stops the start."""
    try:
        images_service.sweep_unreferenced_originals(container.session_factory, container.store)
    except Exception:
        log.warning("startup sweep of unreferenced originals skipped", exc_info=True)


def create_worker_app() -> FastAPI:
    """The app of one process of `polar serve` with POLAR_WORKERS > 1 (a uvicorn factory):
    settings from the environment, logging as the CLI sets it up."""
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings)


class RequestMetrics:
    """ASGI middleware: count and time requests by route template (raw paths are unbounded)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        metrics_shared = multiprocess_dir() is not None

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            # The method is the client's to choose: only known ones become label values, so
            # made-up methods cannot grow the metrics without bound.
            method = scope["method"] if scope["method"] in _HTTP_METHODS else "other"
            if is_head(scope):  # answered as a GET (app/api/head.py), counted as what it is
                method = "HEAD"
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
            if metrics_shared:
                health.sample_process_state(scope["app"])
