"""Folders indexed in place: libraries, and the library file behind an image.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "libraries",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("path", sa.String(4096), nullable=False),
        sa.Column("scan_generation", sa.Integer(), nullable=False),
        sa.Column("report", sa.JSON(), nullable=True),
        sa.Column("scanned_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_libraries_user_id_users", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_libraries"),
        sa.UniqueConstraint("user_id", "path", name="uq_libraries_user_id_path"),
    )
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("library_id", sa.String(36), nullable=True))
        batch.add_column(sa.Column("source_path", sa.String(4096), nullable=True))
        batch.add_column(sa.Column("source_size", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("source_mtime_ns", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("scan_generation", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            "fk_images_library_id_libraries",
            "libraries",
            ["library_id"],
            ["id"],
            ondelete="CASCADE",
        )
        batch.create_index("ix_images_library_id_source_path", ["library_id", "source_path"])
    _job_kinds(KINDS + ("scan_library",))


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_index("ix_images_library_id_source_path")
        batch.drop_constraint("fk_images_library_id_libraries", type_="foreignkey")
        for column in (
            "scan_generation",
            "source_mtime_ns",
            "source_size",
            "source_path",
            "library_id",
        ):
            batch.drop_column(column)
    op.execute("DELETE FROM jobs WHERE kind = 'scan_library'")
    _job_kinds(KINDS)
    op.drop_table("libraries")


KINDS = ("embed_images", "train_concept", "rebuild_index")


def _jobs_table(kinds: tuple[str, ...]) -> sa.Table:
    """The jobs table as 0001 made it, with `kinds` allowed (batch mode copies from it)."""
    listed = ", ".join(f"'{k}'" for k in kinds)
    return sa.Table(
        "jobs",
        sa.MetaData(),
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_jobs_user_id_users", ondelete="CASCADE"
        ),
        sa.CheckConstraint(f"kind IN ({listed})", name="ck_jobs_kind"),
        sa.CheckConstraint(
            "state IN ('queued', 'running', 'succeeded', 'failed')", name="ck_jobs_state"
        ),
        sa.CheckConstraint("progress >= 0 AND progress <= 1", name="ck_jobs_progress"),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.Index("ix_jobs_state", "state"),
        sa.Index("ix_jobs_user_id_created_at", "user_id", "created_at"),
    )


def _job_kinds(kinds: tuple[str, ...]) -> None:
    """Replace the CHECK on jobs.kind (SQLite rebuilds the table from _jobs_table)."""
    listed = ", ".join(f"'{k}'" for k in kinds)
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("jobs", copy_from=_jobs_table(kinds), recreate="always"):
            pass
        return
    op.drop_constraint(op.f("ck_jobs_kind"), "jobs", type_="check")
    op.create_check_constraint(op.f("ck_jobs_kind"), "jobs", sa.text(f"kind IN ({listed})"))
