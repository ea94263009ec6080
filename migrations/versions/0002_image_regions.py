"""Region embeddings of library images (crops used to re-rank multi-concept queries).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable: existing images keep searching on their whole-image embedding; the next embed
    # job of the user (or `polar reindex`) fills the regions in.
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("region_embeddings", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("region_layout", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_column("region_layout")
        batch.drop_column("region_embeddings")
