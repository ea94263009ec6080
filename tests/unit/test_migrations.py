"""Migrations: upgrade/downgrade round trip, agreement with the models, constraints, on both DBs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import current_revision, downgrade, head_revision, make_engine, migrate
from app.models import (
    Adapter,
    ApiKey,
    Base,
    Concept,
    ConceptExample,
    Image,
    Job,
    User,
    utcnow,
)

APP_TABLES = {t.name for t in Base.metadata.sorted_tables}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on a brand-new, never-migrated database."""
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'fresh.db'}")
        yield engine
        engine.dispose()
        return
    url = request.getfixturevalue("postgres_schema_url")
    engine = make_engine(url)
    yield engine
    engine.dispose()


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def schema_diff(engine: Engine) -> list:
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), Base.metadata)


def test_upgrade_downgrade_upgrade_round_trip(empty_engine):
    assert current_revision(empty_engine) is None
    migrate(empty_engine)
    assert tables(empty_engine) == APP_TABLES | {"alembic_version"}
    assert current_revision(empty_engine) == head_revision()

    downgrade(empty_engine, "base")
    assert tables(empty_engine) == {"alembic_version"}
    assert current_revision(empty_engine) is None

    migrate(empty_engine)
    assert tables(empty_engine) == APP_TABLES | {"alembic_version"}
    assert schema_diff(empty_engine) == []


def test_models_and_migrations_agree(empty_engine):
    migrate(empty_engine)
    assert schema_diff(empty_engine) == []


def test_a_drifted_model_is_detected(empty_engine):
    """The agreement check can fail: drop a column the models have, and it reports it."""
    migrate(empty_engine)
    with empty_engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.execute(text("DROP INDEX ix_images_storage_path"))
        else:
            conn.execute(text("ALTER TABLE images DROP COLUMN embedding_model"))
    assert schema_diff(empty_engine) != []


def test_migrate_is_idempotent(empty_engine):
    migrate(empty_engine)
    migrate(empty_engine)
    assert current_revision(empty_engine) == head_revision()


def _user_with_everything(session: Session) -> User:
    user = User(name="u")
    session.add(user)
    session.flush()
    concept = Concept(user_id=user.id, name="Fido", name_key="fido", token="sks")
    session.add_all(
        [
            ApiKey(user_id=user.id, prefix="abcd1234", key_hash="0" * 64),
            Image(
                user_id=user.id,
                sha256="a" * 64,
                mime="image/png",
                size_bytes=1,
                width=1,
                height=1,
                storage_path="originals/x",
            ),
            concept,
            Job(user_id=user.id, kind="embed_images", payload={"image_ids": []}),
        ]
    )
    session.flush()
    session.add_all(
        [
            ConceptExample(
                concept_id=concept.id,
                sha256="b" * 64,
                storage_path="originals/y",
                mime="image/png",
                width=1,
                height=1,
            ),
            Adapter(concept_id=concept.id, version=1, weights=b"w", model_id="m"),
        ]
    )
    session.commit()
    return user


def test_deleting_a_user_cascades_to_everything_it_owns(empty_engine):
    migrate(empty_engine)
    with Session(empty_engine) as session:
        user = _user_with_everything(session)
        session.execute(text("DELETE FROM users WHERE id = :id"), {"id": user.id})
        session.commit()
        for model in (ApiKey, Image, Concept, ConceptExample, Adapter, Job):
            assert session.scalars(select(model)).all() == [], model.__tablename__


@pytest.mark.parametrize(
    "make_duplicate",
    [
        pytest.param(
            lambda u: Image(
                user_id=u.id,
                sha256="a" * 64,
                mime="image/png",
                size_bytes=1,
                width=1,
                height=1,
                storage_path="originals/z",
            ),
            id="same user, same sha256",
        ),
        pytest.param(
            lambda u: Concept(user_id=u.id, name="FIDO", name_key="fido", token="sks"),
            id="same user, same name_key",
        ),
        pytest.param(
            lambda u: Job(user_id=u.id, kind="no_such_kind", payload={}),
            id="unknown job kind",
        ),
        pytest.param(
            lambda u: Job(user_id=u.id, kind="embed_images", payload={}, progress=1.5),
            id="progress above 1",
        ),
    ],
)
def test_constraints_refuse_bad_rows(empty_engine, make_duplicate):
    migrate(empty_engine)
    with Session(empty_engine) as session:
        user = _user_with_everything(session)
        session.add(make_duplicate(user))
        with pytest.raises(IntegrityError):
            session.commit()


