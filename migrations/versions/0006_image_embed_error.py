"""Why an image could not be embedded (images.embed_error, and whether that may pass:
images.embed_error_transient), so it is not retried every pass.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing rows: nothing recorded; an image that cannot be read fails once more, then rests.
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("embed_error", sa.Text(), nullable=True))
        # An I/O error (a network share that dropped): read again at the library's next scan.
        batch.add_column(sa.Column("embed_error_transient", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_column("embed_error_transient")
        batch.drop_column("embed_error")
