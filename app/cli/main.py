"""`polar` command line: serve, and admin tasks."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from app.config import get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from app.cli.http import Concept, IndexStatus, Job, Library, PolarClient, UploadBatch


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.main import create_app
    from app.runtime.supervisor import Supervisor, reuse_port_supported

    settings = get_settings()
    host, port = args.host or settings.host, args.port or settings.port
    # log_config=None keeps the format main() configured (app/logs.py) for uvicorn too.
    if settings.workers > 1 and reuse_port_supported():
        # One socket per process, so connections spread over them (app/runtime/supervisor.py); each
        # process builds its own app (model, caches, pool) from the environment.
        return Supervisor(host, port, settings.workers, settings.log_level).run()
    if settings.workers > 1:
        # Elsewhere: uvicorn's processes, sharing one socket.
        uvicorn.run(
            "app.main:create_worker_app",
            factory=True,
            workers=settings.workers,
            host=host,
            port=port,
            log_level=settings.log_level,
            log_config=None,
        )
    else:
        uvicorn.run(
            create_app(settings),
            host=host,
            port=port,
            log_level=settings.log_level,
            log_config=None,
        )
    return 0


class NoDatabase(Exception):
    """The admin command would create a new, empty database where none was configured."""


def _sqlite_file(url: str) -> Path | None:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return None if parsed.database == ":memory:" else Path(parsed.database)


def _session_factory(*, create_database: bool = False) -> sessionmaker[Session]:
    """Sessions on the configured database, migrated to the newest schema first.

    Says on stderr which database it is. Refuses (NoDatabase) to start a new SQLite file when
    no database URL was configured and the data folder has none: run from another folder, the
    default `./data/polar.db` would be a new empty database the server never reads, and the
    keys made in it would be "invalid" there. `create_database` allows it.
    """
    from sqlalchemy.engine import make_url

    from app.db import get_engine, get_session_factory, migrate

    settings = get_settings()
    url = settings.database_url
    path = _sqlite_file(url)
    shown = make_url(url).render_as_string(hide_password=True)
    if path is not None:
        shown = f"sqlite:///{path.resolve()}"
        if not path.exists():
            if not settings.database_url_configured and not create_database:
                raise NoDatabase(
                    f"no database at {path.resolve()}: POLAR_DATABASE_URL is not set and the "
                    f"data folder (POLAR_DATA_DIR={settings.data_dir}) has none. Run this where "
                    "the server runs, or set POLAR_DATABASE_URL / POLAR_DATA_DIR to the server's; "
                    "pass --create-database to start a new database here."
                )
            print(f"creating a new database: {shown}", file=sys.stderr)
    print(f"database: {shown}", file=sys.stderr)
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

    with session_scope(_session_factory(create_database=args.create_database)) as db_session:
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


# -- client commands: talk to a running service over HTTP (app/cli/http.py) -------------------


def _make_client(url: str, key: str) -> PolarClient:
    from app.cli.http import PolarClient

    return PolarClient(url, key)


# Builds the HTTP client of the client commands; tests swap it for one over their in-process app.
client_factory: Callable[[str, str], PolarClient] = _make_client


class _CliFailure(Exception):
    """A client command cannot go on: print the message, exit with the code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _client_command(
    run: Callable[[PolarClient, argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """Wrap a client command: the key check, the client's lifetime, one-line errors."""

    def command(args: argparse.Namespace) -> int:
        import httpx

        from app.cli.http import PolarAPIError

        if not args.key:
            print(
                "error: no API key: pass --key or set POLAR_API_KEY (an admin makes a user and "
                "its key with `polar create-user NAME`, another key with `polar create-key`)",
                file=sys.stderr,
            )
            return 2
        try:
            with client_factory(args.url, args.key) as client:
                return run(client, args)
        except PolarAPIError as e:
            hint = "; check --key or POLAR_API_KEY" if e.status == 401 else ""
            print(f"error: {e.message} ({e.code}){hint}", file=sys.stderr)
        except httpx.TransportError as e:
            print(
                f"error: cannot reach {args.url}: {e} (is `polar serve` running?)", file=sys.stderr
            )
        except (OSError, TimeoutError) as e:
            print(f"error: {e}", file=sys.stderr)
        except _CliFailure as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        return 1

    return command


def _wait(client: PolarClient, job_id: str, label: str, timeout: float | None) -> Job:
    from app.cli.progress import JobProgress

    with JobProgress(label) as progress:
        return client.wait_job(job_id, progress, timeout=timeout)


def _print_batch(batch: UploadBatch, total_files: int, sent: list[int]) -> None:
    sent[0] += len(batch.images) + len(batch.rejected)
    new = sum(not i.duplicate for i in batch.images)
    job = f"; job {batch.job.id}" if batch.job is not None else ""
    print(
        f"batch {batch.number} ({sent[0]}/{total_files} files): {new} new, "
        f"{len(batch.images) - new} duplicate(s), {len(batch.rejected)} rejected{job}"
    )
    for image in batch.images:
        if image.duplicate:
            print(f"  duplicate: {image.path} (image {image.id})")
    for r in batch.rejected:
        print(f"  rejected: {r.path}: {r.message} ({r.code})")


def _collect(paths: list[str], *, recursive: bool) -> tuple[list[Path], list[Path]]:
    """Image files under `paths`; lists what it skips."""
    from app.cli.http import collect_images

    images, skipped = collect_images([Path(p) for p in paths], recursive=recursive)
    for path in skipped:
        why = "a folder (use --recursive)" if path.is_dir() else "not an image file"
        print(f"skipped: {path}: {why}")
    return images, skipped


def _upload(client: PolarClient, args: argparse.Namespace) -> int:
    from app.cli.http import IMAGE_SUFFIXES

    images, skipped = _collect(args.paths, recursive=args.recursive)
    if not images:
        raise _CliFailure(f"no image files to upload ({', '.join(sorted(IMAGE_SUFFIXES))})")
    print(f"uploading {len(images)} image file(s) to {args.url}")
    sent = [0]
    result = client.upload_images(
        images,
        args.batch_size,
        skip_rejected=True,
        on_batch=lambda batch: _print_batch(batch, len(images), sent),
    )
    new = sum(not i.duplicate for i in result.images)
    print(
        f"done: {new} new, {len(result.images) - new} duplicate(s), {len(skipped)} skipped, "
        f"{len(result.rejected)} rejected"
    )
    failed = 0
    if args.wait:
        job_ids = result.job_ids
        for n, job_id in enumerate(job_ids, 1):
            job = _wait(client, job_id, f"embedding (job {n}/{len(job_ids)})", args.timeout)
            if job.state == "failed":
                failed += 1
                print(f"embedding job {job.id} failed: {job.error_message} ({job.error_code})")
        if not failed:
            print(f"embedded: {len(result.images)} image(s) searchable")
    return 1 if result.rejected or failed else 0


def _concept_create(client: PolarClient, args: argparse.Namespace) -> int:
    photos, _ = _collect(args.photos, recursive=False)
    concept, job = client.create_concept(args.name, args.category, photos)
    print(
        f"concept {concept.name} ({concept.id}): {concept.state}, version {concept.version}, "
        f"{concept.example_count} photo(s)"
    )
    return _follow_training(client, concept, job, args)


def _follow_training(
    client: PolarClient, concept: Concept, job: Job | None, args: argparse.Namespace
) -> int:
    """Wait for a concept's training (unless --no-wait) and say in words how it went."""
    if job is None or args.no_wait:
        if job is not None:
            print(f"training job: {job.id} (`polar concept show {concept.name}` says when ready)")
        return 0
    _wait(client, job.id, f"training {concept.name}", args.timeout)
    concept = client.get_concept(concept.id)
    _describe(concept, verbose=args.verbose)
    if concept.state != "ready":
        error = (concept.metrics or {}).get("error")
        detail = f": {error['message']} ({error['code']})" if isinstance(error, dict) else ""
        raise _CliFailure(f"training {concept.name} failed{detail}")
    return 0


def _quality_words(concept: Concept) -> list[str]:
    """How a trained concept does, in words a person reads (not the raw metrics)."""
    lines = []
    metrics = concept.metrics or {}
    seconds = metrics.get("train_seconds")
    if concept.state == "ready" and isinstance(seconds, int | float):
        lines.append(f"learned in {seconds:.1f} s from {concept.example_count} photo(s)")
    score = concept.retention_score
    if score is not None:
        kept = min(100, round(100 * score))
        if concept.retention_flagged:
            lines.append(
                f"warning: searches that name it lose some general search quality (they keep "
                f"about {kept}%); photos that show it from more sides, or a category, may help"
            )
        else:
            lines.append(
                f"searches that name it keep {kept}% of general search quality; "
                "searches that do not name it are unchanged"
            )
    separation = metrics.get("separation")
    if isinstance(separation, dict) and isinstance(separation.get("checked"), int):
        lines.append(_separation_words(separation["checked"], separation.get("lookalikes", 0)))
    return lines


def _separation_words(checked: int, lookalikes: int) -> str:
    """How the concept's own photos ranked against the rest of the library when it was trained,
    in words. A photo that ranks as high may be one of it that was not taught, or a look-alike:
    the words never claim which."""
    if checked == 0:
        return "no other library photos to compare it with yet"
    others = f"{checked} other library photo{'' if checked == 1 else 's'}"
    if lookalikes == 0:
        return (
            f"its searches rank the photos it was taught from above all {others} checked "
            "(other photos of it included)"
        )
    verb = "ranks" if lookalikes == 1 else "rank"
    return (
        f"{lookalikes} of the {others} checked {verb} as high as the photos it was taught "
        "from, so its searches find them too: photos of it, or look-alikes (if they are "
        "not it, more photos of it from other sides help)"
    )


def _describe(concept: Concept, *, verbose: bool = False) -> None:
    state = {
        "ready": f'ready: search for "{concept.name} on the beach" and the like',
        "training": "training (a few seconds)",
        "failed": "training failed",
    }.get(concept.state, concept.state)
    print(f"{concept.name}: {state}")
    category = f", category {concept.category}" if concept.category else ", no category"
    print(f"  version {concept.version}, {concept.example_count} photo(s){category}")
    for line in _quality_words(concept):
        print(f"  {line}")
    if verbose:
        print(f"  id: {concept.id}")
        print(f"  placeholder (what queries naming it encode): {concept.placeholder!r}")
        for name, value in (concept.metrics or {}).items():
            shown = f"{value:.4g}" if isinstance(value, float) else value
            print(f"  {name}: {shown}")
        if concept.retention_score is not None:
            print(f"  retention_score: {concept.retention_score:.3f}")


def _find_concept(client: PolarClient, ref: str) -> Concept:
    """A concept by its name (caseless, as queries match it) or its id."""
    from app.text import fold

    concepts = client.list_concepts()
    for concept in concepts:
        if concept.id == ref:
            return concept
    wanted = fold(ref.strip())
    for concept in concepts:
        if fold(concept.name) == wanted:
            return concept
    known = ", ".join(c.name for c in concepts) or "none yet"
    raise _CliFailure(f"no concept named {ref!r} (yours: {known})")


def _concept_list(client: PolarClient, _args: argparse.Namespace) -> int:
    concepts = client.list_concepts()
    if not concepts:
        print("no concepts yet: `polar concept create NAME PHOTO...` teaches one")
        return 0
    width = max(len(c.name) for c in concepts)
    print(f"{'name':<{width}}  {'state':<8}  {'version':>7}  {'photos':>6}  category")
    for c in concepts:
        flag = "  (costs some general search quality)" if c.retention_flagged else ""
        print(
            f"{c.name:<{width}}  {c.state:<8}  {c.version:>7}  {c.example_count:>6}  "
            f"{c.category or '-'}{flag}"
        )
    return 0


def _concept_show(client: PolarClient, args: argparse.Namespace) -> int:
    concept = _find_concept(client, args.concept)
    _describe(concept, verbose=args.verbose)
    photos = client.concept_photos(concept.id)
    print(f"  photos ({len(photos)}):")
    for p in photos:
        print(f"    {client.base_url}{p.file_url}  ({p.width}x{p.height}, v{p.version_added})")
    return 0


def _concept_rename(client: PolarClient, args: argparse.Namespace) -> int:
    concept = _find_concept(client, args.concept)
    renamed, _ = client.update_concept(concept.id, name=args.new_name)
    print(f"renamed {concept.name} to {renamed.name} (nothing retrains)")
    return 0


def _concept_category(client: PolarClient, args: argparse.Namespace) -> int:
    concept = _find_concept(client, args.concept)
    category = None if args.none else args.category
    if category is None and not args.none:
        raise _CliFailure("give a CATEGORY, or --none to drop it", exit_code=2)
    changed, job = client.update_concept(concept.id, category=category)
    if job is None:
        print(f"{changed.name}: the category is already {changed.category or 'none'}")
        return 0
    print(
        f"{changed.name}: category {changed.category or 'none'}; retraining as version "
        f"{changed.version}"
    )
    return _follow_training(client, changed, job, args)


def _concept_add(client: PolarClient, args: argparse.Namespace) -> int:
    concept = _find_concept(client, args.concept)
    photos, _ = _collect(args.photos, recursive=False) if args.photos else ([], [])
    if not photos and not args.image_id:
        raise _CliFailure("no photos to add: give image files or --image-id", exit_code=2)
    changed, job = client.add_concept_photos(concept.id, photos, args.image_id)
    print(
        f"{changed.name}: {changed.example_count} photo(s) now; retraining as version "
        f"{changed.version}"
    )
    return _follow_training(client, changed, job, args)


def _concept_photos(client: PolarClient, args: argparse.Namespace) -> int:
    """Every photo of the concept: its album, with the confidence in words."""
    from app.cli.http import confidence_words

    concept = _find_concept(client, args.concept)
    head, photos = client.concept_album(concept.id, order=args.order, limit=args.limit)
    for warning in head.get("warnings") or []:
        print(f"note: {warning}")
    total = head.get("total", len(photos))
    shown = f" (the first {len(photos)})" if len(photos) < total else ""
    print(f"{concept.name}: {total} photo(s){shown}")
    why = {"taught": "taught from", "confirmed": "you said it is", "matched": ""}
    for p in photos:
        words = confidence_words(p.confidence, float(head.get("cutoff", 0.5)))
        reason = why.get(p.reason, p.reason)
        where = p.path or p.filename or f"{client.base_url}{p.file_url}"
        detail = f"{words}; {reason}" if reason else words
        print(f"  {p.image_id}  {where}  ({detail})")
    if photos:
        print(
            f"wrong one? `polar concept mark {concept.name} ID --not`; "
            f"`polar concept unmark {concept.name} ID` takes a mark back"
        )
    return 0


def _concept_mark(client: PolarClient, args: argparse.Namespace) -> int:
    """Mark photos "this is it" or "not it"; the concept retrains once with all the marks."""
    concept = _find_concept(client, args.concept)
    verdict = "rejected" if args.no else "confirmed"
    job = None
    changed = concept
    for image_id in args.image_ids:
        changed, new_job = client.set_verdict(concept.id, image_id, verdict)
        job = new_job or job
        said = f"not {concept.name}" if args.no else f"{concept.name}"
        print(f"{image_id}: {said}")
    if job is None:
        return 0
    print(f"{changed.name}: retraining as version {changed.version}")
    return _follow_training(client, changed, job, args)


def _concept_unmark(client: PolarClient, args: argparse.Namespace) -> int:
    concept = _find_concept(client, args.concept)
    changed, job = concept, None
    for image_id in args.image_ids:
        changed, new_job = client.undo_verdict(concept.id, image_id)
        job = new_job or job
        print(f"{image_id}: mark taken back")
    if job is None:
        return 0
    print(f"{changed.name}: retraining as version {changed.version}")
    return _follow_training(client, changed, job, args)


def _concept_delete(client: PolarClient, args: argparse.Namespace) -> int:
    concept = _find_concept(client, args.concept)
    if not args.yes:
        if not sys.stdin.isatty():
            raise _CliFailure(
                f"not deleting {concept.name} without --yes (no terminal to ask on)", exit_code=2
            )
        answer = input(f"delete {concept.name} and its {concept.example_count} photo(s)? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("kept")
            return 1
    client.delete_concept(concept.id)
    print(f"deleted {concept.name}")
    return 0


def _search(client: PolarClient, args: argparse.Namespace) -> int:
    result = client.search(args.query, args.k, personalize=not args.plain)
    if result.demo_model:
        print(
            "note: the small synthetic demo model is serving (no real CLIP could be loaded): it "
            "finds only the demo's generated pictures, not real photos. Point "
            "POLAR_MODEL__PRETRAINED at real weights.",
            file=sys.stderr,
        )
    print(f"query: {result.query}")
    print(f"rewritten: {result.rewritten}")
    if result.concepts:
        names = [
            f"{c.name} (v{c.version}, {'applied' if c.applied else 'not applied'})"
            for c in result.concepts
        ]
        print("concepts: " + ", ".join(names))
    else:
        print("concepts: none" + (" (--plain)" if args.plain else ""))
    for warning in result.warnings:
        print(f"warning: {warning}")
    if result.hits:
        width = max(len(h.filename or "-") for h in result.hits)
        print(f"{'rank':>4}  {'score':>5}  {'filename':<{width}}  id / file")
        for h in result.hits:
            print(f"{h.rank:>4}  {h.score:>5.3f}  {h.filename or '-':<{width}}  {h.image_id}")
            # A folder's photo: its file on the server. An upload: its URL (send the API key).
            where = h.path or f"{client.base_url}{h.file_url}"
            print(f"{'':>4}  {'':>5}  {'':<{width}}  {where}")
    else:
        print("no results")
    print(f"({result.indexed} image(s) indexed, {result.pending} pending)")
    return 0


def _print_library(library: Library) -> None:
    print(f"{library.id}  {library.path}")
    if library.watch_error:
        print(f"  not watched: {library.watch_error}")
    rep = library.report
    if rep is None:
        print("  not scanned yet")
        return
    counts = ", ".join(
        f"{rep.get(k, 0)} {k}" for k in ("added", "changed", "moved", "unchanged", "removed")
    )
    failed = rep.get("failed_count", 0)
    unreadable = f"; {failed} not searchable (unreadable)" if failed else ""
    print(f"  last scan: {counts}; {rep.get('skipped_count', 0)} skipped{unreadable}")
    for s in rep.get("skipped", [])[:20]:
        print(f"    skipped {s.get('path')}: {s.get('reason')}")
    for s in rep.get("failed", [])[:20]:
        print(f"    not searchable {s.get('path')}: {s.get('reason')}")
    if rep.get("not_pruned"):
        print(f"  nothing removed: {rep['not_pruned']}")


def _find_library(client: PolarClient, ref: str) -> Library:
    """A library by id or by its path as given when it was added."""
    for library in client.list_libraries():
        if ref in (library.id, library.path) or os.path.abspath(ref) == library.path:
            return library
    raise _CliFailure(f"no library {ref!r}; `polar library list` shows yours")


def _library(client: PolarClient, args: argparse.Namespace) -> int:
    if args.action == "list":
        libraries = client.list_libraries()
        for library in libraries:
            _print_library(library)
        if not libraries:
            print("no libraries yet: `polar library add /path/on/the/server`")
        return 0
    if args.target is None:
        raise _CliFailure(f"`polar library {args.action}` needs a folder (add) or a library")
    if args.action == "add":
        # The path is the server's: it reads the folder in place, under its allowed roots.
        library = client.add_library(os.path.abspath(args.target) if args.local else args.target)
        job = library.job
    else:
        library = _find_library(client, args.target)
        if args.action == "remove":
            client.remove_library(library.id)
            print(f"removed {library.path} from your libraries (its files are untouched)")
            return 0
        job = client.scan_library(library.id)
    print(f"{library.path}: scan job {job.id if job else '-'}")
    if job is None or args.no_wait:
        return 0
    job = _wait(client, job.id, "scanning", args.timeout)
    _print_library(client.get_library(library.id))
    if job.state != "succeeded":
        detail = f": {job.error_message} ({job.error_code})" if job.error_code else ""
        raise _CliFailure(f"the scan failed{detail}")
    return 0


def _print_index(status: IndexStatus) -> None:
    print(f"model: {status.model}")
    failed = f", {status.failed} unreadable" if status.failed else ""
    print(
        f"images: {status.images} ({status.embedded} searchable, {status.pending} pending{failed})"
    )
    if status.region_layout != "none":
        print(f"regions ({status.region_layout}): {status.with_regions} of {status.embedded}")


def _index(client: PolarClient, args: argparse.Namespace) -> int:
    status = client.index_status()
    _print_index(status)
    if not args.rebuild:
        if status.rebuild_job is not None:
            print(f"rebuild job: {status.rebuild_job.id} ({status.rebuild_job.state})")
        return 0
    job, created = client.rebuild_index()
    print(f"rebuild job: {job.id} ({'queued' if created else 'already ' + job.state})")
    if args.no_wait:
        return 0
    job = _wait(client, job.id, "rebuilding", args.timeout)
    if job.state != "succeeded":
        detail = f": {job.error_message} ({job.error_code})" if job.error_code else ""
        raise _CliFailure(f"the rebuild failed{detail}")
    _print_index(client.index_status())
    return 0


def _add_client_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument(
        "--url",
        default=os.environ.get("POLAR_URL", "http://127.0.0.1:8000"),
        help="the service (env POLAR_URL; default http://127.0.0.1:8000)",
    )
    conn.add_argument(
        "--key", default=os.environ.get("POLAR_API_KEY"), help="API key (env POLAR_API_KEY)"
    )
    conn.add_argument(
        "--timeout", type=float, default=None, help="seconds to wait for a job (default: forever)"
    )
    upload = sub.add_parser(
        "upload", parents=[conn], help="upload image files and folders to your library"
    )
    upload.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders")
    upload.add_argument("-r", "--recursive", action="store_true", help="descend into sub-folders")
    upload.add_argument("--wait", action="store_true", help="wait until they are searchable")
    upload.add_argument("--batch-size", type=int, default=50, help="files per request")
    upload.set_defaults(func=_client_command(_upload))
    concept = sub.add_parser(
        "concept",
        help="your concepts: create, list, show, rename, category, add, photos, mark, unmark, "
        "delete",
    )
    concept_sub = concept.add_subparsers(dest="concept_command", required=True)
    training = argparse.ArgumentParser(add_help=False)
    training.add_argument("--no-wait", action="store_true", help="return once training is queued")
    training.add_argument(
        "-v", "--verbose", action="store_true", help="also the raw training numbers"
    )
    ref_help = "the concept's name (any case) or id"
    create = concept_sub.add_parser(
        "create",
        parents=[conn, training],
        help="teach a concept from 3-13 photos; waits for training",
    )
    create.add_argument("name", help="what queries call it, e.g. Fido")
    create.add_argument("--category", default=None, help='coarse class, e.g. "dog"')
    create.add_argument("photos", nargs="+", metavar="PHOTO", help="photos (or a folder of them)")
    create.set_defaults(func=_client_command(_concept_create))
    listing = concept_sub.add_parser("list", parents=[conn], help="your concepts")
    listing.set_defaults(func=_client_command(_concept_list))
    show = concept_sub.add_parser(
        "show", parents=[conn], help="one concept: ready or not, how it does, its photos"
    )
    show.add_argument("concept", help=ref_help)
    show.add_argument("-v", "--verbose", action="store_true", help="also the raw training numbers")
    show.set_defaults(func=_client_command(_concept_show))
    rename = concept_sub.add_parser(
        "rename", parents=[conn], help="give a concept a new name (nothing retrains)"
    )
    rename.add_argument("concept", help=ref_help)
    rename.add_argument("new_name", help="the new name")
    rename.set_defaults(func=_client_command(_concept_rename))
    category = concept_sub.add_parser(
        "category", parents=[conn, training], help="change a concept's category (retrains)"
    )
    category.add_argument("concept", help=ref_help)
    category.add_argument("category", nargs="?", default=None, help='e.g. "dog"')
    category.add_argument("--none", action="store_true", help="drop the category")
    category.set_defaults(func=_client_command(_concept_category))
    add = concept_sub.add_parser(
        "add", parents=[conn, training], help="teach a concept from more photos (retrains)"
    )
    add.add_argument("concept", help=ref_help)
    add.add_argument("photos", nargs="*", metavar="PHOTO", help="photos (or a folder of them)")
    add.add_argument(
        "--image-id",
        action="append",
        default=[],
        metavar="ID",
        help="an image already in your library (repeatable)",
    )
    add.set_defaults(func=_client_command(_concept_add))
    photos_cmd = concept_sub.add_parser(
        "photos", parents=[conn], help="every photo of a concept in your library (its album)"
    )
    photos_cmd.add_argument("concept", help=ref_help)
    photos_cmd.add_argument(
        "--order",
        choices=("newest", "confidence"),
        default="newest",
        help="newest first, or surest",
    )
    photos_cmd.add_argument("--limit", type=int, default=None, help="at most this many")
    photos_cmd.set_defaults(func=_client_command(_concept_photos))
    mark_cmd = concept_sub.add_parser(
        "mark",
        parents=[conn, training],
        help='mark library photos "this is it" (or --not); the concept learns from it',
    )
    mark_cmd.add_argument("concept", help=ref_help)
    mark_cmd.add_argument("image_ids", nargs="+", metavar="IMAGE_ID", help="library image ids")
    mark_cmd.add_argument("--not", dest="no", action="store_true", help='"not it": a negative')
    mark_cmd.set_defaults(func=_client_command(_concept_mark))
    unmark = concept_sub.add_parser(
        "unmark", parents=[conn, training], help="take marks back; the concept learns without them"
    )
    unmark.add_argument("concept", help=ref_help)
    unmark.add_argument("image_ids", nargs="+", metavar="IMAGE_ID", help="library image ids")
    unmark.set_defaults(func=_client_command(_concept_unmark))
    delete = concept_sub.add_parser(
        "delete", parents=[conn], help="delete a concept and its photos (asks first)"
    )
    delete.add_argument("concept", help=ref_help)
    delete.add_argument("-y", "--yes", action="store_true", help="do not ask")
    delete.set_defaults(func=_client_command(_concept_delete))
    index = sub.add_parser(
        "index", parents=[conn], help="what the serving model can search; --rebuild to re-embed"
    )
    index.add_argument(
        "--rebuild",
        action="store_true",
        help="embed every image the serving model or region layout has not covered; waits",
    )
    index.add_argument("--no-wait", action="store_true", help="return once the rebuild is queued")
    index.set_defaults(func=_client_command(_index))
    library = sub.add_parser(
        "library",
        parents=[conn],
        help="folders on the server indexed in place: add PATH | list | scan LIB | remove LIB",
    )
    library.add_argument("action", choices=["add", "list", "scan", "remove"])
    library.add_argument(
        "target", nargs="?", default=None, help="add: a folder on the server; scan/remove: id/path"
    )
    library.add_argument(
        "--local",
        action="store_true",
        help="add: make a relative PATH absolute here (when client and server share the disk)",
    )
    library.add_argument("--no-wait", action="store_true", help="return once the scan is queued")
    library.set_defaults(func=_client_command(_library))
    search = sub.add_parser("search", parents=[conn], help="search your library")
    search.add_argument("query", help='e.g. "Fido at the beach"')
    search.add_argument("-k", type=int, default=20, help="number of hits")
    search.add_argument("--plain", action="store_true", help="plain CLIP: apply no concepts")
    search.set_defaults(func=_client_command(_search))


def _add_admin_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    migrate = sub.add_parser("migrate", help="create or upgrade the database schema")
    migrate.set_defaults(func=_migrate)
    create_user = sub.add_parser("create-user", help="create a user; prints its id and a new key")
    create_user.add_argument("name")
    create_user.add_argument("--key-name", default=None, help="label for the key")
    create_user.add_argument(
        "--create-database",
        action="store_true",
        help="allow starting a new SQLite database when none is configured or found",
    )
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
    _add_client_commands(sub)
    bench = sub.add_parser("bench", help="run a benchmark: `polar bench pervl --help`")
    bench.add_argument("suite", help="pervl")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own flags")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    from app.errors import DomainError
    from app.logs import configure_logging

    args = build_parser().parse_args(argv)
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    try:
        return int(args.func(args))
    except DomainError as e:
        print(f"error: {e.message} ({e.code})", file=sys.stderr)
        return 1
    except NoDatabase as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
