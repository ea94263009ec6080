"""Every setting as an environment variable: feeds .env.example and docs/CONFIGURATION.md.

python -m app.settings_doc env > .env.example
python -m app.settings_doc markdown      # the configuration table, on stdout
python -m app.settings_doc docs          # rewrites the table in docs/CONFIGURATION.md in place
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel

from app.config import Settings

# The page that holds the generated table, between these two markers.
TABLE_DOC = Path(__file__).resolve().parents[1] / "docs" / "CONFIGURATION.md"
TABLE_START = "<!-- settings-table:start -->\n"
TABLE_END = "<!-- settings-table:end -->"

# Variables only docker compose reads (documented in .env.example, not Settings fields).
COMPOSE_ONLY_VARS = {
    "API_PORT": ("8000", "host port the API is published on"),
    "POSTGRES_PASSWORD": ("polar", "password of the `polar` PostgreSQL role"),
    "IMAGE_TAG": ("latest", "tag of the built images (the GPU worker adds -cuda)"),
    "TORCH_CUDA_VARIANT": ("cu128", "PyTorch wheel index of the GPU worker image (cu126, ...)"),
    "SETTINGS_ENV_FILE": (".env", "the file of POLAR_ settings the api and worker read (env_file)"),
    "PYTHON_IMAGE": ("python:3.11-slim-bookworm", "base image of the api/worker image"),
    "REDIS_IMAGE": ("redis:7-alpine", "image of the broker"),
    "POSTGRES_IMAGE": ("postgres:16-alpine", "image of the database"),
    "PHOTOS_DIR": (
        "./photos",
        "host folder of your photos, mounted read-only at /photos in the api and worker: "
        "add it (or folders in it) as a library with `polar library add /photos`",
    ),
}
# Settings the compose file sets for the api and worker itself: they name its containers and
# volumes, so they win over the env file.
COMPOSE_WIRED_SETTINGS = (
    "POLAR_DATABASE_URL",
    "POLAR_BROKER_URL",
    "POLAR_DATA_DIR",
    "POLAR_MODEL__CACHE_DIR",
    "POLAR_LIBRARY__ROOTS",
)


def env_value(value: Any) -> str:
    """How a default is written in a .env file."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def settings_env_vars() -> dict[str, tuple[str, str, str]]:
    """Every setting as POLAR_ env name -> (default, description, group), nested with `__`."""
    out: dict[str, tuple[str, str, str]] = {}

    def walk(model: type[BaseModel], prefix: str, group: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name.upper()}__", name)
                continue
            default = field.get_default(call_default_factory=True)
            desc = field.description or ""
            if (
                get_origin(ann) is not None
                and get_args(ann)
                and all(isinstance(a, str) for a in get_args(ann))
            ):
                desc += f" ({' | '.join(get_args(ann))})"
            out[f"{prefix}{name.upper()}"] = (env_value(default), desc, group)

    walk(Settings, "POLAR_", "")
    return out


def _group_title(group: str) -> str:
    doc = (Settings.model_fields[group].annotation.__doc__ or "") if group else ""
    return f"{group}: {doc.strip()}" if group else "general"


def render_env_example() -> str:
    """The text of .env.example."""
    lines = [
        "# POLAR settings, each with its default (commented out). `polar serve`, `polar migrate`",
        "# and the Celery worker read them from the environment or from a .env file in the working",
        "# directory. With docker compose, .env fills the ${...} in docker-compose.yml, and the",
        "# api and worker containers read all of it (env_file) except what the compose file wires:",
        "# " + ", ".join(COMPOSE_WIRED_SETTINGS) + ".",
        "# Nested groups use a double underscore: POLAR_MODEL__NAME=ViT-B-32.",
        "# Regenerate: .venv/bin/python -m app.settings_doc env > .env.example",
    ]
    current: str | None = None
    for name, (default, desc, group) in settings_env_vars().items():
        if group != current:
            current = group
            lines += ["", f"# --- {_group_title(group)}"]
        lines += [f"# {desc}", f"#{name}={default}"]
    lines += ["", "# --- docker compose only (docker-compose.yml, compose.gpu.yml)"]
    for name, (default, desc) in COMPOSE_ONLY_VARS.items():
        lines += [f"# {desc}", f"#{name}={default}"]
    return "\n".join(lines) + "\n"


def render_markdown() -> str:
    """The configuration table of docs/CONFIGURATION.md."""
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for name, (default, desc, _group) in settings_env_vars().items():
        shown = f"`{default}`" if default else "(empty)"
        escaped = desc.replace("|", "\\|")
        rows.append(f"| `{name}` | {shown} | {escaped} |")
    return "\n".join(rows) + "\n"


def table_in(text: str) -> str:
    """The generated table as it stands between the markers of a page."""
    start = text.index(TABLE_START) + len(TABLE_START)
    return text[start : text.index(TABLE_END, start)]


def with_current_table(text: str) -> str:
    """A page's text with the table between its markers regenerated."""
    start = text.index(TABLE_START) + len(TABLE_START)
    return text[:start] + render_markdown() + text[text.index(TABLE_END, start) :]


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "env"
    if which == "docs":
        TABLE_DOC.write_text(with_current_table(TABLE_DOC.read_text()))
    else:
        sys.stdout.write(render_markdown() if which == "markdown" else render_env_example())
