"""`make compose-smoke`: the Docker stack built and run for real, as a new user would (issue 14).

1. images: the official python, redis and postgres images, or, where Docker Hub cannot be reached,
   local stand-ins built from Debian's packages (scripts/standins/; needs root and debootstrap);
2. torch from PyTorch's CPU index where it answers, else from PyPI (CUDA wheels, a bigger image);
3. builds the image and starts api + worker + redis + postgres with scripts/compose.smoke.yml
   (host networking, loopback ports 58000 / 55432 / 56379, the bundled demo model), and waits
   until every healthcheck says healthy;
4. creates a user with `docker-compose exec api polar create-user`, adds the photos folder
   (PHOTOS_DIR, mounted read-only at /photos) as a library that the worker scans in place,
   registers "Fido" and waits until the Celery worker in its container has trained it, then asks
   the API whether "Fido on the beach" ranks Fido on the beach first;
5. takes the stack down (keeping its volumes), starts it again and checks that nothing was lost:
   the same images, the concept, the same search result;
6. `down -v` (and its images too with --rmi). The last line printed is the verdict.

Needs a Docker engine and docker-compose (v1, or the `docker compose` plugin); run from the
repository root with the project's virtual environment (it renders the demo world's images).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.demo.run_demo import (  # noqa: E402 - the repository root is put on the path first
    FIDO_CATEGORY,
    FIDO_INDEX,
    build_library,
    concept_photos,
)
from app.demo.world import World  # noqa: E402
from app.ml.model import DEMO_MODEL_NAME  # noqa: E402

PROJECT = "polar-smoke"
OVERRIDE = ROOT / "scripts" / "compose.smoke.yml"
STANDINS = ROOT / "scripts" / "standins"
API = "http://127.0.0.1:58000"  # scripts/compose.smoke.yml
IMAGE_TAG = "smoke"
SERVICES = ("postgres", "redis", "api", "worker")
# The demo checkpoint inside the image (the code is installed at /app).
DEMO_CHECKPOINT = f"/app/app/ml/assets/{DEMO_MODEL_NAME}/weights.safetensors"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PYPI_INDEX = "https://pypi.org/simple"
# Official image -> (stand-in tag, its Dockerfile under scripts/standins/).
OFFICIAL = {
    "PYTHON_IMAGE": ("python:3.11-slim-bookworm", "polar-standin/python:3.11-bookworm", "python"),
    "REDIS_IMAGE": ("redis:7-alpine", "polar-standin/redis:7-bookworm", "redis"),
    "POSTGRES_IMAGE": ("postgres:16-alpine", "polar-standin/postgres:15-bookworm", "postgres"),
}
STANDIN_BASE = "polar-standin/debian:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


class SmokeFailed(RuntimeError):
    """A step of the smoke test went wrong; the message says which and why."""


def step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def sh(
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 3600,
    capture: bool = False,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Runs a command, echoing it; its output goes to ours unless captured."""
    print("$ " + " ".join(args), flush=True)
    proc = subprocess.run(
        list(args),
        env=env,
        timeout=timeout,
        check=False,
        text=True,
        capture_output=capture,
    )
    if check and proc.returncode != 0:
        detail = f"\n{proc.stdout}{proc.stderr}" if capture else ""
        raise SmokeFailed(f"`{' '.join(args[:4])} ...` exited {proc.returncode}{detail}")
    return proc


