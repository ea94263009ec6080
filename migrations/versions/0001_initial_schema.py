"""Initial schema: users, api_keys, images, concepts, concept_examples, adapters, jobs.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _id() -> sa.Column:
    return sa.Column("id", sa.String(length=36), nullable=False)


def _owner(table: str, column: str = "user_id", parent: str = "users") -> list:
    return [
        sa.Column(column, sa.String(length=36), nullable=False),
        sa.ForeignKeyConstraint(
            [column], [f"{parent}.id"], name=op.f(f"fk_{table}_{column}_{parent}"),
            ondelete="CASCADE",
        ),
    ]


def upgrade() -> None:
    op.create_table(
        "users",
        _id(),
        sa.Column("name", sa.String(length=200), nullable=False),
        _ts("created_at"),
        sa.Column("index_generation", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
    )
    op.create_table(
        "api_keys",
        _id(),
        *_owner("api_keys"),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        _ts("created_at"),
        _ts("last_used_at", nullable=True),
        _ts("revoked_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    op.create_index(op.f("ix_api_keys_user_id"), "api_keys", ["user_id"])

    op.create_table(
        "images",
        _id(),
        *_owner("images"),
        sa.Column("vec_id", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("original_filename", sa.String(length=255), nullable=True),
        sa.Column("mime", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("storage_path", sa.String(length=512), nullable=False),
        sa.Column("embedding", sa.LargeBinary(), nullable=True),
        sa.Column("embedding_model", sa.String(length=255), nullable=True),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_images")),
        sa.UniqueConstraint("user_id", "sha256", name=op.f("uq_images_user_id_sha256")),
        sa.UniqueConstraint("user_id", "vec_id", name=op.f("uq_images_user_id_vec_id")),
    )
    op.create_index(op.f("ix_images_storage_path"), "images", ["storage_path"])
    op.create_index(
        op.f("ix_images_user_id_created_at_id"), "images", ["user_id", "created_at", "id"]
    )

    op.create_table(
        "concepts",
        _id(),
        *_owner("concepts"),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("name_key", sa.String(length=200), nullable=False),
        sa.Column("category", sa.String(length=100), nullable=True),
        sa.Column("token", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("retention_score", sa.Float(), nullable=True),
        sa.Column(
            "retention_flagged", sa.Boolean(), server_default=sa.text("false"), nullable=False
        ),
        _ts("created_at"),
        _ts("updated_at"),
        sa.CheckConstraint(
            "state IN ('training', 'ready', 'failed')", name=op.f("ck_concepts_state")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_concepts")),
        sa.UniqueConstraint("user_id", "name_key", name=op.f("uq_concepts_user_id_name_key")),
    )
    op.create_table(
        "concept_examples",
        _id(),
        *_owner("concept_examples", "concept_id", "concepts"),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("storage_path", sa.String(length=512), nullable=False),
        sa.Column("mime", sa.String(length=64), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("embedding", sa.LargeBinary(), nullable=True),
        sa.Column("embedding_model", sa.String(length=255), nullable=True),
        sa.Column("version_added", sa.Integer(), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_concept_examples")),
    )
    op.create_index(op.f("ix_concept_examples_concept_id"), "concept_examples", ["concept_id"])
    op.create_index(
        op.f("ix_concept_examples_storage_path"), "concept_examples", ["storage_path"]
    )
    op.create_table(
        "adapters",
        _id(),
        *_owner("adapters", "concept_id", "concepts"),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("weights", sa.LargeBinary(), nullable=False),
        sa.Column("model_id", sa.String(length=255), nullable=False),
        sa.Column("meta", sa.JSON(), nullable=True),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapters")),
        sa.UniqueConstraint("concept_id", "version", name=op.f("uq_adapters_concept_id_version")),
    )

    op.create_table(
        "jobs",
        _id(),
        *_owner("jobs"),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _ts("created_at"),
        _ts("started_at", nullable=True),
        _ts("finished_at", nullable=True),
        _ts("updated_at"),
        sa.CheckConstraint(
            "kind IN ('embed_images', 'train_concept', 'rebuild_index')",
            name=op.f("ck_jobs_kind"),
        ),
        sa.CheckConstraint(
            "state IN ('queued', 'running', 'succeeded', 'failed')", name=op.f("ck_jobs_state")
        ),
        sa.CheckConstraint("progress >= 0 AND progress <= 1", name=op.f("ck_jobs_progress")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index(op.f("ix_jobs_state"), "jobs", ["state"])
    op.create_index(op.f("ix_jobs_user_id_created_at"), "jobs", ["user_id", "created_at"])


def downgrade() -> None:
    # Children first; dropping a table drops its indexes and constraints with it.
    for table in ("jobs", "adapters", "concept_examples", "concepts", "images", "api_keys"):
        op.drop_table(table)
    op.drop_table("users")