def test_one_adapter_per_concept_version(empty_engine):
    migrate(empty_engine)
    with Session(empty_engine) as session:
        _user_with_everything(session)
        concept = session.scalars(select(Concept)).one()
        session.add(Adapter(concept_id=concept.id, version=1, weights=b"again", model_id="m"))
        with pytest.raises(IntegrityError):
            session.commit()


def test_timestamps_come_back_aware_utc(empty_engine):
    migrate(empty_engine)
    with Session(empty_engine) as session:
        before = utcnow()
        session.add(User(name="t"))
        session.commit()
        session.expunge_all()
        created = session.scalars(select(User.created_at)).one()
    assert created.tzinfo is not None
    assert created.utcoffset().total_seconds() == 0
    assert abs((created - before).total_seconds()) < 60


def test_0003_rekeys_concept_names_with_the_one_caseless_rule(empty_engine):
    """Keys made by the old rule (str.casefold) are recomputed with app.text.fold; names that
    now collide keep every concept, the newer one renamed."""
    migrate(empty_engine, "0002")
    old = [("Fido", "fido"), ("FİDO", "FİDO".casefold()), ("Kırmızı", "Kırmızı".casefold()),
           ("Rex", "rex")]  # fmt: skip
    with Session(empty_engine) as session:
        user = User(name="alice")
        other = User(name="bob")
        session.add_all([user, other])
        session.flush()
        for n, (name, key) in enumerate(old):
            session.execute(
                text(
                    "INSERT INTO concepts (id, user_id, name, name_key, category, token, state,"
                    " version, retention_flagged, created_at, updated_at) VALUES (:id, :u, :n,"
                    " :k, NULL, 'sks', 'ready', 1, false, :t, :t)"
                ),
                {"id": f"c{n}", "u": user.id, "n": name, "k": key,
                 "t": f"2026-01-0{n + 1} 00:00:00+00:00"},
            )  # fmt: skip
        # Another user's "fıdo" is no collision.
        session.execute(
            text(
                "INSERT INTO concepts (id, user_id, name, name_key, category, token, state,"
                " version, retention_flagged, created_at, updated_at) VALUES ('b0', :u, 'fıdo',"
                " 'fıdo', NULL, 'sks', 'ready', 1, false, :t, :t)"
            ),
            {"u": other.id, "t": "2026-01-09 00:00:00+00:00"},
        )
        session.commit()
    migrate(empty_engine)
    with Session(empty_engine) as session:
        rows = dict(session.execute(text("SELECT id, name || '|' || name_key FROM concepts")).all())
    assert rows == {
        "c0": "Fido|fido",
        "c1": "FİDO (2)|fido (2)",  # collides with the older Fido: kept, renamed
        "c2": "Kırmızı|kirmizi",
        "c3": "Rex|rex",
        "b0": "fıdo|fido",
    }


def test_0006_adds_embed_error_and_keeps_the_images(empty_engine):
    """Images from before 0006 have no failure recorded; a downgrade keeps them."""
    migrate(empty_engine, "0005")
    with Session(empty_engine) as session:
        session.execute(text("INSERT INTO users (id, name, created_at, index_generation)"
                             " VALUES ('u', 'u', '2026-01-01 00:00:00+00:00', 0)"))  # fmt: skip
        session.execute(
            text(
                "INSERT INTO images (id, user_id, vec_id, sha256, mime, size_bytes, width,"
                " height, storage_path, taken_at, created_at) VALUES ('i', 'u', 1, :sha,"
                " 'image/png', 1, 1, 1, 'originals/x', :t, :t)"
            ),
            {"sha": "a" * 64, "t": "2026-01-01 00:00:00+00:00"},
        )
        session.commit()
    migrate(empty_engine)
    with Session(empty_engine) as session:
        assert session.get(Image, "i").embed_error is None
        session.execute(text("UPDATE images SET embed_error = 'the file is gone'"))
        session.commit()
    downgrade(empty_engine, "0005")
    with Session(empty_engine) as session:
        assert session.execute(text("SELECT id FROM images")).scalars().all() == ["i"]
    assert "embed_error" not in {c["name"] for c in inspect(empty_engine).get_columns("images")}
