"""Logging for every process (API, worker, CLI): one format, set from POLAR_LOG_LEVEL.

Plain `logging` on purpose: uvicorn, Celery, SQLAlchemy and our own modules all log through the
standard library, so one handler on the root logger gives every line the same shape. Job lines
carry `job_id`, `user_id`, `kind` and `duration_s` as `extra` fields; the text format appends
them as key=value, the JSON format (POLAR_LOG_FORMAT=json) puts them in the object.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

# `extra` fields shown on a line when present, in this order.
CONTEXT_FIELDS = ("job_id", "user_id", "kind", "duration_s")
# Libraries whose INFO lines are one per HTTP call or connection: shown at DEBUG only.
CHATTY_LOGGERS = (
    "httpx",
    "httpx2",
    "httpcore",
    "urllib3",
    "hpack",
    "multipart",
    "PIL",
    "faiss.loader",  # which SIMD build it tried, three times
    "alembic.runtime.plugins",  # one line per autogenerate plugin at every start
)
# Requests that pollers and probes repeat all day: access-logged at DEBUG only.
QUIET_PATHS = ("/healthz", "/readyz", "/metrics", "/jobs")
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def _context(record: logging.LogRecord) -> dict[str, Any]:
    return {k: getattr(record, k) for k in CONTEXT_FIELDS if getattr(record, k, None) is not None}


class TextFormatter(logging.Formatter):
    """The classic line, then the job context as key=value."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = _context(record)
        if not context:
            return line
        head, sep, tail = line.partition("\n")  # keep a traceback below the context
        pairs = " ".join(f"{k}={v}" for k, v in context.items())
        return f"{head} [{pairs}]{sep}{tail}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, context, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_context(record),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class QuietPollingFilter(logging.Filter):
    """Drops uvicorn access lines of health probes and job polling unless DEBUG is on."""

    def filter(self, record: logging.LogRecord) -> bool:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        # uvicorn's access record: (client, method, full path, http version, status)
        path = str(args[2]).split("?", 1)[0] if len(args) >= 3 else ""
        return not any(path == p or path.startswith(p + "/") for p in QUIET_PATHS)


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is at the time of each line (test runners and embedding
    programs swap it; a handler holding the old one would write to a closed file)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Send every logger's lines to stderr in one format; idempotent (replaces our handler)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_polar", False):
            root.removeHandler(handler)
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler._polar = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    # uvicorn and Celery bring their own handlers: let their lines reach ours instead.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    chatty = logging.NOTSET if root.isEnabledFor(logging.DEBUG) else logging.WARNING
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(chatty)
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, QuietPollingFilter) for f in access.filters):
        access.addFilter(QuietPollingFilter())
