"""Who runs a job (jobs.runner: the Celery task or the embedded process that claimed it), so a
lost pool process's job is re-queued at once, and only that run of it.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing rows: unknown; a lost one is found by its heartbeat as before.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("runner", sa.String(80), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("runner")
