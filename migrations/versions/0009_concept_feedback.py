"""Concept feedback: a person's marks on library photos for a concept ("this is Fido" /
"not Fido"), kept as history (docs/ALBUMS.md).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "concept_verdicts",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("concept_id", sa.String(36), nullable=False),
        sa.Column("image_id", sa.String(36), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("concept_version", sa.Integer(), nullable=False),
        _ts("created_at"),
        _ts("ended_at", nullable=True),
        sa.CheckConstraint(
            "verdict IN ('confirmed', 'rejected')", name=op.f("ck_concept_verdicts_verdict")
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_concept_verdicts_user_id_users"),
            ondelete="CASCADE",
        ),  # fmt: skip
        sa.ForeignKeyConstraint(
            ["concept_id"],
            ["concepts.id"],
            name=op.f("fk_concept_verdicts_concept_id_concepts"),
            ondelete="CASCADE",
        ),  # fmt: skip
        sa.ForeignKeyConstraint(
            ["image_id"],
            ["images.id"],
            name=op.f("fk_concept_verdicts_image_id_images"),
            ondelete="CASCADE",
        ),  # fmt: skip
        sa.PrimaryKeyConstraint("id", name=op.f("pk_concept_verdicts")),
    )
    op.create_index(
        "uq_concept_verdicts_active",
        "concept_verdicts",
        ["concept_id", "image_id"],
        unique=True,
        sqlite_where=sa.text("ended_at IS NULL"),
        postgresql_where=sa.text("ended_at IS NULL"),
    )
    op.create_index(op.f("ix_concept_verdicts_image_id"), "concept_verdicts", ["image_id"])
    op.create_index(
        op.f("ix_concept_verdicts_user_id_created_at"),
        "concept_verdicts",
        ["user_id", "created_at"],
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_concept_verdicts_user_id_created_at"), table_name="concept_verdicts")
    op.drop_index(op.f("ix_concept_verdicts_image_id"), table_name="concept_verdicts")
    op.drop_index("uq_concept_verdicts_active", table_name="concept_verdicts")
    op.drop_table("concept_verdicts")
