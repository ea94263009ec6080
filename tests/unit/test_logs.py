"""Logging (app/logs.py): one format in every process, job context on job lines."""

from __future__ import annotations

import json
import logging

import pytest

from app.logs import JsonFormatter, QuietPollingFilter, TextFormatter, configure_logging


def record(msg: str = "job %s succeeded", *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("app.services.jobs", logging.INFO, __file__, 1, msg, args or ("j1",),
                            None)  # fmt: skip
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def test_text_lines_carry_the_job_context() -> None:
    line = TextFormatter().format(record(job_id="j1", user_id="u1", duration_s=0.25))
    assert line.endswith(
        "app.services.jobs: job j1 succeeded [job_id=j1 user_id=u1 duration_s=0.25]"
    )
    assert "[" not in TextFormatter().format(record())  # no context, no brackets


def test_json_lines_are_objects_with_the_context() -> None:
    out = json.loads(JsonFormatter().format(record(job_id="j1", kind="train_concept")))
    assert out["message"] == "job j1 succeeded" and out["level"] == "info"
    assert (out["job_id"], out["kind"], out["logger"]) == (
        "j1",
        "train_concept",
        "app.services.jobs",
    )
    assert "user_id" not in out


def access(path: str) -> logging.LogRecord:
    return logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1,
                             '%s - "%s %s HTTP/%s" %d', ("127.0.0.1:5", "GET", path, "1.1", 200),
                             None)  # fmt: skip


def test_probes_and_job_polling_leave_the_access_log_at_info() -> None:
    quiet = QuietPollingFilter()
    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(logging.INFO)
        assert not quiet.filter(access("/healthz"))
        assert not quiet.filter(access("/jobs/abc?x=1"))
        assert quiet.filter(access("/search?q=fido"))
        assert quiet.filter(access("/jobsearch"))  # a prefix of a word is not the route
        root.setLevel(logging.DEBUG)
        assert quiet.filter(access("/healthz"))
    finally:
        root.setLevel(level)


def test_configure_logging_is_idempotent_and_routes_uvicorn_through_it() -> None:
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    try:
        configure_logging("warning", "json")
        configure_logging("debug", "text")
        ours = [h for h in root.handlers if getattr(h, "_polar", False)]
        assert len(ours) == 1 and isinstance(ours[0].formatter, TextFormatter)
        assert root.level == logging.DEBUG
        assert logging.getLogger("uvicorn.access").propagate
    finally:
        for h in list(root.handlers):
            if h not in before:
                root.removeHandler(h)
        root.setLevel(level)


def test_run_job_logs_start_and_end_with_ids_and_duration(
    caplog: pytest.LogCaptureFixture, tmp_path: object
) -> None:
    from pathlib import Path

    from app.config import Settings
    from app.db import make_engine, make_session_factory, migrate, session_scope
    from app.models import JobKind
    from app.services import job_runs, jobs, users
    from app.services.job_runs import JobEnvironment
    from app.storage import ImageStore

    assert isinstance(tmp_path, Path)
    engine = make_engine(f"sqlite:///{(tmp_path / 'l.db').as_posix()}")
    migrate(engine)
    factory = make_session_factory(engine)
    settings = Settings(data_dir=tmp_path, broker_url="")
    kind = JobKind.REBUILD_INDEX.value
    env = JobEnvironment(settings, factory, ImageStore(tmp_path), {kind: lambda _ctx: None},
                         lambda: None)  # type: ignore[arg-type,return-value]  # fmt: skip
    with session_scope(factory) as s:
        uid = users.create_user("alice", db_session=s).id
        job_id = jobs.create_job(db_session=s, user_id=uid, kind=kind, payload={}).id
    with caplog.at_level(logging.INFO, logger="app.services.job_runs"):
        job_runs.run_job(job_id, env)
    lines = [r for r in caplog.records if getattr(r, "job_id", None) == job_id]
    assert [r.getMessage() for r in lines] == [
        f"job {job_id} started ({kind})",
        f"job {job_id} succeeded",
    ]
    assert all(getattr(r, "user_id", None) == uid for r in lines)
    assert getattr(lines[-1], "duration_s", -1) >= 0
    engine.dispose()
