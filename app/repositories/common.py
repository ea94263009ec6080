"""What every query module shares: keyset pagination, written once, and the IN-list size."""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute, Session

from app.errors import InvalidCursor

_MALFORMED_CURSOR = "malformed cursor: pass back next_cursor unchanged"


# --- keyset pagination, written once ------------------------------------------------------------


RowT = TypeVar("RowT")


@dataclass(frozen=True)
class Page(Generic[RowT]):
    """One page of a listing; `next_cursor` is None on the last page."""

    items: Sequence[RowT]
    next_cursor: str | None


def encode_cursor(created_at: datetime, row_id: str) -> str:
    """Opaque cursor just after the row keyed (created_at, id): url-safe base64, no padding."""
    raw = f"{created_at.isoformat()}|{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) key inside a cursor; InvalidCursor if we did not make it."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, row_id = raw.split("|")
        created_at = datetime.fromisoformat(stamp)
        uuid.UUID(row_id)
    except (binascii.Error, UnicodeError, ValueError) as e:
        raise InvalidCursor(_MALFORMED_CURSOR) from e
    if created_at.tzinfo is None:
        raise InvalidCursor(_MALFORMED_CURSOR)
    return created_at, row_id


def keyset_page(
    db_session: Session,
    query: Select[Any],
    *,
    created_at: InstrumentedAttribute[datetime],
    row_id: InstrumentedAttribute[str],
    limit: int,
    cursor: str | None,
    newest_first: bool = False,
) -> Page[Any]:
    """A page of `query`'s rows in (created_at, id) order, stable under concurrent inserts."""
    if cursor:
        at, key = decode_cursor(cursor)
        if newest_first:
            query = query.where(or_(created_at < at, and_(created_at == at, row_id < key)))
        else:
            query = query.where(or_(created_at > at, and_(created_at == at, row_id > key)))
    order = (created_at.desc(), row_id.desc()) if newest_first else (created_at, row_id)
    rows = db_session.scalars(query.order_by(*order).limit(limit + 1)).all()
    items = rows[:limit]
    last = items[-1] if len(rows) > limit else None
    return Page(items, encode_cursor(last.created_at, last.id) if last is not None else None)


IN_CHUNK = 900  # ids per IN (...): SQLite allows at most 999 bound parameters
