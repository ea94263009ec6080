"""When each library photo was taken (images.taken_at), for search filters.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing images: their upload time is the best we know without reading every file again
    # (new uploads read EXIF DateTimeOriginal, else the file time the client sends).
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("taken_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE images SET taken_at = created_at")
    with op.batch_alter_table("images") as batch:
        batch.alter_column("taken_at", existing_type=sa.DateTime(timezone=True), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_column("taken_at")
