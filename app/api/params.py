"""Path, query and form parameters the routes share: each bounded, each string cleaned once.

Strings go through `CleanStr` (valid UTF-8 without NUL, NFKC: app/text.py), so nothing a request
brings in reaches the database or a response undecodable; numbers have upper bounds, stated in
the OpenAPI schema (the configured limits are filled in by app/api/openapi.py).
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Form, Path, Query
from pydantic import BeforeValidator, Field

from app.api.schemas import CURSOR_DOC, CURSOR_MAX_CHARS, CURSOR_PATTERN, ID_MAX_CHARS, CleanStr

PAGE_MAX = 200


def object_id(what: str) -> object:
    """The `{id}` path parameter of a `what`."""
    return Path(max_length=ID_MAX_CHARS, description=f"the {what}'s id (a UUID)")


ImageId = Annotated[CleanStr, object_id("image")]
ConceptId = Annotated[CleanStr, object_id("concept")]
JobId = Annotated[CleanStr, object_id("job")]
ExampleId = Annotated[CleanStr, object_id("concept photo")]
LibraryId = Annotated[CleanStr, object_id("library")]

# Library images named in a form (repeat the field once per id); at most what one request may
# carry in photos anyway (the service answers too_many_photos beyond training.max_photos).
MAX_FORM_IDS = 100
LibraryImageIds = Annotated[
    list[Annotated[CleanStr, Field(max_length=ID_MAX_CHARS)]] | None,
    Form(
        max_length=MAX_FORM_IDS,
        description=(
            "ids of images already in your library to use as photos of the concept (repeat the "
            "field once per id; their files are shared, not copied); with `files`, 3-13 in all"
        ),
    ),
]

_DIGITS = re.compile(r"[+-]?[0-9]+")


def _integer_text(value: object) -> object:
    """A query parameter is text; only digits (with a sign) are an integer. Pydantic's lax mode
    also takes "5.0", "5_000" or " 5 ", which the API documents as a 422."""
    if isinstance(value, str) and not _DIGITS.fullmatch(value):
        raise ValueError("must be a whole number written in digits")
    return value


# An integer query parameter; wrap it in Annotated with its Query(...).
IntParam = Annotated[int, BeforeValidator(_integer_text)]

PageLimit = Annotated[IntParam, Query(ge=1, le=PAGE_MAX, description=f"page size, 1 to {PAGE_MAX}")]
# The pattern is documented, not enforced here: the service answers `invalid_cursor` for any
# cursor it did not issue.
Cursor = Annotated[
    CleanStr | None,
    Query(
        max_length=CURSOR_MAX_CHARS,
        description=CURSOR_DOC,
        json_schema_extra={"pattern": CURSOR_PATTERN},
    ),
]
