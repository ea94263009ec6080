"""`polar` command line: serve, and admin tasks."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from app.config import get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.main import create_app

    settings = get_settings()
    uvicorn.run(
        create_app(settings),
        host=args.host or settings.host,
        port=args.port or settings.port,
        log_level=settings.log_level,
    )
    return 0


def _session_factory() -> sessionmaker[Session]:
    """Sessions on the configured database, migrated to the newest schema first."""
    from app.db import get_engine, get_session_factory, migrate

    url = get_settings().database_url
    migrate(get_engine(url))
    return get_session_factory(url)


def _migrate(_args: argparse.Namespace) -> int:
    from app.db import current_revision, make_engine, migrate

    engine = make_engine(get_settings().database_url)
    try:
        migrate(engine)
        print(f"database schema at revision {current_revision(engine)}")
    finally:
        engine.dispose()
    return 0


def _print_key(api_key_id: str, key: str) -> None:
    print(f"key_id: {api_key_id}")
    print(f"api_key: {key}")
    print("(the key is shown only this once; store it now)", file=sys.stderr)


def _create_user(args: argparse.Namespace) -> int:
    from app.db import session_scope
    from app.services import users

    with session_scope(_session_factory()) as db_session:
        user = users.create_user(args.name, db_session=db_session)
        api_key, key = users.create_api_key(user.id, db_session=db_session, name=args.key_name)
    print(f"user_id: {user.id}")
    _print_key(api_key.id, key)
    return 0


def _create_key(args: argparse.Namespace) -> int:
    from app.db import session_scope
    from app.services import users

    with session_scope(_session_factory()) as db_session:
        api_key, key = users.create_api_key(args.user_id, db_session=db_session, name=args.name)
    _print_key(api_key.id, key)
    return 0


def _revoke_key(args: argparse.Namespace) -> int:
    from app.db import session_scope
    from app.services import users

    with session_scope(_session_factory()) as db_session:
        api_key = users.revoke_api_key(args.key_id, db_session=db_session)
    print(f"revoked key {api_key.id} (polar_{api_key.prefix}_...) at {api_key.revoked_at}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from app.bench.cli import main as bench_main

    if args.suite != "pervl":
        print(f"error: unknown benchmark {args.suite!r} (known: pervl)", file=sys.stderr)
        return 2
    return bench_main(args.args)


def _add_admin_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    migrate = sub.add_parser("migrate", help="create or upgrade the database schema")
    migrate.set_defaults(func=_migrate)
    create_user = sub.add_parser("create-user", help="create a user; prints its id and a new key")
    create_user.add_argument("name")
    create_user.add_argument("--key-name", default=None, help="label for the key")
    create_user.set_defaults(func=_create_user)
    create_key = sub.add_parser("create-key", help="issue another API key for a user")
    create_key.add_argument("user_id")
    create_key.add_argument("--name", default=None, help="label for the key")
    create_key.set_defaults(func=_create_key)
    revoke_key = sub.add_parser("revoke-key", help="revoke an API key for good")
    revoke_key.add_argument("key_id")
    revoke_key.set_defaults(func=_revoke_key)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polar", description="POLAR personalized image search")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP API (embedded job runner without a broker)")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.set_defaults(func=_serve)
    _add_admin_commands(sub)
    bench = sub.add_parser("bench", help="run a benchmark: `polar bench pervl --help`")
    bench.add_argument("suite", help="pervl")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own flags")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    from app.errors import DomainError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except DomainError as e:
        print(f"error: {e.message} ({e.code})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
