"""Every query lives in app/repositories/: no use case in app/services builds or runs a SQL
statement. Read from the source with `ast`, so a new service module is covered as it lands.

What a service may still use of SQLAlchemy: the `Session` it is handed (and `sessionmaker` as a
type), the unit of work on mapped objects (`add`, `delete`, `flush`, `get` by primary key,
`commit`, `rollback`) and the exceptions (`sqlalchemy.exc`). Anything that builds a statement
(`select`, `update`, `delete`, `insert`, `text`, `func`, `case`, `or_`, column types...) is an
import from elsewhere in SQLAlchemy, and running one is `execute`, `scalar`, `scalars` or
`query` on a session.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ROOT / "app" / "services"

# What a service may import from SQLAlchemy, by module (None: any name of that module).
ALLOWED_IMPORTS: dict[str, set[str] | None] = {
    "sqlalchemy.orm": {"Session", "sessionmaker"},
    "sqlalchemy.exc": None,
    "sqlalchemy": {"exc"},
}
# Session methods that run a statement.
RUNS_A_STATEMENT = {"execute", "scalar", "scalars", "query"}


def query_code(source: str) -> list[str]:
    """Where `source` builds or runs a SQL statement: "line N: what", in order."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [
                f"line {node.lineno}: import {alias.name}"
                for alias in node.names
                if alias.name == "sqlalchemy" or alias.name.startswith("sqlalchemy.")
            ]
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            if node.module != "sqlalchemy" and not node.module.startswith("sqlalchemy."):
                continue
            allowed = ALLOWED_IMPORTS.get(node.module, set())
            found += [
                f"line {node.lineno}: from {node.module} import {alias.name}"
                for alias in node.names
                if allowed is not None and alias.name not in allowed
            ]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in RUNS_A_STATEMENT
        ):
            found.append(f"line {node.lineno}: .{node.func.attr}(...)")
    return sorted(found, key=lambda f: int(f.split(":")[0].removeprefix("line ")))


def test_no_service_builds_or_runs_a_query():
    modules = sorted(SERVICES.glob("*.py"))
    assert len(modules) > 10  # the folder was found
    offending = {
        p.name: hits for p in modules if (hits := query_code(p.read_text(encoding="utf-8")))
    }
    assert offending == {}, "move these queries into app/repositories/"


# What services held before the queries moved (app/services/jobs.py, libraries.py,
# embedding.py, index.py, training.py), each alone, so that every rule is seen to fail.
@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            """
            from sqlalchemy import update
            def touch(s, job_id):
                s.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow()))
            """,
            ["line 1: from sqlalchemy import update", "line 3: .execute(...)"],
        ),
        (
            """
            from sqlalchemy import delete
            def forget(db_session, library):
                db_session.execute(delete(Image).where(Image.library_id == library.id))
            """,
            ["line 1: from sqlalchemy import delete", "line 3: .execute(...)"],
        ),
        (
            """
            from sqlalchemy import ColumnElement, case, func, or_, select, update
            """,
            [
                f"line 1: from sqlalchemy import {n}"
                for n in ("ColumnElement", "case", "func", "or_", "select", "update")
            ],
        ),
        (
            """
            def generation(db_session, user_id, query):
                return db_session.scalar(query)
            """,
            ["line 2: .scalar(...)"],
        ),
        (
            """
            def tokens(db_session, query):
                return set(db_session.scalars(query)), db_session.query(Concept).all()
            """,
            ["line 2: .scalars(...)", "line 2: .query(...)"],
        ),
        (
            """
            import sqlalchemy as sa
            from sqlalchemy.sql import text
            from sqlalchemy.orm import Session, defer
            """,
            [
                "line 1: import sqlalchemy",
                "line 2: from sqlalchemy.sql import text",
                "line 3: from sqlalchemy.orm import defer",
            ],
        ),
    ],
)
def test_the_check_finds_each_kind_of_query_code(source: str, expected: list[str]):
    assert query_code(textwrap.dedent(source).strip()) == expected


def test_the_check_leaves_sessions_units_of_work_and_errors_alone():
    source = """
    from sqlalchemy import exc as sa_exc
    from sqlalchemy.exc import IntegrityError
    from sqlalchemy.orm import Session, sessionmaker
    from app import repositories
    def run(s: Session, job_id: str) -> None:
        job = s.get(Job, job_id)
        s.delete(job)
        s.add(Job())
        s.flush()
        repositories.claim_job(db_session=s, job_id=job_id, runner=None)
    """
    assert query_code(textwrap.dedent(source).strip()) == []
