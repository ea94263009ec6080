"""Engine, sessions and schema migrations, all built from Settings.database_url."""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, exc, make_url, text
from sqlalchemy.engine import URL, ExceptionContext
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# Any constant works; it only has to be the same in every process migrating one database.
_MIGRATION_LOCK_KEY = 0x504F4C4152  # "POLAR"


def normalize_url(url: str) -> URL:
    """Parse a database URL; plain `postgres(ql)://` means psycopg 3 (the driver we ship)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _set_sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """Per-connection SQLite settings: FKs are off by default; WAL lets reads run during writes."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")  # safe with WAL, much faster than FULL
    cur.close()


# Bounds on every PostgreSQL call, so a stuck database costs seconds, never a stuck thread.
PG_CONNECT_TIMEOUT_S = 5
PG_POOL_TIMEOUT_S = 10
PG_STATEMENT_TIMEOUT_MS = 60_000


def _set_pg_timeouts(dbapi_conn: Any, _record: Any) -> None:
    """Per-connection PostgreSQL limits (SET, not the URL's `options`, which may hold a
    search_path). psycopg 3 opens a transaction for the SET: commit it so the pool gets an idle
    connection back."""
    cur = dbapi_conn.cursor()
    cur.execute(f"SET statement_timeout = {PG_STATEMENT_TIMEOUT_MS}")
    cur.close()
    dbapi_conn.commit()


# Connections beyond the pool size, for the job, heartbeat and reconciler threads.
POOL_OVERFLOW = 8

# --- no connection crosses a fork -------------------------------------------------------------
#
# A forked child (a Celery pool process, started again after one died, is forked from the
# worker's main process, whose reconciler holds pooled connections) inherits the parent's pooled
# sockets. Two processes talking over one socket corrupt the session both think they own
# (psycopg: `prepared statement "_pg3_0" already exists`). Every engine made here therefore
# (1) forgets its pool in a forked child, without closing the parent's connections, and
# (2) refuses, at checkout, any connection opened by another process.

_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


def _forget_pools_after_fork() -> None:
    """In a forked child: every engine starts a new, empty pool (the parent's stay open)."""
    for engine in list(_ENGINES):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_pools_after_fork)


def _remember_pid(_dbapi_conn: Any, record: Any) -> None:
    record.info["pid"] = os.getpid()


def _refuse_other_process(_dbapi_conn: Any, record: Any, proxy: Any) -> None:
    """A pooled connection opened by another process is dropped (not closed: it is the other
    process's) and the pool opens a new one."""
    pid = os.getpid()
    if record.info.get("pid", pid) != pid:
        record.dbapi_connection = proxy.dbapi_connection = None
        raise exc.DisconnectionError(
            f"connection opened by process {record.info['pid']}, checked out in {pid}"
        )


# SQLSTATEs that say a connection's session state is not what this process believes (a
# connection shared with another process, or one left mid-statement): the connection is
# dropped as a disconnect would be, and the statement fails with a retryable error.
_BROKEN_SESSION_SQLSTATES = frozenset(
    {
        "42P05",  # duplicate_prepared_statement
        "26000",  # invalid_sql_statement_name (a prepared statement this session lacks)
        "08P01",  # protocol_violation
    }
)


def _broken_session_is_a_disconnect(ctx: ExceptionContext) -> None:
    if getattr(ctx.original_exception, "sqlstate", None) in _BROKEN_SESSION_SQLSTATES:
        ctx.is_disconnect = True


def database_disk_full(error: BaseException) -> bool:
    """Whether a database error says the database's own disk is full (SQLite: SQLITE_FULL;
    PostgreSQL: disk_full), as opposed to the database being away."""
    orig = getattr(error, "orig", None)
    return (
        getattr(orig, "sqlite_errorname", None) == "SQLITE_FULL"
        or getattr(orig, "sqlstate", None) == "53100"
    )


def _guard_forks(engine: Engine) -> Engine:
    _ENGINES.add(engine)
    event.listen(engine, "connect", _remember_pid)
    event.listen(engine, "checkout", _refuse_other_process)
    return engine


def make_engine(url: str, pool_size: int = 5) -> Engine:
    """An engine for `url` (SQLite file, in-memory SQLite, or Postgres via psycopg 3).

    `pool_size`: connections kept open (PostgreSQL), as many as the threads that hold a session
    at once (the API's request threads), so no request waits for a connection.
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() != "sqlite":
        # pre_ping: a connection that died with a database restart is replaced, not handed out.
        pg = create_engine(
            parsed,
            pool_pre_ping=True,
            pool_size=pool_size,
            max_overflow=POOL_OVERFLOW,
            pool_timeout=PG_POOL_TIMEOUT_S,
            connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S},
        )
        if parsed.get_backend_name() == "postgresql":
            event.listen(pg, "connect", _set_pg_timeouts)
            event.listen(pg, "handle_error", _broken_session_is_a_disconnect)
        return _guard_forks(pg)
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": 30}}
    database = parsed.database
    memory = database in (None, "", ":memory:")
    if memory or database is None:
        kwargs["poolclass"] = StaticPool  # one shared connection, or each sees an empty DB
    else:
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, **kwargs)
    event.listen(engine, "connect", _set_sqlite_pragmas)
    # An in-memory database is its one connection: a child could not open another to it.
    return engine if memory else _guard_forks(engine)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit (objects outlive the request)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    """Process-wide engine per URL, for workers and the CLI (each API app owns its own)."""
    return make_engine(url)


@lru_cache(maxsize=8)
def get_session_factory(url: str) -> sessionmaker[Session]:
    """Process-wide session factory per URL, on get_engine(url)."""
    return make_session_factory(get_engine(url))


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def transaction_lock(db_session: Session, key: int) -> None:
    """Hold a lock named `key` until `db_session`'s transaction ends (commit or rollback), so
    that a check and the write it allows are one step for every transaction taking the same
    lock (check-then-insert without a race).

    PostgreSQL: a transaction-scoped advisory lock on `key` (other transactions are not held
    up). SQLite: the database's one writer lock, taken by BEGIN IMMEDIATE (the driver begins a
    transaction only at a session's first write, so the reads before it ran outside one and
    left no snapshot that could make the lock fail); a transaction already open here has
    written, so it holds that lock already. Waits up to the busy timeout (30 s) for another
    writer, then raises OperationalError.
    """
    conn = db_session.connection()
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
    elif conn.dialect.name == "sqlite":
        dbapi = conn.connection.driver_connection
        if dbapi is not None and not dbapi.in_transaction:
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def alembic_config() -> Config:
    """Alembic config that needs no alembic.ini (works from any working directory)."""
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise RuntimeError(f"migrations not found at {MIGRATIONS_DIR}")
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head_revision() -> str | None:
    """The newest migration revision shipped with this code."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None: never migrated)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the schema to `revision`; safe to call from many processes at once."""
    cfg = alembic_config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Replicas starting together: one migrates, the others wait, then find it done.
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
            conn.execute(text("SET LOCAL statement_timeout = 0"))  # a migration may take long
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    log.info("database schema at %s", revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Downgrade the schema to `revision` ("base" drops everything)."""
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