def quiet(args: Sequence[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)


# --- 1. images -------------------------------------------------------------------------------


def ensure_docker() -> None:
    """A Docker engine to talk to. On a fresh Debian machine (root): install Debian's docker.io,
    docker-compose and debootstrap, and start dockerd without bridge networks (the stack runs on
    host networking), as docs/DEPLOYMENT.md describes."""
    if quiet(["docker", "info"]).returncode == 0:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SmokeFailed("no Docker engine answers (`docker info`); start one and retry")
    needed = {
        "docker.io": "dockerd",
        "docker-compose": "docker-compose",
        "debootstrap": "debootstrap",
    }
    missing = [pkg for pkg, exe in needed.items() if shutil.which(exe) is None]
    if missing:
        step(f"0. installing {', '.join(missing)} with apt-get")
        sh(["apt-get", "update", "-qq"])
        sh(["apt-get", "install", "-y", "-qq", *missing], env={**os.environ,
           "DEBIAN_FRONTEND": "noninteractive"})  # fmt: skip
    step("0. starting dockerd (no bridge networks; log in /tmp/polar-dockerd.log)")
    with open("/tmp/polar-dockerd.log", "ab") as log:
        subprocess.Popen(
            ["dockerd", "--bridge=none", "--iptables=false", "--ip-masq=false"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while quiet(["docker", "info"]).returncode != 0:
        if time.monotonic() > deadline:
            raise SmokeFailed("dockerd did not answer within 60 s (see /tmp/polar-dockerd.log)")
        time.sleep(1)


def image_exists(name: str) -> bool:
    return quiet(["docker", "image", "inspect", name]).returncode == 0


def can_pull(name: str, timeout: float) -> bool:
    if image_exists(name):
        return True
    print(f"pulling {name} (at most {timeout:.0f} s)", flush=True)
    try:
        return quiet(["docker", "pull", name], timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def build_standin_base() -> None:
    """A minimal Debian bookworm as an image, from Debian's mirror (debootstrap)."""
    if image_exists(STANDIN_BASE):
        return
    if shutil.which("debootstrap") is None or os.geteuid() != 0:
        raise SmokeFailed(
            "Docker Hub cannot be reached and the stand-ins need root and debootstrap "
            "(apt-get install -y debootstrap)"
        )
    with tempfile.TemporaryDirectory(prefix="polar-standin-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        sh(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), DEBIAN_MIRROR])
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imp = subprocess.run(["docker", "import", "-", STANDIN_BASE], stdin=tar.stdout, check=False)
        tar.wait()
        if imp.returncode != 0 or tar.returncode != 0:
            raise SmokeFailed("docker import of the debootstrap'ed Debian failed")


def build_standin(tag: str, which: str, env: dict[str, str]) -> None:
    if image_exists(tag):
        return
    build_standin_base()
    with tempfile.TemporaryDirectory(prefix="polar-standin-ctx-") as tmp:
        ctx = Path(tmp)
        for f in STANDINS.iterdir():
            shutil.copy2(f, ctx / f.name)
        # The host's trust store: pip inside the build must trust what the host trusts.
        shutil.copy2(HOST_CA_BUNDLE, ctx / "ca-certificates.crt")
        sh(
            [
                "docker", "build", "--network", "host", "--build-arg",
                f"STANDIN_BASE={STANDIN_BASE}", "-f", str(ctx / f"{which}.Dockerfile"),
                "-t", tag, str(ctx),
            ],
            env=env,
        )  # fmt: skip


def choose_images(args: argparse.Namespace, env: dict[str, str]) -> dict[str, str]:
    """Each image variable -> the official image if it can be had, else its local stand-in."""
    chosen = {}
    for var, (official, standin, which) in OFFICIAL.items():
        if not args.standins and can_pull(official, args.pull_timeout):
            chosen[var] = official
        else:
            build_standin(standin, which, env)
            chosen[var] = standin
        print(f"{var}={chosen[var]}")
    return chosen


# --- 2. where torch comes from ---------------------------------------------------------------


def torch_index(forced: str | None) -> str:
    """PyTorch's CPU index where it answers (small image), else PyPI (CUDA wheels)."""
    if forced:
        return forced
    try:
        httpx.head(f"{CPU_INDEX}/torch/", timeout=10, follow_redirects=True).raise_for_status()
        return CPU_INDEX
    except httpx.HTTPError as exc:
        print(f"PyTorch's CPU index does not answer ({type(exc).__name__}): torch from PyPI")
        return PYPI_INDEX


# --- 3. the stack ----------------------------------------------------------------------------


class Stack:
    """docker-compose on the project's files plus the smoke override, with its own env files."""

    def __init__(self, workdir: Path, images: dict[str, str], index: str, photos: Path) -> None:
        settings = workdir / "settings.env"  # what the api and worker read (env_file)
        settings.write_text(
            "\n".join(
                [
                    f"POLAR_MODEL__NAME={DEMO_MODEL_NAME}",
                    f"POLAR_MODEL__PRETRAINED={DEMO_CHECKPOINT}",
                    "POLAR_MODEL__THREADS=1",  # api and worker share two cores politely
                    "POLAR_SEARCH__REGIONS=none",
                    "POLAR_LOG_LEVEL=info",
                    "HF_HUB_OFFLINE=1",
                    "",
                ]
            )
        )
        interpolation = workdir / "compose.env"  # what fills the ${...} of the compose files
        values = {
            **images,
            "IMAGE_TAG": IMAGE_TAG,
            "POSTGRES_PASSWORD": "smoke",
            "SETTINGS_ENV_FILE": str(settings),
            "TORCH_INDEX_URL": index,
            "PHOTOS_DIR": str(photos),  # mounted read-only at /photos in the api and worker
        }
        interpolation.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        exe = shutil.which("docker-compose")
        self.base = [exe] if exe else ["docker", "compose"]
        self.base += ["-p", PROJECT, "--project-directory", str(ROOT)]
        # Nothing from the caller's shell leaks into the compose files; the classic builder,
        # which every engine has (BuildKit would want the buildx plugin for `network: host`).
        keep = {"PATH", "HOME", "LANG", "DOCKER_HOST", "DOCKER_CONFIG"}
        self.env = {k: v for k, v in os.environ.items() if k in keep}
        self.env |= {"DOCKER_BUILDKIT": "0", "COMPOSE_DOCKER_CLI_BUILD": "0"}
        # The project's files with the override, as docker-compose merges them, less the port
        # mappings: a host-network container publishes nothing, and an override cannot remove
        # a list entry of the file it overrides.
        merged = self(
            "--env-file", str(interpolation), "-f", str(ROOT / "docker-compose.yml"),
            "-f", str(OVERRIDE), "config", capture=True,
        ).stdout  # fmt: skip
        config = yaml.safe_load(merged)
        for service in config["services"].values():
            if service.get("network_mode") == "host":
                service.pop("ports", None)
        resolved = workdir / "compose.resolved.yml"
        resolved.write_text(yaml.safe_dump(config, sort_keys=False))
        self.base += ["-f", str(resolved)]

    def __call__(
        self, *args: str, capture: bool = False, check: bool = True, timeout: float = 3600
    ) -> subprocess.CompletedProcess[str]:
        return sh([*self.base, *args], env=self.env, capture=capture, check=check, timeout=timeout)

    def container(self, service: str) -> str:
        cid = self("ps", "-q", service, capture=True).stdout.strip()
        if not cid:
            raise SmokeFailed(f"no container for {service}")
        return cid

    @staticmethod
    def health(container: str) -> str:
        out = quiet(["docker", "inspect", "--format", "{{.State.Health.Status}}", container])
        return out.stdout.strip() or "unknown"

    def wait_healthy(self, start: float, timeout: float) -> dict[str, float]:
        """Seconds from `start` (monotonic) until each service's healthcheck said healthy."""
        healthy_at = dict[str, float]()
        ids = {service: self.container(service) for service in SERVICES}
        while len(healthy_at) < len(SERVICES):
            for service in SERVICES:
                if service not in healthy_at and self.health(ids[service]) == "healthy":
                    healthy_at[service] = time.monotonic() - start
                    print(f"  {service} healthy after {healthy_at[service]:.0f} s", flush=True)
            if time.monotonic() - start > timeout:
                states = {s: self.health(ids[s]) for s in SERVICES}
                raise SmokeFailed(f"not healthy after {timeout:.0f} s: {states}")
            time.sleep(2)
        return healthy_at

    def logs(self, *services: str, tail: int = 60) -> str:
        out = self("logs", "--no-color", "--tail", str(tail), *services, capture=True, check=False)
        return out.stdout + out.stderr


def image_size(name: str) -> int:
    out = quiet(["docker", "image", "inspect", "--format", "{{.Size}}", name])
    return int(out.stdout.strip() or 0)


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


# --- 4. the user's path through HTTP ---------------------------------------------------------


def wait_job(client: httpx.Client, job_id: str, timeout: float = 900) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = dict(client.get(f"/jobs/{job_id}").raise_for_status().json())
        if job["state"] == "succeeded":
            return job
        if job["state"] == "failed":
            raise SmokeFailed(f"job {job_id} failed: {job['error']}")
        time.sleep(0.5)
    raise SmokeFailed(f"job {job_id} not done after {timeout:.0f} s")


def search(
    client: httpx.Client, q: str, k: int = 10, *, personalize: bool = True
) -> dict[str, Any]:
    params: dict[str, str | int] = {"q": q, "k": k}
    if not personalize:
        params["personalize"] = "false"
    return dict(client.get("/search", params=params).raise_for_status().json())


def top(body: dict[str, Any]) -> list[tuple[str, float]]:
    return [(h["image"]["filename"], round(h["score"], 4)) for h in body["hits"]]


def write_library(folder: Path, per_scene: int, others: int) -> World:
    """The demo world's library as PNG files the container's user can read; returns the world.

    Fido in every scene among other hats and other objects, without the demo's look-alikes
    (Fido's twins in another colour, pattern or shape): telling those apart is what `make demo`
    and bench/ measure; this checks that the deployed stack trains and serves a concept.
    """
    world = World(seed=0)
    fido = world.instance(FIDO_INDEX, FIDO_CATEGORY)
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)  # whatever the umask
    library = build_library(world, fido, per_scene, others)
    for item in (i for i in library if not i.kind.startswith("look-alike")):
        (folder / item.filename).write_bytes(item.png)
        (folder / item.filename).chmod(0o644)
    return world


def teach_and_search(client: httpx.Client, world: World) -> dict[str, Any]:
    """Teaches Fido, searches; returns what the restart check compares."""
    fido = world.instance(FIDO_INDEX, FIDO_CATEGORY)
    photos = concept_photos(world, fido)
    files = [("files", (f"fido-photo-{i}.png", p, "image/png")) for i, p in enumerate(photos)]
    print(f"registering Fido from {len(photos)} photos", flush=True)
    created = client.post(
        "/concepts", data={"name": "Fido", "category": FIDO_CATEGORY}, files=files
    ).raise_for_status()
    concept_id, job_id = created.json()["concept"]["id"], created.json()["job"]["id"]
    wait_job(client, job_id)
    concept = client.get(f"/concepts/{concept_id}").raise_for_status().json()
    if concept["state"] != "ready":
        raise SmokeFailed(f"concept not ready after its job: {concept}")
    plain = top(search(client, "a hat on the beach", personalize=False))
    print(f"plain CLIP, 'a hat on the beach': {plain[:3]}")
    body = search(client, "Fido on the beach")
    hits = top(body)
    print(f"'Fido on the beach', encoded as {body['rewritten']!r}:")
    for rank, (name, score) in enumerate(hits, 1):
        print(f"  {rank:>2}. {score:.3f} {name}")
    if [c["name"] for c in body["concepts"] if c.get("mentioned")] != ["Fido"]:
        raise SmokeFailed(f"the query did not use the concept: {body['concepts']}")
    beach = [name for name, _ in hits if name.startswith("fido-beach")]
    if not beach or [name for name, _ in hits[: len(beach)]] != beach:
        raise SmokeFailed(f"Fido's beach photos are not first: {hits[:5]}")
    return {
        "images": count_images(client),
        "concept": concept,
        "job_id": job_id,
        "model": body["model"],
        "hits": hits,
        "train_seconds": (concept.get("metrics") or {}).get("train_seconds"),
    }


def count_images(client: httpx.Client) -> int:
    """The user's images, counted page by page through GET /images."""
    total, cursor = 0, None
    while True:
        params: dict[str, str | int] = {"limit": 200, **({"cursor": cursor} if cursor else {})}
        page = client.get("/images", params=params).raise_for_status().json()
        total += len(page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            return total


# --- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--standins", action="store_true", help="use the stand-ins without pulling")
    p.add_argument("--pull-timeout", type=float, default=60)
    p.add_argument("--torch-index", default=None, help="force the torch wheel index")
    p.add_argument("--per-scene", type=int, default=2, help="Fido shots per scene")
    p.add_argument("--others", type=int, default=40, help="other objects in the library")
    p.add_argument("--healthy-timeout", type=float, default=600)
    p.add_argument("--rmi", action="store_true", help="also remove the images it built")
    p.add_argument("--keep", action="store_true", help="leave the stack up (debugging)")
    a = p.parse_args(argv)

    try:
        ensure_docker()
    except SmokeFailed as e:
        print(f"compose-smoke: FAIL - {e}")
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="polar-smoke-"))
    stack: Stack | None = None
    try:
        step("1. images (official where they can be pulled, else local stand-ins)")
        build_env = {**os.environ, "DOCKER_BUILDKIT": "0"}
        images = choose_images(a, build_env)
        step("2. where torch comes from")
        index = torch_index(a.torch_index)
        print(f"TORCH_INDEX_URL={index}")
        photos = workdir / "photos"
        world = write_library(photos, a.per_scene, a.others)
        stack = Stack(workdir, images, index, photos)
        stack("down", "-v", "--remove-orphans", check=False)  # leftovers of an aborted run

        step("3. build")
        t0 = time.monotonic()
        stack("build")
        build_s = time.monotonic() - t0
        size = image_size(f"polar-search:{IMAGE_TAG}")
        print(f"built in {build_s:.0f} s; polar-search:{IMAGE_TAG} is {gb(size)}")
        for var, name in images.items():
            print(f"  {var}: {name} {gb(image_size(name))}")

        step("4. up, and wait for every healthcheck")
        t0 = time.monotonic()
        stack("up", "-d", "--no-build")
        healthy_s = max(stack.wait_healthy(t0, a.healthy_timeout).values())
        print(f"every service healthy {healthy_s:.0f} s after `up` began")

        step("5. first user, inside the stack: docker-compose exec api polar create-user")
        out = stack("exec", "-T", "api", "polar", "create-user", "smoke", capture=True).stdout
        print(re.sub(r"polar_\S+", "polar_…", out))
        key = re.search(r"api_key: (\S+)", out)
        if key is None:
            raise SmokeFailed(f"no key in the output of create-user: {out!r}")
        client = httpx.Client(
            base_url=API, headers={"Authorization": f"Bearer {key.group(1)}"}, timeout=120
        )

        step("6. library from a read-only photos folder, concept, search (the worker trains)")
        for service in ("api", "worker"):
            mounts = stack("exec", "-T", service, "cat", "/proc/mounts", capture=True).stdout
            if not re.search(r" /photos \S+ ro[ ,]", mounts):
                raise SmokeFailed(f"/photos is not mounted read-only in the {service} container")
        out = stack(
            "exec", "-T", "-e", f"POLAR_API_KEY={key.group(1)}", "-e", f"POLAR_URL={API}",
            "api", "polar", "library", "add", "/photos", capture=True,
        ).stdout  # fmt: skip
        print(out)
        scan = re.search(r"scan job (\S+)", out)
        if scan is None or f"job {scan.group(1)} succeeded" not in stack.logs("worker", tail=2000):
            raise SmokeFailed(f"the worker did not scan the library in place:\n{out}")
        before = teach_and_search(client, world)
        worker_log = stack.logs("worker", tail=2000)
        if f"job {before['job_id']} succeeded" not in worker_log:
            raise SmokeFailed(f"the worker's log does not show the training job:\n{worker_log}")
        print(f"the worker's log: job {before['job_id']} (training Fido) succeeded")

        step("7. down (volumes kept) and up again: nothing lost")
        stack("down")
        t0 = time.monotonic()
        stack("up", "-d", "--no-build")
        rehealthy_s = max(stack.wait_healthy(t0, a.healthy_timeout).values())
        concept = client.get(f"/concepts/{before['concept']['id']}").raise_for_status().json()
        images_after = count_images(client)
        after = top(search(client, "Fido on the beach"))
        lost = []
        if images_after != before["images"]:
            lost.append(f"images {before['images']} -> {images_after}")
        if (concept["state"], concept["version"]) != ("ready", before["concept"]["version"]):
            lost.append(f"concept now {concept['state']} v{concept['version']}")
        if [n for n, _ in after] != [n for n, _ in before["hits"]]:
            lost.append(f"search now {after[:3]}, was {before['hits'][:3]}")
        if lost:
            raise SmokeFailed("after the restart: " + "; ".join(lost))
        print(f"healthy again after {rehealthy_s:.0f} s; images, concept and ranking unchanged")

        first, score = before["hits"][0]
        print(
            f"\ntimings: build {build_s:.0f} s, image {gb(size)}, healthy {healthy_s:.0f} s "
            f"(restart {rehealthy_s:.0f} s), training {before['train_seconds']} s"
        )
        verdict = (
            f"compose-smoke: PASS - model {before['model']}; 'Fido on the beach' #1 {first} "
            f"({score:.3f}), trained by the Celery worker; after down/up: {images_after} images, "
            f"Fido v{concept['version']} ready, the same top {len(after)}"
        )
    except (SmokeFailed, httpx.HTTPError, subprocess.TimeoutExpired) as exc:
        if stack is not None:
            print(stack.logs(tail=40))
        verdict = f"compose-smoke: FAIL - {exc}".splitlines()[0]
    finally:
        if stack is not None and not a.keep:
            step("8. clean up")
            stack("down", "-v", "--remove-orphans", check=False)
            if a.rmi:
                sh(["docker", "rmi", f"polar-search:{IMAGE_TAG}"], check=False)
        shutil.rmtree(workdir, ignore_errors=True)
    print(verdict)  # the last line
    return 0 if verdict.startswith("compose-smoke: PASS") else 1


if __name__ == "__main__":
    sys.exit(main())
