"""FastAPI dependencies: settings, database session, image store, and the authenticated user.

Authentication is installed app-wide (`create_app(dependencies=[AUTH])`), so every route,
including ones added later, needs a key unless its path is in PUBLIC_PATHS. Routes that need the
user take `user: CurrentUser`; FastAPI caches dependencies per request, so the key is checked once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Annotated, Any, Protocol, cast

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import error_response
from app.api.interactive import ImmichBridge, SearchTurns
from app.api.metrics import Metrics
from app.config import Settings
from app.errors import ModelUnavailable, Unauthorized
from app.models import User
from app.services import users as users_service
from app.services.images import PhotoEnv
from app.services.index import IndexCache
from app.services.jobs import JobQueue
from app.services.model import ModelLoader, ServingModel
from app.services.search import AdapterCache, QueryEnv, SearchEnv
from app.storage import ImageStore

# Reachable without a key: probes, metrics (process-wide counters, nothing about any user: a
# Prometheus scrape needs no key) and the API docs.
PUBLIC_PATHS = frozenset(
    {
        "/healthz",
        "/readyz",
        "/metrics",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
        "/openapi.json",
        # The Immich bridge (mounted only when POLAR_IMMICH__API_KEY is set): Immich's
        # machine-learning client sends no credentials; the bridge answers vectors only, with
        # the concepts of the configured key's user (app/api/routes/immich.py).
        "/ping",
        "/predict",
    }
)

log = logging.getLogger(__name__)

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key from `polar create-user` / `polar create-key`: polar_<prefix>_<secret>",
)


class Parts(Protocol):
    """What the API asks of its process's container (app/runtime/container.py), the one thing
    on `app.state`: read-only, built once per process."""

    @property
    def settings(self) -> Settings: ...
    @property
    def engine(self) -> Engine: ...
    @property
    def session_factory(self) -> sessionmaker[Session]: ...
    @property
    def store(self) -> ImageStore: ...
    @property
    def model(self) -> ModelLoader: ...
    @property
    def queue(self) -> JobQueue: ...
    @property
    def index_cache(self) -> IndexCache: ...
    @property
    def adapter_cache(self) -> AdapterCache: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def search_turns(self) -> SearchTurns: ...
    @property
    def bridge(self) -> ImmichBridge | None: ...


def parts_of(app: Any) -> Parts:
    """The container of the app (a FastAPI app, or a request's `request.app`)."""
    return cast(Parts, app.state.container)


def get_parts(request: Request) -> Parts:
    return parts_of(request.app)


def get_settings_dep(request: Request) -> Settings:
    """The app's settings (tests pass their own to create_app)."""
    return parts_of(request.app).settings


def get_db_session(request: Request) -> Iterator[Session]:
    """One session per request; services commit, anything uncommitted is rolled back on close.

    Closing runs after the response is decided, possibly after it started. A connection the
    database dropped meanwhile (a restart) makes the close's rollback fail; that error must not
    reach the server, which would then cut the connection without an answer: the session's
    connections are invalidated (the pool replaces them) and the failure logged.
    """
    session: Session = parts_of(request.app).session_factory()
    try:
        yield session
    finally:
        try:
            session.close()
        except SQLAlchemyError as exc:
            log.warning("database session could not be closed cleanly, discarded: %s", exc)
            with contextlib.suppress(SQLAlchemyError):  # nothing more to release
                session.invalidate()


def get_store(request: Request) -> ImageStore:
    """The image store of the app's data folder."""
    return parts_of(request.app).store


def get_queue(request: Request) -> JobQueue:
    """Where new jobs go: the embedded runner, or Celery (wired in app/runtime/container.py)."""
    return parts_of(request.app).queue


PartsDep = Annotated[Parts, Depends(get_parts)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]
SessionDep = Annotated[Session, Depends(get_db_session)]
StoreDep = Annotated[ImageStore, Depends(get_store)]


def get_photo_env(
    db_session: SessionDep, store: StoreDep, settings: SettingsDep, queue: QueueDep
) -> PhotoEnv:
    """What a request that stores photos or queues jobs works with (app/services/images.py),
    from the dependencies above (so a test's override of one of them applies)."""
    return PhotoEnv(
        db_session=db_session,
        store=store,
        queue=queue,
        limits=settings.limits,
        training=settings.training,
        library_roots=settings.library.roots,
    )


PhotoEnvDep = Annotated[PhotoEnv, Depends(get_photo_env)]


def authenticate(
    request: Request,
    db_session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> User | None:
    """The key's user; None on public paths; Unauthorized when the key is missing or bad."""
    route = request.scope.get("route")
    if getattr(route, "path", request.url.path) in PUBLIC_PATHS:
        return None
    if credentials is None:
        raise Unauthorized(_MISSING_KEY)
    user = users_service.authenticate(credentials.credentials, db_session=db_session)
    # End the read transaction: the connection goes back to the pool while the request waits
    # for a thread to run its route, so connections in use never outnumber request threads
    # (POLAR_REQUEST_THREADS; the pool is sized to them). The user's attributes stay loaded.
    db_session.commit()
    return user


AUTH = Depends(authenticate)

_MISSING_KEY = "missing API key: send 'Authorization: Bearer <key>'"


class KeyBeforeBody:
    """ASGI middleware: a request with a body for a route that needs a key is refused (401)
    before any of its body is read when the key is missing or bad.

    The app-wide AUTH dependency runs only after FastAPI has parsed the body, so without this
    anyone could make the server spool an upload's worth of bytes to answer 401. The same check
    as AUTH (users.authenticate), with the same messages; AUTH still runs for the route. If the
    check itself cannot run (the database is down), the request goes on and AUTH answers as it
    would.
    """

    def __init__(self, app: ASGIApp, session_factory: sessionmaker[Session]) -> None:
        self.app = app
        self.session_factory = session_factory

    def _check(self, key: str) -> None:
        with self.session_factory() as db_session:
            users_service.authenticate(key, db_session=db_session)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
            if has_body and scope["path"] not in PUBLIC_PATHS:
                scheme, key = get_authorization_scheme_param(headers.get("authorization"))
                try:
                    if scheme.lower() != "bearer" or not key:
                        raise Unauthorized(_MISSING_KEY)
                    await run_in_threadpool(self._check, key)
                except Unauthorized as e:
                    await error_response(e)(scope, receive, send)
                    return
                except Exception:
                    log.debug("key check before the body could not run", exc_info=True)
        await self.app(scope, receive, send)


def get_current_user(user: Annotated[User | None, AUTH]) -> User:
    """The authenticated user (for routes that act on someone's data)."""
    if user is None:
        raise Unauthorized("this route needs an API key")
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]


class SearchContext:
    """What a search needs from the app: settings, model, per-user index and adapter caches."""

    def __init__(self, request: Request) -> None:
        parts = parts_of(request.app)
        self.settings = parts.settings
        self.index_cache = parts.index_cache
        self.adapter_cache = parts.adapter_cache
        self.model_loader = parts.model
        self.metrics = parts.metrics

    def query_env(self, db_session: Session) -> QueryEnv:
        """What encoding a query needs: the request's session, the serving model (503 while it
        loads), the adapter cache, the limits, the search recipe, one search's threads."""
        settings = self.settings
        return QueryEnv(
            db_session=db_session,
            serving=self.serving(),
            adapter_cache=self.adapter_cache,
            limits=settings.limits,
            search=settings.search,
            threads=settings.threads.search,
        )

    def search_env(self, db_session: Session) -> SearchEnv:
        """A query's environment and the per-user index cache."""
        query = self.query_env(db_session)
        return SearchEnv(**vars(query), index_cache=self.index_cache)

    def serving(self) -> ServingModel:
        """The serving model (loaded on first use; ModelUnavailable → 503).

        While the startup loader is still at work the answer is an immediate 503
        `model_loading`: a request must not wait (holding a worker thread) for the load.
        """
        if self.model_loader.loading:
            raise ModelUnavailable(
                "the model is still loading; retry in a few seconds (GET /readyz says when)",
                code="model_loading",
            )
        return self.model_loader.get()


SearchContextDep = Annotated[SearchContext, Depends(SearchContext)]
