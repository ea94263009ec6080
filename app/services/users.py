"""Users and API keys: create, issue, revoke, authenticate.

A key looks like `polar_<prefix>_<secret>`: `prefix` (8 hex chars) tells keys apart in listings
and logs, `secret` carries 256 random bits. Only sha256(key) is stored, so the key is shown once;
a database leak does not leak usable keys, and a hash lookup needs no constant-time compare
(an attacker cannot choose what the stored digests match).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import timedelta

from sqlalchemy.orm import Session

from app import repositories
from app.errors import NotFound, Unauthorized, ValidationFailed
from app.models import ApiKey, User, utcnow

KEY_PREFIX = "polar"
_KEY_RE = re.compile(r"^polar_([0-9a-f]{8})_([A-Za-z0-9_-]{43})$")
# Writing last_used_at on every request would turn every read into a write.
_LAST_USED_RESOLUTION = timedelta(minutes=1)


def hash_key(key: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> tuple[str, str]:
    """A fresh (key, prefix)."""
    prefix = secrets.token_hex(4)
    return f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}", prefix


def create_user(name: str, *, db_session: Session) -> User:
    """A new user (no key yet)."""
    name = name.strip()
    if not name or len(name) > 200:
        raise ValidationFailed("a user name must have 1 to 200 characters")
    user = User(name=name)
    db_session.add(user)
    db_session.commit()
    return user


def create_api_key(
    user_id: str, *, db_session: Session, name: str | None = None
) -> tuple[ApiKey, str]:
    """Issue a key for a user; returns the row and the plaintext key (shown once, never stored)."""
    if repositories.get_user(db_session=db_session, user_id=user_id) is None:
        raise NotFound.of("user")
    key, prefix = generate_key()
    api_key = ApiKey(user_id=user_id, prefix=prefix, key_hash=hash_key(key), name=name)
    db_session.add(api_key)
    db_session.commit()
    return api_key, key


def revoke_api_key(key_id: str, *, db_session: Session) -> ApiKey:
    """Revoke a key for good (idempotent: revoking twice keeps the first time)."""
    api_key = repositories.get_api_key(db_session=db_session, key_id=key_id)
    if api_key is None:
        raise NotFound.of("API key")
    if api_key.revoked_at is None:
        api_key.revoked_at = utcnow()
        db_session.commit()
    return api_key


def authenticate(key: str, *, db_session: Session) -> User:
    """The user a bearer key belongs to; Unauthorized if it is malformed, unknown or revoked."""
    if not _KEY_RE.match(key):
        raise Unauthorized("invalid API key (expected polar_<prefix>_<secret>)")
    api_key = repositories.get_api_key_by_hash(db_session=db_session, key_hash=hash_key(key))
    if api_key is None:
        raise Unauthorized("invalid API key")
    if api_key.revoked_at is not None:
        raise Unauthorized("this API key has been revoked")
    user = repositories.get_user(db_session=db_session, user_id=api_key.user_id)
    if user is None:  # the FK cascade makes this impossible; keep the check cheap and explicit
        raise Unauthorized("invalid API key")
    now = utcnow()
    if api_key.last_used_at is None or now - api_key.last_used_at > _LAST_USED_RESOLUTION:
        api_key.last_used_at = now
        db_session.commit()
    return user
