"""The OpenAPI document, made to say what the code answers.

FastAPI derives most of it from the routes; this fills in what it cannot know:
- public paths (deps.PUBLIC_PATHS) need no key: no security requirement, no 401;
- every other operation documents 401; every operation with parameters or a body documents
  422 in the service's error shape (FastAPI's default 422 schema is not what we send); every
  operation with a body documents 400 (unparsable) and 413 (over the body-size limit);
- the configured limits (largest `k`, deepest `offset`, longest query) replace the ceilings
  the routes validate against, so a client reads the numbers this deployment enforces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from app.api.deps import PUBLIC_PATHS
from app.config import LimitSettings

_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_DESCRIPTIONS = {
    400: "Malformed request body (not parsable as JSON or multipart)",
    401: "Missing, malformed, unknown or revoked API key",
    413: "Request body (or a file in it) over the size limit",
    422: "Invalid input (`code` says which rule: validation_failed, invalid_cursor, ...)",
    503: "A dependency is away (`database_unavailable`, `model_loading`, `storage_unavailable`"
    ", ...); retry after the Retry-After header's seconds",
    507: "The data folder's disk is full (`storage_full`); nothing was stored",
}
_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def _error(status: int) -> dict[str, Any]:
    return {
        "description": _DESCRIPTIONS[status],
        "content": {"application/json": {"schema": _ERROR_REF}},
    }


def _set_limits(schema: dict[str, Any], bounds: dict[str, dict[str, int]]) -> None:
    """`bounds[name]` (JSON Schema keywords) into parameters and body properties named `name`."""
    for item in schema.get("paths", {}).values():
        for method in _METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            for param in operation.get("parameters", []):
                if param.get("in") == "query" and param["name"] in bounds:
                    param["schema"].update(bounds[param["name"]])
    for name in ("SearchRequest",):
        props = schema.get("components", {}).get("schemas", {}).get(name, {}).get("properties", {})
        for field, keywords in bounds.items():
            if field in props:
                props[field].update(keywords)


def _document_errors(schema: dict[str, Any]) -> None:
    for path, item in schema.get("paths", {}).items():
        for method in _METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            responses = operation.setdefault("responses", {})
            if path in PUBLIC_PATHS:
                operation.pop("security", None)
                responses.pop("401", None)
            else:
                responses.setdefault("401", _error(401))
                # Every keyed route reads the database (the key itself), which may be away.
                responses.setdefault("503", _error(503))
            if operation.get("parameters") or operation.get("requestBody"):
                responses["422"] = _error(422)
            if operation.get("requestBody"):
                responses.setdefault("400", _error(400))
                responses.setdefault("413", _error(413))
                content = operation["requestBody"].get("content", {})
                if "multipart/form-data" in content:  # uploads write to the data folder
                    responses.setdefault("507", _error(507))
    components = schema.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)


def install_openapi(app: FastAPI, limits: LimitSettings) -> None:
    """Replace `app.openapi` with one that post-processes FastAPI's document once."""
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            _document_errors(schema)
            _set_limits(
                schema,
                {
                    "k": {"maximum": limits.max_k},
                    "offset": {"maximum": limits.max_offset},
                    "q": {"minLength": 1, "maxLength": limits.max_query_chars},
                },
            )
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
