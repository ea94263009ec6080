"""Concept name keys recomputed with the one caseless rule (app.text.fold: NFKC, case-folded,
the Turkish i's as one letter), so stored keys agree with how queries match names.

Two concepts of one user whose names now fold alike (say "Fido" and "FİDO", distinct under
the old rule) cannot keep both keys: the older keeps the name, the newer gets " (2)" (" (3)",
...) appended to its name and key, so no concept is lost and the unique constraint holds.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.text import fold

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_concepts = sa.table(
    "concepts",
    sa.column("id", sa.String),
    sa.column("user_id", sa.String),
    sa.column("name", sa.String),
    sa.column("name_key", sa.String),
    sa.column("created_at", sa.DateTime),
)


def upgrade() -> None:
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(_concepts.c.id, _concepts.c.user_id, _concepts.c.name, _concepts.c.name_key)
        .order_by(_concepts.c.user_id, _concepts.c.created_at, _concepts.c.id)
    ).all()
    wanted: dict[str, tuple[str, str]] = {}  # id -> (name, key)
    taken: set[tuple[str, str]] = set()
    for concept_id, user_id, name, _old in rows:
        new_name, key, n = name, fold(name), 1
        while (user_id, key) in taken:
            n += 1
            new_name = f"{name} ({n})"
            key = fold(new_name)
        taken.add((user_id, key))
        wanted[concept_id] = (new_name, key)
    changed = [(cid, nk) for (cid, _u, name, old), nk in
               ((r, wanted[r[0]]) for r in rows) if (name, old) != nk]  # fmt: skip
    # Two passes: park every changing key on a unique placeholder first, so that swapping keys
    # between two rows never trips the unique constraint half-way.
    for concept_id, _ in changed:
        conn.execute(
            _concepts.update()
            .where(_concepts.c.id == concept_id)
            .values(name_key=f"\x01migrating:{concept_id}")
        )
    for concept_id, (name, key) in changed:
        conn.execute(
            _concepts.update().where(_concepts.c.id == concept_id).values(name=name, name_key=key)
        )


def downgrade() -> None:
    # Nothing to undo: the recomputed keys (and any " (2)" renames) are valid under 0002 too.
    pass
