"""Users and their API keys, and the index generation each user's searches are cached by."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.models import ApiKey, User


def get_user(*, db_session: Session, user_id: str) -> User | None:
    """A user by id."""
    return db_session.get(User, user_id)


def get_api_key(*, db_session: Session, key_id: str) -> ApiKey | None:
    """An API key by id."""
    return db_session.get(ApiKey, key_id)


def get_api_key_by_hash(*, db_session: Session, key_hash: str) -> ApiKey | None:
    """The key whose sha256 is `key_hash` (revoked or not)."""
    return db_session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash))


def bump_index_generation(*, db_session: Session, user_id: str) -> None:
    """Tell every API process that the user's embedded image set changed."""
    db_session.execute(
        update(User)
        .where(User.id == user_id)
        .values(index_generation=User.index_generation + 1)
        .execution_options(synchronize_session=False)
    )
