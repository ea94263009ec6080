"""Schema-driven fuzzing of every operation in the OpenAPI document (schemathesis, in process).

For each operation schemathesis generates requests from the schema (examples, then bounded
random data) and sends them to the app through ASGI, with a real user's key so the
authenticated routes run past the key check, on a library with one embedded image and one
concept. Every response must: not be a 5xx, have a status code the operation documents, and
match the documented schema (body and content type).

Bounded for CI: a fixed seed (derandomized Hypothesis) and MAX_EXAMPLES per operation; the
whole module takes about a minute on two busy cores per backend (SQLite here, PostgreSQL in
the `postgres` run). Raise POLAR_FUZZ_EXAMPLES locally to dig deeper.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.types import ASGIApp, Receive, Scope, Send

from app.config import Settings
from app.main import create_app
from tests.api.test_search import upload, wait_jobs
from tests.db_fixtures import ApiUser, create_api_user, noisy_jpeg, temporary_pg_schema
from tests.unit.ml.conftest import tiny_clip

pytestmark = pytest.mark.fuzz

MAX_EXAMPLES = int(os.environ.get("POLAR_FUZZ_EXAMPLES", "50"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


class _AlreadyStarted:
    """The app behind a started TestClient, with lifespan events acknowledged and not re-run."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": f"{message['type']}.complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        await self.app(scope, receive, send)


def _start(url: str, data_dir: Path) -> Iterator[tuple[Any, ApiUser]]:
    settings = Settings(data_dir=data_dir, database_url=url, broker_url="")
    app = create_app(settings)
    app.state.container.model.install(tiny_clip(0))
    with TestClient(app) as client:
        user = create_api_user(client)
        upload(client, user, range(2))
        files = [("files", (f"c{i}.jpg", noisy_jpeg(seed=90 + i), "image/jpeg")) for i in range(3)]
        r = client.post("/concepts", data={"name": "Fido"}, files=files, headers=user.headers)
        assert r.status_code == 202, r.text
        wait_jobs(client, timeout=120)
        yield schemathesis.openapi.from_asgi("/openapi.json", _AlreadyStarted(app)), user


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def fuzzed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    data_dir = tmp_path_factory.mktemp("fuzz")
    if request.param == "sqlite":
        yield from _start(f"sqlite:///{(data_dir / 'fuzz.db').as_posix()}", data_dir / "data")
    else:
        with temporary_pg_schema() as url:
            yield from _start(url, data_dir / "data")


@pytest.fixture(scope="module")
def fuzz_schema(fuzzed: Any) -> Any:
    return fuzzed[0]


@pytest.fixture(scope="module")
def fuzz_user(fuzzed: Any) -> ApiUser:
    return fuzzed[1]


def _operations() -> list[tuple[str, str]]:
    """(method, path) of every operation, read from the schema without starting an app."""
    with tempfile.TemporaryDirectory() as tmp:
        document = create_app(Settings(data_dir=Path(tmp), broker_url="")).openapi()
    methods = ("get", "put", "post", "delete", "patch")
    return [(m, p) for p, item in document["paths"].items() for m in methods if m in item]


@pytest.mark.parametrize(("method", "path"), _operations())
def test_every_operation_answers_as_documented(
    method: str, path: str, fuzz_schema: Any, fuzz_user: ApiUser
) -> None:
    operation = fuzz_schema[path][method.upper()]

    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,  # the fixed seed: the same requests on every run
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def fuzz(case: Any) -> None:
        case.call_and_validate(headers=fuzz_user.headers, checks=CHECKS)

    fuzz()
