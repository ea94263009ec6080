"""Files and folders by identity: a library file's ctime and inode (images.source_ctime_ns,
images.source_ino), the folders each library's last scan walked (library_folders), and why the
watcher does not watch a library (libraries.watch_error).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing rows: NULL; the next scan takes them from a file whose size and mtime still
    # match, without reading it (as the old version trusted those two).
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("source_ctime_ns", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("source_ino", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("libraries") as batch:
        batch.add_column(sa.Column("watch_error", sa.Text(), nullable=True))
    op.create_table(
        "library_folders",
        sa.Column("library_id", sa.String(length=36), nullable=False),
        sa.Column("folder_key", sa.String(length=48), nullable=False),
        sa.Column("depth", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["library_id"],
            ["libraries.id"],
            name=op.f("fk_library_folders_library_id_libraries"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("library_id", "folder_key", name=op.f("pk_library_folders")),
    )
    op.create_index(
        op.f("ix_library_folders_folder_key"), "library_folders", ["folder_key"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_library_folders_folder_key"), table_name="library_folders")
    op.drop_table("library_folders")
    with op.batch_alter_table("libraries") as batch:
        batch.drop_column("watch_error")
    with op.batch_alter_table("images") as batch:
        batch.drop_column("source_ino")
        batch.drop_column("source_ctime_ns")
